#!/usr/bin/env python3
"""Walks README.md top to bottom as a new user would, and fails where it breaks.

Every command of the README's ```sh blocks is run, in order, by one bash
script generated from them (`--print` shows it), with the built `keepwire`
first on PATH, in a scratch HOME and working directory; every ```toml block
whose first line names its file (`# /etc/keepwire/x.toml — COMMAND`) is
written there and its command run. A command that fails stops the walk with
its README line. The walk changes only what a machine-independent run must:

* addresses: every relay listens on one free loopback port, which replaces
  the README's `127.0.0.1:7447` and `relay.example:7447` (`relay.example`
  becomes `localhost`); `db.internal` and `nats.internal` are the local
  PostgreSQL (a scratch database, dropped at the end) and NATS;
* absolute paths (`/etc/keepwire`, `/var/lib/keepwire`, `/tmp/...`) move under
  the scratch directory;
* what the reader brings is made up: a JWT secret file, and fake FCM and APNs
  credentials (well-formed keys; nothing is sent to Google or Apple);
* `keepwire serve` runs in the background (the next one replaces it; nodes
  with `--bus` run side by side), `keepwire tail` for a few seconds, and
  `curl -s` fails on an HTTP error (`--fail-with-body`);
* optional parts of a synopsis (`[--json]`) are left out;
* a few lines are skipped, each with its reason in SKIPS below (printed).

Usage: python3 scripts/readme_walk.py [--bin target/debug] [--print] [--keep]
Needs PostgreSQL on 127.0.0.1:5432 and NATS on 127.0.0.1:4222 (as CI has);
`--no-cluster` skips the PostgreSQL and NATS sections.
"""

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (regex on the command, reason): lines the walk cannot run on a CI machine.
SKIPS = [
    (r"^cargo install ", "the walk runs the binaries built in this checkout"),
    (r"^cargo test ", "CI's own test stage runs it"),
    (r"^systemctl --user ", "no systemd user manager on CI machines (the units are checked by a test with systemd-analyze verify)"),
    (r"--jwks-url https://auth\.example", "needs a reachable JWKS server (tests cover JWKS with a local one)"),
    (r"^keepwire serve --tls-cert relay\.pem", "a template: the tls-init block below runs it with real files"),
    (r"^keepwire login --server wss://relay\.example:7447 --token-file alice\.token --ca-cert my-ca\.pem", "a template: the tls-init block below runs it with real files"),
    (r"^keepwire outbox drop CID", "the walk's outbox is empty: there is no CID to drop"),
    (r"--endpoint https://push\.example/", "the relay checks a UnifiedPush endpoint with a GET at registration: needs a reachable push service (tests use a local one)"),
]

# Literal replacements, applied to every command and written file, in order.
def replacements(w, port, pgdb):
    return [
        ("/tmp/", f"{w}/tmp/"),  # first: the scratch directory is under /tmp too
        ("/etc/keepwire", f"{w}/etc/keepwire"),
        ("/var/lib/keepwire", f"{w}/var/lib/keepwire"),
        ("postgres://keepwire@db.internal:5432/keepwire", f"postgres://postgres@127.0.0.1:5432/{pgdb}"),
        ("createdb keepwire", f"createdb -h 127.0.0.1 -U postgres {pgdb}"),
        ("nats://nats.internal:4222", "nats://127.0.0.1:4222"),
        ("127.0.0.1:7447", f"127.0.0.1:{port}"),
        ("wss://relay.example:7447", f"wss://localhost:{port}"),
        ("--host relay.example", "--host localhost"),
        ("--token-file FILE", "--token-file alice.token"),
        ("KEY=kwk_...", 'KEY="$WALK_API_KEY"'),
    ]


def blocks(readme):
    """(language, first line number, [(line number, command)]) per fenced block,
    with backslash continuations joined."""
    out, lang, start, cmds, pending = [], None, 0, [], None
    for n, line in enumerate(open(readme, encoding="utf-8"), 1):
        line = line.rstrip("\n")
        if lang is None:
            m = re.match(r"^```(\w+)\s*$", line)
            if m:
                lang, start, cmds = m.group(1), n, []
            continue
        if line.startswith("```"):
            out.append((lang, start, cmds))
            lang = None
            continue
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        else:
            pending = (n, line)
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
            continue
        cmds.append(pending)
        pending = None
    return out


