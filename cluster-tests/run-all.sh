#!/usr/bin/env bash
# The test command (see README.md): installs what the tests need when it is
# missing, builds the workspace and runs every test. Each test starts the
# servers it uses (ternd, smtp-sink, ...) on free loopback ports itself.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v swaks >/dev/null || need+=(swaks)
# swaks' --tls/--tlsc (STARTTLS and submission tests); only a Recommends of swaks.
perl -MNet::SSLeay -e1 2>/dev/null || need+=(libnet-ssleay-perl)
command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v openssl >/dev/null || need+=(openssl)
# The sending API's end-to-end tests call it with curl.
command -v curl >/dev/null || need+=(curl)
# DANE tests: knot serves a DNSSEC-signed zone (knotd, keymgr); kdig waits for it.
command -v knotd >/dev/null || [ -x /usr/sbin/knotd ] || need+=(knot)
command -v kdig >/dev/null || need+=(knot-dnsutils)
[ -x /usr/lib/dovecot/lmtp ] || need+=(dovecot-core dovecot-lmtpd)
# tern-powerfs mounts through fusermount3 (power-cut tests; needs /dev/fuse).
command -v fusermount3 >/dev/null || need+=(fuse3)
# Content filters (node/tests/e2e/filters.rs): rspamd (HTTP and milter) and clamd.
command -v rspamd >/dev/null || need+=(rspamd)
[ -x /usr/sbin/clamd ] || need+=(clamav-daemon)
# The web console's browser test (node/tests/e2e/console.rs): headless Chromium.
command -v chromium >/dev/null || need+=(chromium)
# deploy/ (cluster-tests/tests/deploy.rs): promtool checks and unit-tests the alert
# rules; docker-compose runs the compose cluster; debootstrap makes the local base
# image once (no container registry here), kept as tern-test-base:bookworm.
command -v promtool >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
python3 -c "import aiosmtpd, flufl.bounce, prometheus_client, dkim, dns.resolver, nacl, dnslib, yaml, jsonschema, xmlschema, websockets" 2>/dev/null || pip install -q aiosmtpd flufl.bounce prometheus_client dkimpy dnspython pynacl dnslib pyyaml jsonschema xmlschema websockets
# deploy/kubernetes is validated offline against the API schema this package ships.
command -v kubernetes-validate >/dev/null || pip install -q kubernetes-validate
# The OpenSPF RFC 7208 test suite ships in pyspf's source distribution (not
# its wheel); kept under target/ so reruns do not fetch it again.
spf_suite=target/spf-suite/rfc7208-tests.yml
if [ ! -f "$spf_suite" ]; then
  tmp=$(mktemp -d)
  pip download -q --no-deps --no-binary :all: pyspf==2.0.14 -d "$tmp"
  tar -xzf "$tmp/pyspf-2.0.14.tar.gz" -C "$tmp" pyspf-2.0.14/test/rfc7208-tests.yml
  mkdir -p "$(dirname "$spf_suite")"
  cp "$tmp/pyspf-2.0.14/test/rfc7208-tests.yml" "$spf_suite"
  rm -rf "$tmp"
fi
export TERN_RFC7208_TESTS="$PWD/$spf_suite"

export PATH="$PATH:/usr/sbin"
export CARGO_TERM_COLOR=never
# Tests that need a real peer (smtp-sink, aiosmtpd, Dovecot) fail instead of skipping.
export TERN_REQUIRE_PEERS=1
cargo fmt --all -- --check
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole run: the per-binary summaries above end
# with binaries that hold no tests.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
