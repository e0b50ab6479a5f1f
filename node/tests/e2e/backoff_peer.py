"""A remote MX that throttles: an aiosmtpd server answering the first N
RCPT commands with a provider's throttle reply (given as its lines), then
accepting everything. Every RCPT and every accepted message is one line
in the log file: `<unix time> rcpt <address> <code>` or
`<unix time> data <Message-ID>`.

usage: backoff_peer.py PORT LOG N REPLY-LINE...

With BACKOFF_PEER_ONLY=ADDR only RCPTs from client address ADDR are
throttled. Each log line ends with the client's address.
"""

import os

import re
import sys
import time

from aiosmtpd.controller import Controller

port, log_path, throttled = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
reply_lines = sys.argv[4:]
log = open(log_path, "a", buffering=1)


def reply():
    """The reply as a multi-line SMTP reply (`421-...` then `421 ...`)."""
    code = reply_lines[0][:3]
    texts = [line[4:] for line in reply_lines]
    out = [f"{code}-{t}" for t in texts[:-1]] + [f"{code} {texts[-1]}"]
    return "\r\n".join(out)


class Throttling:
    def __init__(self):
        self.left = throttled

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        client = session.peer[0]
        only = os.environ.get("BACKOFF_PEER_ONLY")
        if self.left > 0 and (not only or only == client):
            self.left -= 1
            log.write(f"{time.time():.3f} rcpt {address} {reply_lines[0][:3]} {client}\n")
            return reply()
        log.write(f"{time.time():.3f} rcpt {address} 250 {client}\n")
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        m = re.search(rb"(?im)^message-id:\s*<([^>]*)>", envelope.content or b"")
        log.write(f"{time.time():.3f} data {m.group(1).decode() if m else '-'} 250 {session.peer[0]}\n")
        return "250 2.0.0 OK"


controller = Controller(Throttling(), hostname="127.0.0.1", port=port)
controller.start()
print("ready", flush=True)
try:
    while True:
        time.sleep(3600)
finally:
    controller.stop()