def strip_comment(cmd):
    """The command without its trailing `# comment` (quotes respected)."""
    quote, i = None, 0
    while i < len(cmd):
        c = cmd[i]
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or cmd[i - 1] in " \t"):
            return cmd[:i].rstrip()
        i += 1
    return cmd.rstrip()


def translate(cmd, repl):
    """The bash lines that run one README command (None: not a command)."""
    cmd = strip_comment(cmd)
    if not cmd or re.match(r"^(ws|wss)://", cmd):
        return None  # an empty line, or output shown beside the commands
    for pattern, reason in SKIPS:
        if re.search(pattern, cmd):
            return f"walk_skip {shlex.quote(cmd)} {shlex.quote(reason)}"
    cmd = re.sub(r" \[[^\]]*\]", "", cmd)  # optional parts of a synopsis
    cmd = cmd.replace("CID|--all", "--all")
    for old, new in repl:
        cmd = cmd.replace(old, new)
    if cmd.startswith("keepwire serve"):
        args = re.sub(r"--listen \S+", "", cmd[len("keepwire serve"):]).strip()
        if "--bus" in args:
            return f"walk_node {args}"
        return f"walk_serve {args}"
    if cmd.startswith("keepwire tail"):
        return f"{cmd} & walk_for_a_while $!"
    if cmd.startswith("curl -s "):
        cmd = "curl -sS --fail-with-body " + cmd[len("curl -s "):] + "; echo"
    if "REG-ID" in cmd:  # the id `keepwire push status` shows
        cmd = cmd.replace("'{\"data\":{\"kw\":\"REG-ID\"}}'", '"{\\"data\\":{\\"kw\\":\\"$WALK_REG\\"}}"')
        cmd = ("WALK_REG=$(keepwire push status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"id\"])'); "
               + cmd)
    m = re.match(r"^keepwire admin api-key create (\S+)$", cmd)
    if m:
        return f'WALK_API_KEY=$(keepwire admin api-key create {m.group(1)}); echo "${{WALK_API_KEY:0:8}}..."'
    return cmd


PRELUDE = r"""
set -euo pipefail
walk_line() { printf '\n== README.md:%s: %s\n' "$1" "$2"; }
walk_skip() { printf '   skipped: %s\n' "$2"; }
WALK_RELAY=""; WALK_NODES=""
walk_stop() {
    for p in $WALK_RELAY $WALK_NODES; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    WALK_RELAY=""; WALK_NODES=""
}
trap walk_stop EXIT
walk_started() { # PID OUTFILE: waits for the relay's first line (its URL)
    for _ in $(seq 1 300); do
        [ -s "$2" ] && { head -1 "$2"; return 0; }
        kill -0 "$1" 2>/dev/null || { echo "the relay exited:"; cat "$2.err"; return 1; }
        sleep 0.1
    done
    echo "the relay did not start in 30 s:"; cat "$2.err"; return 1
}
walk_serve() {
    walk_stop
    local out="$WALK_DIR/serve.$RANDOM"
    keepwire serve --listen "127.0.0.1:$WALK_PORT" "$@" >"$out" 2>"$out.err" &
    WALK_RELAY=$!
    walk_started "$WALK_RELAY" "$out"
}
walk_node() {
    [ -n "$WALK_RELAY" ] && { kill "$WALK_RELAY"; wait "$WALK_RELAY" 2>/dev/null || true; WALK_RELAY=""; }
    local out="$WALK_DIR/node.$RANDOM"
    keepwire serve --listen 127.0.0.1:0 "$@" >"$out" 2>"$out.err" &
    WALK_NODES="$WALK_NODES $!"
    walk_started "$!" "$out"
}
walk_for_a_while() { # PID: lets a long-running command run 3 s, then stops it
    sleep 3
    kill -0 "$1" 2>/dev/null || { wait "$1"; return; }
    kill -INT "$1"; wait "$1" || true
}
"""


