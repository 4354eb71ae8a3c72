#!/usr/bin/env python3
"""Push wake-up cold start: a device process started by a push, with N
messages waiting and a proxy adding RTT, until the first notification is
shown; and its peak resident memory.

    python3 bench/wake.py [--bin target/release/keepwire] [--messages 10000]
                          [--rtt-ms 200] [--runs 3]

The relay and the proxy run locally (`keepwire serve`, `keepwire-chaos
proxy`, the binary beside `--bin`); the woken process is `keepwire push receive --json` on a copy of a
home that had synced before the messages arrived (what an app killed by the
OS keeps). Reported: medians over the runs of "push received -> first
notification line" and of the process's peak RSS (wait4's ru_maxrss).
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

FAST = ["--sends-per-sec", "100000", "--send-burst", "100000", "--api-rate", "100000",
        "--user-sends-per-sec", "100000"]


def run(bin_, *args, home=None, check=True):
    env = dict(os.environ, KEEPWIRE_LOG="warn", KEEPWIRE_TOKEN_STORE="file")
    if home:
        env["KEEPWIRE_HOME"] = home
    p = subprocess.run([bin_, *args], env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout.strip()


def publish(host_port, key, conv, n):
    """n messages from alice into conv over one keep-alive connection."""
    c = http.client.HTTPConnection(host_port)
    for i in range(n):
        body = json.dumps({"from": "alice", "body": f"waiting message {i:05}",
                           "idempotency_key": f"wake-{i}"})
        c.request("POST", f"/v1/conversations/{conv}/messages", body,
                  {"Authorization": f"Bearer {key}",
                   "Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status >= 300:
            sys.exit(f"publish {i}: HTTP {r.status}")


def wake_once(bin_, home):
    """Starts `push receive` as the OS would; returns (seconds to the first
    notification line, peak RSS in MiB, the process's own summary)."""
    env = dict(os.environ, KEEPWIRE_HOME=home, KEEPWIRE_LOG="warn",
               KEEPWIRE_TOKEN_STORE="file")
    t0 = time.monotonic()
    p = subprocess.Popen([bin_, "push", "receive", "--json"], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    t_first = time.monotonic() - t0
    rest = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0 or not first:
        sys.exit(f"push receive failed ({status}): {err.strip()}")
    shown = json.loads(first)
    return t_first, usage.ru_maxrss / 1024, shown, err.strip(), rest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("KEEPWIRE_BIN", "target/release/keepwire"))
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--rtt-ms", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-window", type=int, default=None,
                    help="the relay's largest credit window (512 = before hello.window)")
    a = ap.parse_args()
    bin_ = os.path.abspath(a.bin)
    tmp = tempfile.mkdtemp(prefix="kw-wake-")
    procs = []
    try:
        db = os.path.join(tmp, "relay.db")
        run(bin_, "admin", "--db", db, "init")
        ta = run(bin_, "admin", "--db", db, "user", "add", "alice")
        tb = run(bin_, "admin", "--db", db, "user", "add", "bob")
        key = run(bin_, "admin", "--db", db, "api-key", "create", "wake-bench")
        window = ["--max-window", str(a.max_window)] if a.max_window else []
        relay = subprocess.Popen([bin_, "serve", "--listen", "127.0.0.1:0", "--db", db, *FAST, *window],
                                 env=dict(os.environ, KEEPWIRE_LOG="warn"),
                                 stdout=subprocess.PIPE, text=True)
        procs.append(relay)
        url = relay.stdout.readline().strip()
        host_port = url.split("://", 1)[1]
        chaos_bin = os.path.join(os.path.dirname(bin_), "keepwire-chaos")
        proxy = subprocess.Popen([chaos_bin, "proxy", "--upstream", host_port],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proxy)
        proxy_addr = proxy.stdout.readline().strip()
        proxy.stdin.write(f"latency {a.rtt_ms // 2}ms\n")
        proxy.stdin.flush()
        alice, bob = os.path.join(tmp, "alice"), os.path.join(tmp, "bob")
        run(bin_, "login", "--server", url, "--token", ta, home=alice)
        run(bin_, "login", "--server", f"ws://{proxy_addr}", "--token", tb, home=bob)
        conv = run(bin_, "conv", "create", "bob", home=alice)
        run(bin_, "sync", home=bob)
        pristine = os.path.join(tmp, "bob.pristine")
        shutil.copytree(bob, pristine)
        t = time.monotonic()
        publish(host_port, key, conv, a.messages)
        print(f"published {a.messages} messages in {time.monotonic() - t:.1f}s", file=sys.stderr)
        firsts, rss = [], []
        for i in range(a.runs):
            shutil.rmtree(bob)
            shutil.copytree(pristine, bob)
            t_first, mib, shown, summary, _ = wake_once(bin_, bob)
            print(f"run {i + 1}: first notification {t_first:.2f}s, peak RSS {mib:.1f} MiB, "
                  f"unread {shown['unread']}; {summary}", file=sys.stderr)
            firsts.append(t_first)
            rss.append(mib)
        print(json.dumps({
            "messages": a.messages, "rtt_ms": a.rtt_ms, "runs": a.runs, "bin": a.bin,
            "first_notification_s_median": round(statistics.median(firsts), 3),
            "peak_rss_mib_median": round(statistics.median(rss), 1),
            "first_notification_s": [round(x, 3) for x in firsts],
            "peak_rss_mib": [round(x, 1) for x in rss],
        }))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
