"""Helpers shared by the scripts in bench/ (run, deferred, snapshot-catchup, recovery, ...).

Standard library only. What lives here: logging with the script's name,
cleanup of everything started (also on SIGINT/SIGTERM), starting and
stopping processes in their own session, free loopback ports and waiting
for them, /proc readings (CPU, RSS/HWM/PSS, process trees), finding the
release binaries, the machine description written into every JSON result,
ternd config files and waiting for a ternd's `ready` line, sizes and labels.
"""
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK = os.sysconf("SC_CLK_TCK")

_name = ["bench", None]


def set_name(name, to_stderr=False):
    """The name `log` prints ("bench", "deferred", ...); `to_stderr` for a
    script whose stdout is its result."""
    _name[0], _name[1] = name, to_stderr


def log(msg):
    print(f"[{_name[0]} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr if _name[1] else sys.stdout, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- cleanup
# Everything started is registered here and torn down in reverse order at the
# end, on an exception and on SIGINT/SIGTERM (converted to SystemExit).
_cleanups = []


def on_cleanup(fn):
    _cleanups.append(fn)
    return fn


def cleanup_mark():
    """A mark for `run_cleanups(since=mark)`: tear down only what came after."""
    return len(_cleanups)


def run_cleanups(since=0):
    """Runs (newest first) and forgets every cleanup registered after `since`."""
    while len(_cleanups) > since:
        fn = _cleanups.pop()
        try:
            fn()
        except Exception as e:  # keep tearing down the rest
            log(f"cleanup: {e!r}")


def _sig(signum, _frame):
    raise SystemExit(128 + signum)


def exit_on_signals():
    """SIGINT and SIGTERM raise SystemExit, so `finally` blocks clean up."""
    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGINT, _sig)


# ---------------------------------------------------------------- processes
def kill_proc(p, grace=10.0):
    """SIGTERM a Popen (started in its own session), wait `grace` s, then
    SIGKILL its process group. Returns seconds until it exited, or None if
    it had to be killed (or was not running)."""
    if p.poll() is not None:
        return None
    t0 = time.monotonic()
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=grace)
        return round(time.monotonic() - t0, 2)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=10)
    except ProcessLookupError:
        pass
    return None


def start(cmd, stdout, stderr, env=None, cwd=None):
    """Popen in its own session, stopped by `run_cleanups`."""
    p = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                         env=env, cwd=cwd, start_new_session=True)
    on_cleanup(lambda: kill_proc(p))
    return p


def which(prog):
    return shutil.which(prog) or shutil.which(prog, path="/usr/sbin:/usr/bin:/sbin:/bin")


def tail(path, n=4000):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- ports
_next_port = [20000 + (os.getpid() * 97) % 12000]


def free_port():
    """A free port below the ephemeral range (32768-60999): a port from
    bind(0) is ephemeral, and an outgoing connection may take it between
    this check and the server's bind."""
    for _ in range(12000):
        port = _next_port[0]
        _next_port[0] = 20000 + (port - 20000 + 1) % 12000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


def wait_port(port, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait(what, timeout, cond, every=0.2):
    """Polls `cond` until it returns something true (returned); BenchError after `timeout` s."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


# ---------------------------------------------------------------- /proc
def read_stat(pid):
    """(ppid, utime+stime+cutime+cstime in clock ticks, zombie?) or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    # rest[0]=state(3) rest[1]=ppid(4) ... utime(14)=rest[11], stime, cutime, cstime
    return int(rest[1]), sum(int(x) for x in rest[11:15]), rest[0] == "Z"


def cpu_ticks(pid):
    """utime + stime of one process, in clock ticks (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # fields 14 (utime) and 15 (stime)


def proc_status(pid, keys=("VmRSS", "VmHWM")):
    """Fields of /proc/PID/status: Vm* in bytes, others (Threads) as numbers."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in keys:
                    v = int(line.split()[1])
                    out[k] = v * 1024 if k.startswith("Vm") else v
    except OSError:
        pass
    return out


def proc_pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(root):
    """root and every live descendant (one /proc scan)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = read_stat(int(d))
            if st:
                children.setdefault(st[0], []).append(int(d))
    out, todo = [], [root]
    while todo and len(out) < 10000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids):
    """CPU of the given processes, including children they have reaped
    (cutime/cstime): for a process tree, Postfix's short-lived smtpd/smtp/
    cleanup processes are counted through master's cutime once they exit."""
    total = 0
    for pid in pids:
        st = read_stat(pid)
        if st:
            total += st[1]
    return total / CLK


# ---------------------------------------------------------------- binaries
def bin_candidates(bin_dir=None, extra=()):
    """Where release binaries are looked for: `bin_dir` if given, else
    $CARGO_TARGET_DIR/release, then `extra`, then <repo>/target/release."""
    if bin_dir:
        return [bin_dir]
    cands = []
    if os.environ.get("CARGO_TARGET_DIR"):
        cands.append(os.path.join(os.environ["CARGO_TARGET_DIR"], "release"))
    return cands + list(extra) + [os.path.join(REPO, "target", "release")]


def find_bin_dir(cands, binaries):
    """The first of `cands` holding every one of `binaries` (None: none)."""
    for d in cands:
        if all(os.access(os.path.join(d, b), os.X_OK) for b in binaries):
            return d
    return None


# ---------------------------------------------------------------- machine
def machine(**extra):
    """The machine and build a result was measured on; `extra` adds fields."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    m = {
        "nproc": os.cpu_count(),
        "nproc_available": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "memory_bytes": mem,
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "os": cmd_out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "tern_commit": cmd_out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]),
        "tern_worktree_dirty": bool(cmd_out(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])),
        "python": platform.python_version(),
    }
    m.update(extra)
    return m


def cmd_out(cmd):
    """A command's stdout, stripped ("" when it fails)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def binary_info(path):
    """Version and build time of a binary, for the machine description."""
    return {
        "ternd_version": cmd_out([path, "--version"]),
        "ternd_binary": path,
        "ternd_binary_mtime": datetime.datetime.fromtimestamp(
            os.path.getmtime(path), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------- ternd
def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def wait_ternd_ready(p, stdout_path, stderr_path, timeout, who="ternd"):
    """Waits for `ready` in a ternd's stdout file; returns the `listening`
    addresses it printed ({"smtp": "127.0.0.1:PORT", ...})."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = tail(stdout_path, 2000)
        listening = dict(re.findall(r"^listening (\w+)=(\S+)$", out, re.M))
        if re.search(r"^ready$", out, re.M) and "smtp" in listening:
            return listening
        if p.poll() is not None:
            raise BenchError(f"{who} exited {p.returncode}: " + tail(stderr_path, 1500))
        time.sleep(0.05)
    raise BenchError(f"{who} not ready after {timeout:.0f}s: " + tail(stderr_path, 1500))


def ternd_env(rust_log=None):
    """The environment for ternd: its documented default log level unless `rust_log`."""
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    if rust_log:
        env["RUST_LOG"] = rust_log
    return env


# ---------------------------------------------------------------- sizes
def parse_size(s):
    s = s.strip().lower()
    mult = 1
    for suf, m in (("kib", 1024), ("kb", 1024), ("k", 1024), ("mib", 2**20), ("m", 2**20)):
        if s.endswith(suf):
            s, mult = s[: -len(suf)], m
            break
    return int(float(s) * mult)


def size_label(n):
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} B"
