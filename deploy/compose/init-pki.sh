#!/bin/sh
# compose `init` service: the cluster's certificates, made once with
# `ternctl cert` into the volume `pki` (CA key and the admin client
# certificate stay there), and each node's own certificate and key copied
# into its data volume. Runs as root to give the volumes to uid 10001.
set -eu
if [ ! -f /pki/ca.crt ]; then
    ternctl cert init-ca --dir /pki --name "Tern compose CA"
    ternctl cert client --dir /pki --name admin --role admin
fi
for id in 1 2 3; do
    if [ ! -f "/pki/node-$id.crt" ]; then
        ternctl cert node --dir /pki --id "$id" --host "tern$id"
    fi
    mkdir -p "/nodes/$id/tls"
    cp /pki/ca.crt "/nodes/$id/tls/ca.crt"
    cp "/pki/node-$id.crt" "/nodes/$id/tls/node.crt"
    cp "/pki/node-$id.key" "/nodes/$id/tls/node.key"
    chmod 0600 "/nodes/$id/tls/node.key"
    chown 10001:10001 "/nodes/$id"
    chown -R 10001:10001 "/nodes/$id/tls"
done
chown -R 10001:10001 /pki
echo "init: certificates ready"
