"""A webhook receiver for the durable-events test: records every POST as
one JSON line in argv[1] (webhook-id, timestamp, whether the Standard
Webhooks signature verifies with the secret argv[3], the body) and answers
200. Listens on 127.0.0.1:argv[2] (0: a free port), prints the port."""
import base64, hashlib, hmac, http.server, json, sys, threading

out, port, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3]
key = base64.b64decode(secret.removeprefix("whsec_"))
lock = threading.Lock()


def verify(msg_id, timestamp, body, header):
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    # The header may carry several space-separated "v1,<sig>" values.
    return any(
        part.startswith("v1,") and hmac.compare_digest(part[3:], expected)
        for part in (header or "").split()
    )


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        h = self.headers
        record = {
            "webhook_id": h.get("webhook-id"),
            "timestamp": h.get("webhook-timestamp"),
            "valid": verify(h.get("webhook-id"), h.get("webhook-timestamp"), body, h.get("webhook-signature")),
            "body": body.decode(),
        }
        with lock, open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer.allow_reuse_address = True
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
