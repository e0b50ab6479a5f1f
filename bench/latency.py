#!/usr/bin/env python3
"""Open-loop SMTP latency probe (part of bench/run, usable on its own).

Opens --connections SMTP sessions to HOST:PORT and sends --messages messages
at a fixed aggregate --rate (messages/s), round-robin over the sessions
(message i is due at start + i/rate; a session that falls behind sends its
next message at once). For every message it records the time from writing
the final ".\r\n" (after the whole body has been written and drained) to
reading the complete reply. Sessions are reused for many messages, so the
figure is the server's end-of-data work (queue write, fsync, replication),
not connection setup. MAIL, RCPT and DATA go in one write (RFC 2920), so
that the probe's own CPU stays small: it shares the machine it measures.

Prints one JSON object on stdout: count, ok, errors by reply code,
min/median/p90/p99/max in milliseconds, achieved rate.
Every wait is bounded (--timeout per message, --deadline overall).
"""
import argparse
import asyncio
import json
import socket
import sys
import time


def make_body(size, idx):
    hdr = (
        f"From: <bench@source.test>\r\n"
        f"To: <rcpt@sink.test>\r\n"
        f"Subject: latency probe {idx}\r\n"
        f"Message-ID: <lat.{idx}.{time.time_ns()}@source.test>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"\r\n"
    ).encode()
    line = b"La la la la la la la la la la la la la la la la la la la la la la la la la.\r\n"
    n = max(1, size // len(line))
    return hdr + line * n


class Session:
    def __init__(self, host, port, timeout):
        self.host, self.port, self.timeout = host, port, timeout
        self.r = self.w = None

    async def reply(self):
        # Callers bound the wait (one asyncio.timeout per message: a
        # wait_for per line would start a task per line).
        lines = []
        while True:
            line = await self.r.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        return int(lines[-1][:3]), b"".join(lines)

    async def cmd(self, text):
        self.w.write(text.encode() + b"\r\n")
        await self.w.drain()
        return await self.reply()

    async def open(self):
        async with asyncio.timeout(self.timeout):
            await self._open()

    async def _open(self):
        self.r, self.w = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        sock = self.w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code, _ = await self.reply()
        if code != 220:
            raise ConnectionError(f"greeting {code}")
        code, _ = await self.cmd("EHLO latency.source.test")
        if code != 250:
            raise ConnectionError(f"EHLO {code}")

    async def send(self, body):
        """Returns (reply code, seconds from final '.' to the reply)."""
        # One write for the envelope (RFC 2920 pipelining, as MTAs send it):
        # the probe's own work per message stays small next to the server's.
        self.w.write(b"MAIL FROM:<bench@source.test>\r\nRCPT TO:<rcpt@sink.test>\r\nDATA\r\n")
        await self.w.drain()
        codes = [(await self.reply())[0] for _ in range(3)]
        if codes != [250, 250, 354]:
            if codes[2] == 354:  # DATA accepted after a refusal: end it empty
                await self.cmd(".")
            await self.cmd("RSET")
            return next((c for c in codes if c not in (250, 354)), codes[2]), None
        self.w.write(body)
        await self.w.drain()
        t0 = time.perf_counter()
        self.w.write(b".\r\n")
        await self.w.drain()
        code, _ = await self.reply()
        return code, time.perf_counter() - t0

    async def close(self):
        try:
            await asyncio.wait_for(self.cmd("QUIT"), 5)
        except Exception:
            pass
        try:
            self.w.close()
        except Exception:
            pass


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


async def main_async(a):
    targets = a.targets
    sessions = [Session(*targets[i % len(targets)], a.timeout) for i in range(a.connections)]
    await asyncio.gather(*(s.open() for s in sessions))
    lat, errors, raw = [], {}, []
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.05
    deadline = time.perf_counter() + a.deadline

    async def worker(k, s):
        body_cache = {}
        for i in range(k, a.messages, a.connections):
            due = start + i / a.rate
            now = time.perf_counter()
            if now > deadline:
                errors["deadline"] = errors.get("deadline", 0) + 1
                continue
            if due > now:
                await asyncio.sleep(due - now)
            body = body_cache.get(i % 4)
            if body is None:
                body = body_cache[i % 4] = make_body(a.size, i)
            try:
                async with asyncio.timeout(a.timeout):
                    code, dt = await s.send(body)
            except Exception as e:  # timeout / closed: count and stop this session
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                return
            if code == 250 and dt is not None:
                lat.append(dt)
                raw.append((time.perf_counter() - dt - start, dt))
            else:
                errors[str(code)] = errors.get(str(code), 0) + 1

    await asyncio.gather(*(worker(k, s) for k, s in enumerate(sessions)))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    await asyncio.gather(*(s.close() for s in sessions))
    if a.raw:
        with open(a.raw, "w") as f:
            for t, dt in sorted(raw):
                f.write(f"{t:.6f} {dt * 1000.0:.3f}\n")
    lat.sort()
    ms = lambda v: None if v is None else round(v * 1000.0, 3)
    return {
        "count": a.messages, "ok": len(lat), "errors": errors,
        "connections": a.connections, "target_rate": a.rate, "size": a.size,
        "achieved_rate": round(len(lat) / elapsed, 1) if elapsed > 0 else None,
        "min_ms": ms(lat[0] if lat else None), "median_ms": ms(pct(lat, 50)),
        "p90_ms": ms(pct(lat, 90)), "p99_ms": ms(pct(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
        # the probe's own CPU: it shares the machine with what it measures
        "probe_cpu_ms_per_msg": round(cpu * 1000.0 / max(1, len(lat)), 3),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="+", help="HOST:PORT (several: sessions are spread over them)")
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0, help="aggregate messages/s")
    p.add_argument("--size", type=int, default=10240, help="body bytes (headers excluded)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per message exchange")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole probe")
    p.add_argument("--raw", help="write each message's end-of-data time (s from start) and latency (ms) here")
    a = p.parse_args()
    a.targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in a.targets]
    try:
        res = asyncio.run(asyncio.wait_for(main_async(a), a.deadline + 30))
    except Exception as e:
        res = {"count": a.messages, "ok": 0, "errors": {type(e).__name__: 1}, "failure": str(e)}
    json.dump(res, sys.stdout)
    print()
    return 0 if res.get("ok") == a.messages else 1


if __name__ == "__main__":
    sys.exit(main())
