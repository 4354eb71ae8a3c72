"""The Python binding against a real relay: login, send and receive between
two clients, background notifications, sync_once against a relay that is
down and then up, push wake-ups, a token provider that refreshes once,
callbacks that call the client, and a prompt exit after close()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import keepwire

from conftest import T, Recorder, connected, jwt, thread_name, wait_until

MS = int(T * 1000)


def test_the_module_loads_and_its_runtime_has_at_most_two_workers() -> None:
    # Importing checks the library's contract and checksums against the
    # generated code: a mismatch fails here, loudly.
    assert 1 <= keepwire.runtime_worker_threads() <= 2
    assert keepwire.Client.__init__.__annotations__, "type hints"


def test_bad_input_gets_clear_errors(tmp_path: Path) -> None:
    c = keepwire.Client(str(tmp_path / "home"))
    with pytest.raises(keepwire.KeepwireError.NotLoggedIn):
        c.send(1, "before login")
    with pytest.raises(keepwire.KeepwireError.InvalidInput, match="ws://"):
        c.login("http://127.0.0.1:1", "kw_x")
    with pytest.raises(keepwire.KeepwireError.InvalidInput, match="HH:MM"):
        c.set_prefs(keepwire.Prefs(muted=[], quiet_hours="late", previews=True,
                                   background=keepwire.BackgroundPolicy.WAKE_ONLY()))
    c.close()
    with pytest.raises(keepwire.KeepwireError.Closed):
        c.messages(1)


def test_two_clients_send_and_receive(relay, tmp_path: Path) -> None:
    ta, tb = relay.user("alice"), relay.user("bob")
    alice = keepwire.Client(str(tmp_path / "alice"))
    bob = keepwire.Client(str(tmp_path / "bob"))
    heard_a, heard_b = Recorder(), Recorder()
    alice.set_listener(heard_a)
    bob.set_listener(heard_b)
    alice.login(relay.url, ta)
    bob.login(relay.url, tb)
    connected(alice)
    connected(bob)
    conv = alice.create_conversation(["bob"], None, False)
    assert not conv.group and sorted(conv.members) == ["alice", "bob"]
    cids = [alice.send(conv.id, f"a{i}") for i in range(10)]
    assert len(set(cids)) == 10 and all(len(c) == 32 for c in cids)
    bob.send(conv.id, "hi alice")
    wait_until(lambda: len([m for m in heard_b.messages() if m.sender == "alice"]) == 10,
               "bob to hear alice's 10 messages")
    wait_until(lambda: len(heard_a.of("send_confirmed")) == 10, "alice's confirmations")
    assert {e.cid for e in heard_a.of("send_confirmed")} == set(cids)
    wait_until(lambda: len(alice.messages(conv.id)) == 11, "alice's store")
    bodies = [m.body for m in bob.messages(conv.id) if m.sender == "alice"]
    assert bodies == [f"a{i}" for i in range(10)], bodies
    assert [m.conv_seq for m in alice.messages(conv.id)] == list(range(1, 12))
    assert alice.messages(conv.id, limit=3)[-1].conv_seq == 11
    assert heard_a.threads == {"keepwire-callba"}, heard_a.threads  # comm: 15 bytes
    st = alice.status()
    assert st.holder and st.user == "alice" and st.outbox == 0
    assert st.state == keepwire.ConnectionState.CONNECTED()
    assert [c.id for c in bob.conversations()] == [conv.id]
    alice.close()
    bob.close()


def test_the_network_state_from_the_os_is_obeyed(relay, tmp_path: Path) -> None:
    alice = keepwire.Client(str(tmp_path / "alice"))
    alice.login(relay.url, relay.user("alice"))
    connected(alice)
    alice.set_network(keepwire.Network.OFFLINE())
    wait_until(lambda: alice.status().state == keepwire.ConnectionState.WAITING_FOR_NETWORK(),
               "no attempts while the OS says offline")
    alice.set_network(keepwire.Network.ONLINE(id="wifi:test"))
    connected(alice)
    alice.close()


def test_background_raises_a_notification_through_the_listener(relay, tmp_path: Path) -> None:
    ta, tb = relay.user("alice"), relay.user("bob")
    alice = keepwire.Client(str(tmp_path / "alice"))
    heard = Recorder()
    alice.set_listener(heard)
    # Stay connected in the background (an Android foreground service).
    prefs = alice.prefs()
    assert prefs.background == keepwire.BackgroundPolicy.WAKE_ONLY(), "the default for apps"
    prefs.background = keepwire.BackgroundPolicy.KEEP()
    alice.set_prefs(prefs)
    alice.login(relay.url, ta)
    connected(alice)
    bob = keepwire.Client(str(tmp_path / "bob"))
    bob.login(relay.url, tb)
    connected(bob)
    conv = bob.create_conversation(["alice"], None, False)
    bob.send(conv.id, "while you look")
    wait_until(lambda: len(heard.messages()) == 1, "the first message")
    assert heard.notifications() == [], "nothing while the app is in the foreground"
    alice.set_app_state(keepwire.AppState.BACKGROUND)
    for i in range(3):
        bob.send(conv.id, f"later {i}")
    wait_until(lambda: sum(len(n.message_ids) for n in heard.notifications()) == 3,
               "notifications for the 3 background messages")
    last = heard.notifications()[-1]
    assert last.conv == conv.id and last.tag == f"keepwire-conv-{conv.id}"
    assert (last.unread, last.title, last.body) == (3, "3 new messages from bob", "later 2")
    # The user taps it: foreground, read here and on the other devices.
    alice.notification_opened(conv.id)
    assert alice.status().state == keepwire.ConnectionState.CONNECTED()
    bob.send(conv.id, "seen?")
    wait_until(lambda: len(heard.messages()) == 5, "the next message")
    assert sum(len(n.message_ids) for n in heard.notifications()) == 3, "foreground again"
    stats = alice.stats(3_600_000)
    assert stats.notifications >= 1 and stats.connected_ms >= 0
    alice.close()
    bob.close()


def test_sync_once_against_a_relay_that_is_down_then_up(relay, tmp_path: Path) -> None:
    ta, tb = relay.user("alice"), relay.user("bob")
    bob = keepwire.Client(str(tmp_path / "bob"))
    bob.login(relay.url, tb)
    connected(bob)
    conv = bob.create_conversation(["alice"], None, False)
    # Alice's app: logged in once, then only woken by a periodic task.
    alice = keepwire.Client(str(tmp_path / "alice"))
    heard = Recorder()
    alice.set_listener(heard)
    alice.set_app_state(keepwire.AppState.BACKGROUND)
    alice.login(relay.url, ta)
    first = alice.sync_once(MS)
    assert first.outcome == keepwire.SyncOutcome.CAUGHT_UP(), first
    for i in range(5):
        bob.send(conv.id, f"m{i}")
    # Stored by the relay: bob's own copies came back through his inbox.
    wait_until(lambda: len(bob.messages(conv.id)) == 5, "bob's sends stored")
    relay.stop()
    started = time.monotonic()
    down = alice.sync_once(1500)
    took = time.monotonic() - started
    assert down.outcome.is_unreachable(), down
    assert took < 3.0, f"deadline honoured: {took:.2f}s"
    relay.start()
    up = alice.sync_once(MS)
    assert up.outcome == keepwire.SyncOutcome.CAUGHT_UP(), up
    assert up.received == 5
    assert [m.body for m in alice.messages(conv.id)] == [f"m{i}" for i in range(5)]
    # Queued before sync_once returned; delivered on the callback thread.
    wait_until(lambda: heard.notifications(), "the notification event")
    shown = heard.notifications()
    assert len(shown) == 1 and shown[0].unread == 5, shown
    assert alice.status().state == keepwire.ConnectionState.DORMANT()
    alice.close()
    bob.close()


def test_on_push_returns_what_to_show_and_a_token_provider_refreshes_once(
    jwt_relay, tmp_path: Path
) -> None:
    calls = []

    class Provider:
        def fetch_token(self):
            calls.append(thread_name())
            return jwt("alice", 3600)

    bob = keepwire.Client(str(tmp_path / "bob"))
    bob.login(jwt_relay.url, jwt("bob", 3600))
    connected(bob)
    alice = keepwire.Client(str(tmp_path / "alice"))
    heard = Recorder()
    alice.set_listener(heard)
    alice.set_token_provider(Provider())
    # Her first token expires while she is connected: the relay allows 30 s
    # of clock skew, so a token 25 s past its exp has about 5 s left.
    alice.login(jwt_relay.url, jwt("alice", -25))
    connected(alice)
    conv = bob.create_conversation(["alice"], None, False)
    wait_until(lambda: len(calls) == 1, "the refresh")
    for i in range(5):
        bob.send(conv.id, f"across expiry {i}")
    wait_until(lambda: len(heard.messages()) == 5, "messages across the expiry")
    assert len(calls) == 1, "exactly one refresh"
    assert calls[0].startswith("keepwire-rt"), calls  # a blocking thread of the runtime
    assert alice.status().state == keepwire.ConnectionState.CONNECTED()

    # Background (wake-only: disconnected), then a push wake-up.
    alice.set_app_state(keepwire.AppState.BACKGROUND)
    assert alice.status().state == keepwire.ConnectionState.DORMANT()
    for i in range(4):
        bob.send(conv.id, f"pushed {i}")
    wait_until(lambda: len(bob.messages(conv.id)) == 9, "bob's sends stored")
    result = alice.on_push(b"registration-id", 8000)
    assert result.report.outcome == keepwire.SyncOutcome.CAUGHT_UP(), result
    assert result.report.received == 4 and not result.joined
    assert len(result.show) == 1 and result.show[0].unread == 4, result
    assert result.show[0].body == "pushed 3"
    assert heard.notifications() == [], "handed back, not also raised as events"
    again = alice.on_push(b"registration-id", 8000)
    assert again.show == [], "at most once per message"
    with pytest.raises(keepwire.KeepwireError.InvalidInput):
        alice.on_push(b"x" * 5000, 1000)
    alice.close()
    bob.close()


def test_push_registration_and_mutes_go_through_the_relay(relay, tmp_path: Path) -> None:
    ta, tb = relay.user("alice"), relay.user("bob")
    bob = keepwire.Client(str(tmp_path / "bob"))
    bob.login(relay.url, tb)
    connected(bob)
    conv = bob.create_conversation(["alice"], None, False)
    assert bob.push_status().provider is None
    # Malformed: refused before anything is saved or sent.
    with pytest.raises(keepwire.KeepwireError.InvalidInput, match="FCM token"):
        bob.set_push_registration(keepwire.PushRegistration.FCM(token="not a token!"))
    # This relay has no push configuration: the refusal comes back, the
    # registration stays saved (sent once the relay offers FCM).
    with pytest.raises(keepwire.KeepwireError.Refused, match="offers no fcm"):
        bob.set_push_registration(keepwire.PushRegistration.FCM(token="fcm-token-1"))
    status = bob.push_status()
    assert status.provider == "fcm" and status.pending and "offers no fcm" in status.last_error
    gone = bob.clear_push_registration()
    assert gone.provider is None and not gone.pending, gone
    # A mute goes to the relay and to the user's other devices.
    assert bob.set_muted(conv.id, True) is True
    assert conv.id in bob.prefs().muted
    laptop = keepwire.Client(str(tmp_path / "bob-laptop"))
    laptop.login(relay.url, tb)
    assert laptop.sync_once(MS).outcome == keepwire.SyncOutcome.CAUGHT_UP()
    assert conv.id in laptop.prefs().muted
    laptop.close()
    bob.close()


def test_callbacks_may_call_the_client_even_close(relay, tmp_path: Path) -> None:
    ta, tb = relay.user("alice"), relay.user("bob")
    bob = keepwire.Client(str(tmp_path / "bob"))
    bob.login(relay.url, tb)
    connected(bob)
    conv = bob.create_conversation(["alice"], None, False)
    alice = keepwire.Client(str(tmp_path / "alice"))
    done = threading.Event()
    seen = []

    class Replier:
        def on_event(self, event):
            if event.is_message_received() and event.message.sender == "bob":
                # Re-entrant calls from the callback thread.
                seen.append(len(alice.messages(conv.id)))
                alice.status()
                alice.send(conv.id, "auto-reply to " + event.message.body)
                alice.set_app_state(keepwire.AppState.FOREGROUND)
                if event.message.body == "stop":
                    alice.close()
                    done.set()

    class Broken:
        def on_event(self, event):
            raise RuntimeError("a listener bug")

    alice.set_listener(Broken())
    alice.login(relay.url, ta)
    connected(alice)
    bob.send(conv.id, "into the broken listener")
    wait_until(lambda: len(alice.messages(conv.id)) == 1, "the first message stored")
    alice.set_listener(Replier())
    bob.send(conv.id, "ping")
    wait_until(lambda: any(m.body == "auto-reply to ping" for m in bob.messages(conv.id)),
               "the reply sent from inside a callback")
    bob.send(conv.id, "stop")
    assert done.wait(T), "close() from inside a callback returned"
    with pytest.raises(keepwire.KeepwireError.Closed):
        alice.send(conv.id, "after close")
    assert seen[0] >= 2
    bob.close()


def test_a_python_process_exits_promptly_after_close(relay, tmp_path: Path) -> None:
    token = relay.user("alice")
    script = textwrap.dedent(
        f"""
        import sys, time, keepwire
        class L:
            def on_event(self, e):
                pass
        c = keepwire.Client({str(tmp_path / 'alice')!r})
        c.set_listener(L())
        c.login({relay.url!r}, {token!r})
        c.wait_connected(30000)
        c.close()
        print("closed", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "closed"
    closed = time.monotonic()
    proc.wait(timeout=10)
    took = time.monotonic() - closed
    assert proc.returncode == 0
    assert took < 2.0, f"exited {took:.2f}s after close()"