def fake_credentials(etc):
    """What a reader brings to the push and JWT sections, made up."""
    os.makedirs(etc, exist_ok=True)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True).stdout
    rsa = run("openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048")
    import json
    with open(f"{etc}/fcm-service-account.json", "w") as f:
        json.dump({"type": "service_account", "project_id": "walk-demo",
                   "private_key_id": "0", "private_key": rsa,
                   "client_email": "walk@walk-demo.iam.gserviceaccount.com"}, f)
    ec = run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    with open(f"{etc}/AuthKey_ABC123DEFG.p8", "w") as f:
        f.write(ec)
    with open(f"{etc}/jwt.secret", "wb") as f:
        f.write(os.urandom(48).hex().encode())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(readme, w, port, pgdb, cluster):
    repl = replacements(w, port, pgdb)
    lines = [PRELUDE]
    section = None
    heads = {n: l.rstrip() for n, l in enumerate(open(readme, encoding="utf-8"), 1) if l.startswith("#")}
    for lang, start, cmds in blocks(readme):
        section = max((n for n in heads if n < start), default=0)
        title = heads.get(section, "")
        needs_cluster = any(s in title for s in ("PostgreSQL", "Several relays"))
        if needs_cluster and not cluster:
            lines.append(f"walk_skip {shlex.quote(title)} 'the cluster sections (--no-cluster)'")
            continue
        if lang == "toml":
            first = cmds[0][1] if cmds else ""
            m = re.match(r"^# (/\S+\.toml) — (.+)$", first)
            if not m:
                continue  # an excerpt, not a whole file
            path, command = m.group(1), m.group(2)
            body = "\n".join(c for _, c in cmds) + "\n"
            for old, new in repl:
                body = body.replace(old, new)
                path = path.replace(old, new)
            body = re.sub(r'(?m)^listen = ".*"$', f'listen = "127.0.0.1:{port}"', body)
            lines.append(f"walk_line {start} {shlex.quote('write ' + m.group(1))}")
            lines.append(f"mkdir -p {shlex.quote(os.path.dirname(path))}")
            lines.append(f"cat > {shlex.quote(path)} <<'WALK_EOF'\n{body}WALK_EOF")
            bash = translate(command, repl)
            lines.append(f"walk_line {start} {shlex.quote(command)}")
            lines.append(bash)
            continue
        if lang != "sh":
            continue
        for n, cmd in cmds:
            bash = translate(cmd, repl)
            if bash is None:
                continue
            lines.append(f"walk_line {n} {shlex.quote(strip_comment(cmd))}")
            lines.append(bash)
    return "\n".join(lines) + "\n\nwalk_stop\necho\necho '== the README walk is done: every command above worked'\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug"))
    ap.add_argument("--print", action="store_true", help="print the generated script and stop")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--no-cluster", action="store_true", help="skip the PostgreSQL and NATS sections")
    a = ap.parse_args()
    binary = os.path.join(os.path.abspath(a.bin), "keepwire")
    if not os.access(binary, os.X_OK):
        sys.exit(f"no {binary}: build it first (cargo build -p keepwire)")
    w = tempfile.mkdtemp(prefix="keepwire-readme-")
    port = free_port()
    pgdb = f"keepwire_walk_{os.getpid()}"
    text = script(os.path.join(ROOT, "README.md"), w, port, pgdb, not a.no_cluster)
    if a.print:
        print(text)
        shutil.rmtree(w)
        return
    home, work = f"{w}/home", f"{w}/work"
    os.makedirs(home)
    os.makedirs(work)
    os.makedirs(f"{w}/tmp")
    for d in ("contrib", "crates", "bindings"):
        os.symlink(os.path.join(ROOT, d), os.path.join(work, d))
    fake_credentials(f"{w}/etc/keepwire")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEPWIRE_", "XDG_"))}
    env.update(HOME=home, WALK_DIR=w, WALK_PORT=str(port),
               PATH=os.path.dirname(binary) + os.pathsep + env.get("PATH", ""),
               DBUS_SESSION_BUS_ADDRESS="unix:path=/nonexistent",
               DBUS_SYSTEM_BUS_ADDRESS="unix:path=/nonexistent")
    path = f"{w}/walk.sh"
    with open(path, "w") as f:
        f.write(text)
    try:
        rc = subprocess.run(["bash", path], cwd=work, env=env).returncode
    finally:
        if not a.no_cluster:
            subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", pgdb],
                           capture_output=True)
        if a.keep or rc != 0:
            print(f"(scratch directory kept: {w})")
        else:
            shutil.rmtree(w, ignore_errors=True)
    if rc != 0:
        sys.exit("the README walk failed at the command above")


if __name__ == "__main__":
    main()
