#!/usr/bin/env python3
"""Contract check: every recorded exchange with the API (method, route
template, status, content type, body) is validated against the OpenAPI
3.1 document the server ships (node/src/api/openapi.json): the status must
be documented for the operation, the content type must be one it lists,
and the body must match that schema (JSON Schema 2020-12, jsonschema).

usage: contract.py OPENAPI_JSON EXCHANGES_JSON
Prints {"checked": n, "failures": [...]} as JSON.
"""

import json
import sys

import jsonschema


def main():
    doc = json.load(open(sys.argv[1]))
    exchanges = json.load(open(sys.argv[2]))
    failures = []
    checked = 0
    for x in exchanges:
        where = "%s %s -> %s" % (x["method"], x["route"], x["status"])
        op = doc.get("paths", {}).get(x["route"], {}).get(x["method"].lower())
        if op is None:
            failures.append("%s: operation not in the document" % where)
            continue
        responses = op.get("responses", {})
        response = responses.get(str(x["status"])) or responses.get("%dXX" % (x["status"] // 100)) or responses.get("default")
        if response is None:
            failures.append("%s: status not documented (has %s)" % (where, sorted(responses)))
            continue
        while "$ref" in response:
            ref = response["$ref"]
            node = doc
            for part in ref.lstrip("#/").split("/"):
                node = node[part]
            response = node
        content = response.get("content")
        if x["body"] is None:
            if content and x["status"] != 204:
                failures.append("%s: empty body, document says %s" % (where, sorted(content)))
            checked += 1
            continue
        ctype = (x.get("content_type") or "").split(";")[0].strip()
        if not content or ctype not in content:
            failures.append("%s: content type %r not documented (%s)" % (where, ctype, sorted(content or {})))
            continue
        schema = content[ctype].get("schema")
        if schema is None:
            checked += 1
            continue
        root = dict(schema)
        root["components"] = doc.get("components", {})
        try:
            jsonschema.Draft202012Validator(root).validate(x["body"])
        except jsonschema.ValidationError as e:
            failures.append("%s: %s at %s" % (where, e.message, "/".join(map(str, e.absolute_path))))
            continue
        checked += 1
    print(json.dumps({"checked": checked, "failures": failures}))


if __name__ == "__main__":
    main()
