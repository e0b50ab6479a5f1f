#!/usr/bin/env python3
"""Checks the messages an API batch delivered to a sink directory: each is
parsed with Python's email package (policy.default), its recipient's
substitutions are found in the subject, the text part and the (escaped)
HTML part, and its DKIM signature is verified with dkimpy against the
test's DNS server.

usage: verify_batch.py DNS_PORT MESSAGES_DIR EXPECTED_JSON
EXPECTED_JSON maps each recipient address to its `name` variable.
Prints {"count": n, "verified": n, "failures": [...]} as JSON.
"""

import email
import email.policy
import html
import json
import os
import sys

import dkim
import dns.resolver


def main():
    port, directory, expected_file = sys.argv[1], sys.argv[2], sys.argv[3]
    expected = json.load(open(expected_file))
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = int(port)

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        try:
            answer = resolver.resolve(name.rstrip("."), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    failures, seen, verified = [], {}, 0
    files = sorted(f for f in os.listdir(directory) if f.endswith(".eml"))
    for name in files:
        raw = open(os.path.join(directory, name), "rb").read()
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        to = str(msg["To"] or "").strip().strip("<>")
        if "<" in to:
            to = to.split("<", 1)[1].rstrip(">")
        if to not in expected:
            continue  # another test message in the same sink
        seen[to] = seen.get(to, 0) + 1
        who = expected[to]
        if str(msg["Subject"]) != "Hi %s" % who:
            failures.append("%s: subject %r" % (to, str(msg["Subject"])))
        text = msg.get_body(preferencelist=("plain",))
        if text is None or ("Dear %s," % who) not in text.get_content():
            failures.append("%s: text part without its name" % to)
        part = msg.get_body(preferencelist=("html",))
        body = part.get_content() if part is not None else ""
        if ("<p>Dear %s</p>" % html.escape(who, quote=False)) not in body:
            failures.append("%s: html part without its escaped name: %r" % (to, body[:200]))
        if who in body and who != html.escape(who, quote=False):
            failures.append("%s: html part holds the name unescaped" % to)
        try:
            ok = dkim.DKIM(raw).verify(dnsfunc=dnsfunc)
        except dkim.DKIMException as e:
            ok = False
            failures.append("%s: dkim %s" % (to, e))
        if ok:
            verified += 1
        elif len(failures) < 20:
            failures.append("%s: dkim signature does not verify" % to)
    for to, n in seen.items():
        if n != 1:
            failures.append("%s: delivered %d times" % (to, n))
    missing = [to for to in expected if to not in seen]
    if missing:
        failures.append("%d recipients got nothing, e.g. %s" % (len(missing), missing[:3]))
    print(json.dumps({"count": sum(seen.values()), "verified": verified, "failures": failures[:50]}))


if __name__ == "__main__":
    main()
