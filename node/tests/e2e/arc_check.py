#!/usr/bin/env python3
"""ARC helper for node/tests/e2e/arc.rs, with dkimpy as the independent
implementation.

  arc_check.py verify FILE DNS          print "cv=<pass|fail|none> sets=N"
                                        (dkim.arc_verify, keys from DNS
                                        host:port)
  arc_check.py resend FILE SERVER FROM RCPT
                                        send FILE's bytes as they are
                                        (a forwarder passing the message on),
                                        print the reply to the end of data
"""

import smtplib
import sys

import dkim
import dns.resolver


def main():
    cmd, path = sys.argv[1], sys.argv[2]
    data = open(path, "rb").read()
    if cmd == "verify":
        host, port = sys.argv[3].rsplit(":", 1)
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [host]
        r.port = int(port)
        r.lifetime = 5

        def dnsfunc(name, timeout=5):
            answer = r.resolve(name.decode().rstrip("."), "TXT")
            return b"".join(b"".join(rd.strings) for rd in answer)

        cv, results, reason = dkim.arc_verify(data, dnsfunc=dnsfunc)
        print("cv=%s sets=%d" % (cv.decode(), len(results)))
        if reason:
            print(reason, file=sys.stderr)
    elif cmd == "resend":
        host, port = sys.argv[3].rsplit(":", 1)
        s = smtplib.SMTP(host, int(port), local_hostname="client.sender.test", timeout=120)
        s.ehlo()
        s.mail(sys.argv[4])
        s.rcpt(sys.argv[5])
        code, text = s.data(data)
        print(code, text.decode())
        s.quit()
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
