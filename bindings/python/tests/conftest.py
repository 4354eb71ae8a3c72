"""Fixtures: a real `keepwire serve` (port 0, its first stdout line is the
URL), users made with `keepwire admin user add`, and helpers that wait for a
condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

import keepwire

ROOT = Path(__file__).resolve().parents[3]
T = 30.0


def keepwire_bin() -> str:
    path = os.environ.get("KEEPWIRE_BIN") or str(ROOT / "target" / "debug" / "keepwire")
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            f"{path} is missing: build it with `cargo build -p keepwire` or set KEEPWIRE_BIN"
        )
    return path


def wait_until(cond: Callable[[], bool], what: str, within: float = T) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Relay:
    """A `keepwire serve` child process (KW_RELAY_LOG=1 keeps its stderr in
    relay.db.log; with KEEPWIRE_LOG=info it logs every session's resume)."""

    def __init__(self, tmp: Path, extra: Optional[List[str]] = None) -> None:
        self.db = tmp / "relay.db"
        self.extra = extra or []
        self.proc: Optional[subprocess.Popen] = None
        self.listen = "127.0.0.1:0"
        self.url = ""
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [keepwire_bin(), "serve", "--listen", self.listen, "--db", str(self.db), *self.extra],
            stdout=subprocess.PIPE,
            stderr=open(str(self.db) + ".log", "a") if os.environ.get("KW_RELAY_LOG") else subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("ws://"):
            raise RuntimeError(f"the relay did not start: {line!r}")
        self.url = line
        # Restarts listen on the same port.
        self.listen = line[len("ws://") :]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def user(self, name: str) -> str:
        out = subprocess.run(
            [keepwire_bin(), "admin", "--db", str(self.db), "user", "add", name],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = Relay(tmp_path)
    yield r
    r.stop()


JWT_SECRET = b"python-binding-tests-secret-of-enough-length"


@pytest.fixture
def jwt_relay(tmp_path: Path) -> Iterator[Relay]:
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(JWT_SECRET)
    r = Relay(tmp_path, ["--jwt-secret-file", str(secret)])
    yield r
    r.stop()


def jwt(user: str, ttl: int) -> str:
    """An HS256 token for `user` valid `ttl` seconds."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": user, "iat": now, "exp": now + ttl}).encode())
    sig = hmac.new(JWT_SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def thread_name() -> str:
    """The OS name of the calling thread (Python calls threads it did not
    start "Dummy-N"; the kernel knows the name Rust gave it, cut to 15 bytes)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()
    except OSError:
        return threading.current_thread().name


class Recorder:
    """An event listener that keeps what it hears (thread-safe)."""

    def __init__(self) -> None:
        self.events: List[keepwire.Event] = []
        self.lock = threading.Lock()
        self.threads: set = set()

    def on_event(self, event: keepwire.Event) -> None:
        with self.lock:
            self.events.append(event)
            self.threads.add(thread_name())

    def of(self, kind: str) -> List[keepwire.Event]:
        with self.lock:
            return [e for e in self.events if getattr(e, f"is_{kind}")()]

    def messages(self) -> List[keepwire.Message]:
        return [e.message for e in self.of("message_received")]

    def notifications(self) -> List[keepwire.Notification]:
        return [e.notification for e in self.of("show_notification")]


def connected(client: keepwire.Client) -> keepwire.Client:
    client.wait_connected(int(T * 1000))
    return client
