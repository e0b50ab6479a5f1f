#!/usr/bin/env python3
"""DNS server for the OpenSPF RFC 7208 test suite (rfc7208-tests.yml).

  spf_zone_server.py list FILE         print the scenarios and their test
                                       cases as JSON on stdout
  spf_zone_server.py serve FILE INDEX  serve scenario INDEX's zonedata on
                                       127.0.0.1 (UDP and TCP, one port),
                                       print "listening PORT", and stop when
                                       stdin is closed

Zone semantics follow the suite's own driver (pyspf's test/testspf.py):
SPF (type 99) records are also served as TXT when a name has no TXT record;
a TIMEOUT entry means no answer; names starting with "error." that are not
in the zone time out; other unknown names are NXDOMAIN. CNAMEs are chased
within the zone, as a recursive resolver would. A TXT/SPF entry with no
strings (not representable on the wire) is served as one empty string.
With SPF_ZONE_DEBUG=1 every query and answer is logged on stderr.
"""

import json
import os
import socket
import struct
import sys
import threading

import yaml
from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSRecord

TTL = 0


def load(path):
    with open(path, "rb") as f:
        return list(yaml.safe_load_all(f))


def listing(scenarios):
    out = []
    for s in scenarios:
        tests = []
        for name, t in s["tests"].items():
            result = t["result"]
            tests.append(
                {
                    "name": name,
                    "helo": str(t.get("helo", "")),
                    "host": str(t["host"]),
                    "mailfrom": str(t.get("mailfrom", "")),
                    "result": result if isinstance(result, list) else [result],
                }
            )
        out.append({"description": s.get("description", ""), "tests": tests})
    return out


def strings(value):
    """TXT/SPF value from the YAML (a string or a list of them) as <=255-octet strings."""
    parts = value if isinstance(value, list) else [value]
    out = []
    for p in parts:
        b = str(p).encode("utf-8")
        if not b:
            out.append(b)
        while b:
            out.append(b[:255])
            b = b[255:]
    # A TXT record needs at least one string (the suite's "null text" is
    # not representable on the wire): serve one empty string.
    return out or [b""]


def zone_of(scenario):
    """name -> list of "TIMEOUT" or (type, value), as testspf.py's getrdata builds it."""
    zone = {}
    for name, entries in scenario.get("zonedata", {}).items():
        records, generated, has_txt = [], [], False
        for entry in entries:
            if not isinstance(entry, dict):
                records.append(entry)
                continue
            for rtype, value in entry.items():
                if rtype == "TXT":
                    has_txt = True
                elif rtype == "SPF":
                    generated.append(("TXT", value))
                if value != "NONE":
                    records.append((rtype, value))
        if not has_txt:
            records.extend(g for g in generated if g[1] != "NONE")
        zone[name.lower().rstrip(".")] = records
    return zone


def rdata(rtype, value):
    if rtype == "A":
        return QTYPE.A, A(value)
    if rtype == "AAAA":
        return QTYPE.AAAA, AAAA(value)
    if rtype == "MX":
        pref, host = value
        return QTYPE.MX, MX(str(host), int(pref))
    if rtype == "PTR":
        return QTYPE.PTR, PTR(str(value))
    if rtype == "CNAME":
        return QTYPE.CNAME, CNAME(str(value))
    if rtype in ("TXT", "SPF"):
        return getattr(QTYPE, rtype), TXT(strings(value))
    raise ValueError("unsupported record type %s" % rtype)


class Timeout(Exception):
    pass


def lookup(zone, name, qtype, depth=0):
    """(rcode, [RR]); raises Timeout for a lookup that gets no answer."""
    key = name.lower().rstrip(".")
    if key not in zone:
        if key.startswith("error."):
            raise Timeout()
        return RCODE.NXDOMAIN, []
    answers, timeout, cname = [], True, None
    for entry in zone[key]:
        if entry == "TIMEOUT":
            if timeout:
                raise Timeout()
            break
        rtype, value = entry
        if rtype == qtype:
            timeout = False
            if value == "TIMEOUT":
                raise Timeout()
        if value == "TIMEOUT":
            continue
        if rtype == qtype:
            t, rd = rdata(rtype, value)
            answers.append(RR(name, t, rdata=rd, ttl=TTL))
        elif rtype == "CNAME":
            cname = str(value)
    if not answers and cname is not None and qtype != "CNAME" and depth < 8:
        t, rd = rdata("CNAME", cname)
        rcode, more = lookup(zone, cname, qtype, depth + 1)
        return rcode, [RR(name, t, rdata=rd, ttl=TTL)] + more
    return RCODE.NOERROR, answers


DEBUG = bool(os.environ.get("SPF_ZONE_DEBUG"))


def respond(zone, data):
    """The wire reply to a query, or None to stay silent."""
    try:
        request = DNSRecord.parse(data)
    except Exception as e:
        if DEBUG:
            print("unparsable query: %r %r" % (e, data), file=sys.stderr)
        return None
    reply = request.reply(ra=1, aa=1)
    q = request.q
    try:
        # Raw labels: str() escapes spaces and the like (the suite has such names).
        qname = ".".join(label.decode("utf-8", "replace") for label in q.qname.label)
        rcode, answers = lookup(zone, qname, QTYPE.get(q.qtype))
    except Timeout:
        if DEBUG:
            print("%s %s: no answer" % (q.qname, QTYPE.get(q.qtype)), file=sys.stderr)
        return None
    except Exception as e:
        if DEBUG:
            print("%s %s: %r" % (q.qname, QTYPE.get(q.qtype), e), file=sys.stderr)
        reply.header.rcode = RCODE.SERVFAIL
        return reply.pack()
    reply.header.rcode = rcode
    if DEBUG:
        print("%s %s: %s %s" % (q.qname, QTYPE.get(q.qtype), RCODE.get(rcode), [str(a.rdata) for a in answers]), file=sys.stderr)
    for rr in answers:
        reply.add_answer(rr)
    return reply.pack()


def serve_udp(sock, zone):
    while True:
        data, peer = sock.recvfrom(65535)
        out = respond(zone, data)
        if out is not None:
            sock.sendto(out, peer)


def serve_tcp_conn(conn, zone):
    with conn:
        while True:
            head = conn.recv(2)
            if len(head) < 2:
                return
            (n,) = struct.unpack("!H", head)
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    return
                data += chunk
            out = respond(zone, data)
            if out is None:
                return
            conn.sendall(struct.pack("!H", len(out)) + out)


def serve_tcp(sock, zone):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve_tcp_conn, args=(conn, zone), daemon=True).start()


def bind_pair():
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp, port
    raise SystemExit("no free UDP+TCP port pair on 127.0.0.1")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "list":
        json.dump(listing(load(sys.argv[2])), sys.stdout)
        return
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        zone = zone_of(load(sys.argv[2])[int(sys.argv[3])])
        udp, tcp, port = bind_pair()
        threading.Thread(target=serve_udp, args=(udp, zone), daemon=True).start()
        threading.Thread(target=serve_tcp, args=(tcp, zone), daemon=True).start()
        print("listening %d" % port, flush=True)
        sys.stdin.read()
        return
    raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
