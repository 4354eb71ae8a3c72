"""Two OS processes on one home, with iOS's rules: the app goes to the
background (wake-only: connection closed, lock released before
set_app_state returns) and is suspended (SIGSTOP); a push wake-up in
another process (the notification service extension) syncs within its
deadline and shows each message once; after SIGCONT the app reconnects.
Then the app is suspended while still holding the home: the extension
connects as a transient connection beside it, and the thawed app comes back
(4012) instead of stopping as replaced. Nothing is delivered or shown twice
and the store is intact."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import keepwire

from conftest import T, connected, wait_until

HERE = Path(__file__).resolve().parent


class App:
    def __init__(self, home: Path, url: str, token: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "device.py"), str(home), url, token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.read() == "ready"

    def read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            try:
                assert self.ask("quit") == "bye"
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def test_a_suspended_app_and_its_extension_share_one_home(relay, tmp_path: Path) -> None:
    ta, tb = relay.user("alice"), relay.user("bob")
    home = tmp_path / "alice-phone"
    bob = keepwire.Client(str(tmp_path / "bob"))
    bob.login(relay.url, tb)
    connected(bob)
    app = App(home, relay.url, ta)
    try:
        conv = bob.create_conversation(["alice"], None, False)
        bob.send(conv.id, "before")
        wait_until(lambda: app.ask(f"count {conv.id}") == "1", "the app to store the first")

        # 1. The app goes to the background properly, then iOS suspends it.
        assert app.ask("bg") == "ok"
        app.signal(signal.SIGSTOP)
        for i in range(20):
            bob.send(conv.id, f"while suspended {i}")
        # Stored by the relay: bob's own copies came back through his inbox.
        wait_until(lambda: len(bob.messages(conv.id)) == 21, "bob's sends stored")
        ext = keepwire.Client(str(home))
        started = time.monotonic()
        result = ext.on_push(b"kw", 10_000)
        took = time.monotonic() - started
        assert took < 10.0, took
        assert result.report.outcome == keepwire.SyncOutcome.CAUGHT_UP(), result
        assert result.report.received == 20
        assert len(result.show) == 1 and len(result.show[0].message_ids) == 20, result
        ext.close()

        # The app thaws and comes to the front: it reconnects and has them all.
        app.signal(signal.SIGCONT)
        assert app.ask("fg") == "ok"
        assert app.ask("wait") == "connected"
        bob.send(conv.id, "after")
        wait_until(lambda: app.ask(f"count {conv.id}") == "22", "the app to catch up")
        assert app.ask("shown") == "-", "the app showed nothing the extension showed"

        # 2. Suspended while holding the home (it never went to the
        # background, so it never let go of the lock): the holder does not
        # answer, so the extension connects as a transient connection
        # (PROTOCOL.md §2, `hello.transient`) and fetches the message within
        # its deadline; the relay tells the frozen connection to come back
        # (4012), so the app reconnects when it thaws instead of stopping as
        # replaced (4005).
        app.signal(signal.SIGSTOP)
        bob.send(conv.id, "to a frozen holder")
        wait_until(lambda: len(bob.messages(conv.id)) == 23, "bob's send stored")
        ext = keepwire.Client(str(home))
        started = time.monotonic()
        woken = ext.on_push(b"kw", 5_000)
        took = time.monotonic() - started
        assert woken.report.outcome == keepwire.SyncOutcome.CAUGHT_UP(), woken
        assert woken.report.received == 1 and len(woken.show) == 1, woken
        assert took < 5.0, took
        ext.close()
        app.signal(signal.SIGCONT)
        wait_until(lambda: app.ask(f"count {conv.id}") == "23", "the thawed holder to see it")
        bob.send(conv.id, "after the thaw")
        wait_until(lambda: app.ask(f"count {conv.id}") == "24", "the thawed holder to reconnect")
    finally:
        app.close()
        bob.close()

    # Nothing twice, nothing corrupted.
    db = sqlite3.connect(home / "client.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        seqs = [r[0] for r in db.execute("SELECT conv_seq FROM messages ORDER BY conv_seq")]
        assert seqs == list(range(1, 25)), seqs
        shown = [r[0] for r in db.execute("SELECT message_id FROM notified WHERE shown = 1")]
        assert len(shown) == len(set(shown)) == 21, shown
    finally:
        db.close()
