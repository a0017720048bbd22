#!/usr/bin/env python3
"""Lifeboat lab: turns the lab BMCs' power changes into power changes of the simulated hosts.

Every lab BMC is a sushy-emulator (fake driver) whose one system has 'external_notifier': True:
whenever the system changes, the emulator PUTs the system's JSON to
EXTERNAL_NOTIFICATION_URL = http://127.0.0.1:PORT/HOST (inside the BMC network namespace).
This listener acts on the *applied* changes (no 'pending_power' left):

  power_state Off -> the host's power is cut: SIGKILL to the host's PID-namespace init at once
                     (before answering, so the emulator's answer "Off" comes after the kill),
                     then `lab.sh host-kill HOST` waits until every process of the host is gone;
  power_state On  -> `lab.sh host-boot HOST`, in the background (a real host also boots after
                     its BMC reads On).

A change the lab makes itself (`lab.sh host-kill`, a crash/hang) never reaches the BMC: a hung
host still reads On.

The process runs in the machine's own network namespace (so the lab.sh it runs behaves as if an
operator ran it) but its listening socket lives in the BMC namespace: it enters that namespace
(setns) only to create the socket. Python standard library only.
"""

import argparse
import ctypes
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLONE_NEWNET = 0x40000000
HOST_RE = re.compile(r"^host-[a-z]$")

ARGS = None
_libc = ctypes.CDLL(None, use_errno=True)
_boot_queues = {}
_boot_lock = threading.Lock()


def log(msg):
    print(time.strftime("%Y-%m-%dT%H:%M:%S") + f" {msg}", flush=True)


def setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def proc_state_and_start(pid):
    """(state letter, start time) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat.rsplit(") ", 1)[1].split()
    return rest[0], rest[19]


def lab_hosts():
    try:
        with open(os.path.join(ARGS.lab_dir, "lab.env")) as f:
            m = re.search(r'^LAB_HOSTS="([^"]*)"', f.read(), re.M)
            return m.group(1).split() if m else []
    except OSError:
        return []


def run_lab(*args, timeout):
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            [ARGS.lab_sh, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            text=True,
        )
        out = " | ".join(line for line in p.stdout.splitlines() if line.strip())
        log(f"lab.sh {' '.join(args)}: exit {p.returncode} in {time.monotonic() - t0:.2f} s: {out}")
        return p.returncode == 0
    except subprocess.TimeoutExpired:
        log(f"lab.sh {' '.join(args)}: did not finish within {timeout} s")
        return False


def cut_power(host):
    """SIGKILL the host's init now (the kernel kills its whole PID namespace), then let lab.sh
    wait for the rest and tidy up."""
    pidfile = os.path.join(ARGS.lab_dir, "hosts", host, "init.pid")
    try:
        with open(pidfile) as f:
            pid_s, start = f.read().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        pid = None
    if pid is not None:
        st = proc_state_and_start(pid)
        if st is not None and st[1] == start and st[0] not in ("Z", "X", "x"):
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                st = proc_state_and_start(pid)
                if st is None or st[0] in ("Z", "X", "x"):
                    break
                time.sleep(0.005)
            log(f"{host}: power cut (SIGKILL to init pid {pid})")
        else:
            log(f"{host}: already off")
    run_lab("host-kill", host, timeout=15)


def boot_worker(host, q):
    while True:
        q.get()
        # several queued boots collapse into one (host-boot is a no-op when on)
        while not q.empty():
            q.get_nowait()
        run_lab("host-boot", host, timeout=120)


def queue_boot(host):
    with _boot_lock:
        q = _boot_queues.get(host)
        if q is None:
            q = queue.Queue()
            _boot_queues[host] = q
            threading.Thread(target=boot_worker, args=(host, q), daemon=True).start()
    q.put(1)


class Handler(BaseHTTPRequestHandler):
    server_version = "lifeboat-lab-bmc-listener/1"

    def log_message(self, fmt, *args):  # quiet: we log what matters ourselves
        pass

    def answer(self, code, text=""):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        host = self.path.strip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not HOST_RE.match(host) or host not in lab_hosts():
            log(f"PUT {self.path}: not a lab host (hosts: {' '.join(lab_hosts())})")
            return self.answer(404, "unknown host\n")
        try:
            system = json.loads(raw or b"{}")
        except ValueError as e:
            log(f"{host}: PUT with invalid JSON: {e}")
            return self.answer(400, "invalid JSON\n")
        power = system.get("power_state")
        pending = system.get("pending_power")
        if pending:
            log(f"{host}: BMC accepted a change to {pending.get('power_state')} (applies at {pending.get('apply_time')}); now {power}")
            return self.answer(204)
        log(f"{host}: BMC now reads {power}")
        if power == "Off":
            cut_power(host)
        elif power == "On":
            queue_boot(host)
        return self.answer(204)


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", required=True, help="network namespace to listen in (lb-bmc)")
    ap.add_argument("--listen", default="127.0.0.1", help="address inside that namespace")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--lab-dir", required=True)
    ap.add_argument("--lab-sh", required=True)
    ARGS = ap.parse_args()

    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ARGS.netns}", os.O_RDONLY)
    try:
        setns(target)
        server = ThreadingHTTPServer((ARGS.listen, ARGS.port), Handler)
    finally:
        setns(own)
        os.close(own)
        os.close(target)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log(f"listening on {ARGS.listen}:{ARGS.port} in network namespace {ARGS.netns} (pid {os.getpid()})")
    server.serve_forever()


if __name__ == "__main__":
    main()
