#!/bin/sh
# compose `join` service: adds tern2 and tern3 to the cluster tern1
# bootstrapped (`ternctl member add`), once each; a later `up` finds them
# members and does nothing. Retries while tern1 is starting (bounded: 2 min).
set -eu
for id in 2 3; do
    tries=0
    until ternctl -o json member list 2>/dev/null | grep -q "\"id\": $id,"; do
        tries=$((tries + 1))
        if [ "$tries" -gt 60 ]; then
            echo "join: node $id was not added after $tries tries" >&2
            exit 1
        fi
        ternctl member add --id "$id" --addr "tern$id:7070" || sleep 2
    done
    echo "join: node $id is a member"
done
