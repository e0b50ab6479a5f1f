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
[ -x /usr/lib/dovecot/lmtp ] || need+=(dovecot-core dovecot-lmtpd)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
python3 -c "import aiosmtpd, flufl.bounce, prometheus_client" 2>/dev/null || pip install -q aiosmtpd flufl.bounce prometheus_client
python3 -c "import dkim, dns.resolver, nacl" 2>/dev/null || pip install -q dkimpy dnspython pynacl

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
