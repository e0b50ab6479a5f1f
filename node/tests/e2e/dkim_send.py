#!/usr/bin/env python3
"""Test peer for the inbound checks: sends one message over SMTP with
smtplib, DKIM-signed by dkimpy when --key is given, and prints the server's
reply to the end of data ("CODE TEXT", or the reply that stopped the
transaction earlier). With --verify FILE it instead verifies the DKIM
signature of a delivered message, reading keys from --dns (dnspython), and
prints "dkim=pass" or "dkim=fail".
"""

import argparse
import email.utils
import smtplib
import sys

import dkim
import dns.resolver


def resolver(server):
    host, port = server.rsplit(":", 1)
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [host]
    r.port = int(port)
    r.lifetime = 5
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", help="SMTP server host:port")
    p.add_argument("--helo", default="client.sender.test")
    p.add_argument("--mail-from", default="")
    p.add_argument("--rcpt")
    p.add_argument("--from-header")
    p.add_argument("--header", action="append", default=[], help="extra header field, on top")
    p.add_argument("--key", help="PEM private key: sign with it")
    p.add_argument("--domain", help="d= of the signature")
    p.add_argument("--selector", default="sel1")
    p.add_argument("--verify", help="a delivered message to verify")
    p.add_argument("--dns", help="DNS server host:port for --verify")
    a = p.parse_args()

    if a.verify:
        r = resolver(a.dns)

        def dnsfunc(name, timeout=5):
            answer = r.resolve(name.decode().rstrip("."), "TXT")
            return b"".join(b"".join(rd.strings) for rd in answer)

        data = open(a.verify, "rb").read()
        print("dkim=pass" if dkim.verify(data, dnsfunc=dnsfunc) else "dkim=fail")
        return

    msg = "".join(h + "\r\n" for h in a.header)
    msg += (
        "From: <%s>\r\nTo: <%s>\r\nSubject: inbound check\r\nDate: %s\r\nMessage-ID: %s\r\n\r\n"
        "Hello from the inbound test.\r\n"
        % (a.from_header, a.rcpt, email.utils.formatdate(), email.utils.make_msgid(domain="sender.test"))
    )
    msg = msg.encode()
    if a.key:
        signature = dkim.sign(
            msg,
            a.selector.encode(),
            a.domain.encode(),
            open(a.key, "rb").read(),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        msg = signature + msg

    host, port = a.server.rsplit(":", 1)
    s = smtplib.SMTP(host, int(port), local_hostname=a.helo, timeout=120)
    s.ehlo()
    for code, text in (s.mail(a.mail_from), s.rcpt(a.rcpt)):
        if code != 250:
            print(code, text.decode())
            return
    code, text = s.data(msg)
    print(code, text.decode())
    s.quit()


if __name__ == "__main__":
    sys.exit(main())
