#!/usr/bin/env python3
"""Drives headless Chromium through the DevTools protocol for console.rs:
opens the console, waits until it shows what the test expects, optionally
signs in with a token and suspends a domain by clicking the page's form,
takes screenshots, and prints what a person sees as JSON on stdout.

usage: console_browser.py URL OUT_DIR WAIT_JS [TOKEN DOMAIN]
Every wait has a deadline; Chromium is killed on every way out."""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from websockets.sync.client import connect

DEADLINE = 30.0

SEEN = """(() => {
  const rows = id => [...document.querySelectorAll('#' + id + ' tbody tr')].map(tr => ({
    data: Object.assign({}, tr.dataset), cells: [...tr.cells].map(td => td.textContent) }));
  return JSON.stringify({
    members: rows('members'), shards: rows('shards'), queue: rows('queue'),
    reasons: rows('reasons'), suspended: rows('suspended'), events: rows('events'),
    rate_lines: document.querySelectorAll('#rate-chart polyline').length,
    reason_lines: document.querySelectorAll('#reason-chart polyline').length,
    who: document.getElementById('who').textContent,
    message: document.getElementById('message').textContent,
    can_act: document.body.dataset.canAct || '',
  });
})()"""


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            msg = json.loads(self.ws.recv(timeout=DEADLINE))
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
        raise TimeoutError(method)

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr, what):
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            if self.eval(expr):
                return
            time.sleep(0.2)
        raise TimeoutError(f"page never showed {what} ({expr}); it shows {self.eval(SEEN)}")

    def click(self, selector):
        box = self.eval(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView(); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, selector, text):
        self.click(selector)
        self.call("Input.insertText", text=text)

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))


def main():
    url, out_dir, wait_js = sys.argv[1:4]
    token, domain = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else (None, None)
    os.makedirs(out_dir, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="tern-console-chromium-")
    chromium = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
         "--window-size=1400,2000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        end = time.monotonic() + DEADLINE
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if time.monotonic() > end or chromium.poll() is not None:
                raise TimeoutError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(ws_url, max_size=64 << 20, open_timeout=10) as ws:
            page = Page(ws)
            page.call("Page.enable")
            page.call("Page.navigate", url=url)
            page.wait(wait_js, "the expected data")
            page.screenshot(os.path.join(out_dir, "console.png"))
            result = {"before": json.loads(page.eval(SEEN))}
            if token:
                page.wait("!document.getElementById('login').hidden", "the sign-in form")
                page.type_into("#token", token)
                page.click("#sign-in")
                page.wait("document.body.dataset.canAct === '1'", "the signed-in operator")
                page.type_into("#suspend-domain", domain)
                page.type_into("#suspend-reason", "clicked in the console test")
                page.click("#suspend-button")
                page.wait(f"!!document.querySelector('#suspended tr[data-domain={json.dumps(domain)}]')",
                          f"{domain} suspended")
                page.screenshot(os.path.join(out_dir, "console-suspended.png"))
                result["after"] = json.loads(page.eval(SEEN))
        print(json.dumps(result))
    finally:
        chromium.kill()
        chromium.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
