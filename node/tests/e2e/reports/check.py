"""Checks report mails as a report receiver would: the gzip attachment,
its file name, the report against its schema (TLS-RPT: a JSON Schema from
RFC 8460 4.4; DMARC: the XSD of RFC 7489 Appendix C) and the mail's DKIM
signature (dkimpy, keys from the DNS server at 127.0.0.1:argv[1]).
Prints one JSON object per message file in argv[2:]."""
import email, gzip, json, os, sys
import dkim, dns.resolver, jsonschema, xmlschema
import xml.etree.ElementTree as ET
from email.header import decode_header, make_header

HERE = os.path.dirname(os.path.abspath(__file__))
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = int(sys.argv[1])


def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    try:
        answer = resolver.resolve(name, "TXT", lifetime=timeout)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    return b"".join(answer[0].strings)


tls_schema = json.load(open(os.path.join(HERE, "tlsrpt.schema.json")))
xsd = xmlschema.XMLSchema(os.path.join(HERE, "rfc7489.xsd"))
out = []
for path in sys.argv[2:]:
    raw = open(path, "rb").read()
    msg = email.message_from_bytes(raw)
    result = {
        "subject": " ".join(str(make_header(decode_header(msg["Subject"]))).split()),
        "from": msg["From"],
        "to": msg["To"],
        "content_type": msg.get_content_type(),
        "report_type": msg.get_param("report-type"),
        "tls_report_domain": msg["TLS-Report-Domain"],
        "tls_report_submitter": msg["TLS-Report-Submitter"],
        "dkim": bool(dkim.verify(raw, dnsfunc=dnsfunc)) if msg["DKIM-Signature"] else False,
    }
    for part in msg.walk():
        name = part.get_filename()
        if not name:
            continue
        data = gzip.decompress(part.get_payload(decode=True))
        result["filename"] = name
        result["attachment_type"] = part.get_content_type()
        if name.endswith(".json.gz"):
            report = json.loads(data)
            jsonschema.validate(report, tls_schema)
            result["report"] = report
        elif name.endswith(".xml.gz"):
            xsd.validate(data.decode())
            ns = {"d": "http://dmarc.org/dmarc-xml/0.1"}
            root = ET.fromstring(data)
            result["report"] = {
                "org_name": root.findtext("d:report_metadata/d:org_name", namespaces=ns),
                "domain": root.findtext("d:policy_published/d:domain", namespaces=ns),
                "p": root.findtext("d:policy_published/d:p", namespaces=ns),
                "count": sum(int(c.text) for c in root.iterfind("d:record/d:row/d:count", ns)),
                "source_ip": root.findtext("d:record/d:row/d:source_ip", namespaces=ns),
                "disposition": root.findtext("d:record/d:row/d:policy_evaluated/d:disposition", namespaces=ns),
                "spf": root.findtext("d:record/d:auth_results/d:spf/d:result", namespaces=ns),
                "header_from": root.findtext("d:record/d:identifiers/d:header_from", namespaces=ns),
            }
        result["schema_valid"] = True
    out.append(result)
print(json.dumps(out))
