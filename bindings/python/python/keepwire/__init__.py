"""keepwire: a chat app's connection that survives backgrounding, crashes
and outages — every message exactly once, in order, notified at most once.

The classes come from keepwire's Rust client engine through UniFFI
(``keepwire.keepwire_ffi``, generated; every method has type hints)::

    import keepwire

    client = keepwire.Client("/tmp/alice")          # the device's store
    client.login("ws://127.0.0.1:7447", token)      # saves it, connects
    cid = client.send(conv, "hello")                # durable in the outbox
    client.messages(conv)                           # [keepwire.Message, ...]
    client.set_listener(listener)                   # listener.on_event(event)
    client.set_app_state(keepwire.AppState.BACKGROUND)
    report = client.sync_once(10_000)               # within 10 s
    client.close()

Errors are ``keepwire.KeepwireError`` subclasses (``NotLoggedIn``,
``InvalidInput``, ``NotConnected``, ``Refused``, ``Stopped``, ``Timeout``,
``Storage``, ``Closed``). Listener callbacks run on a thread of the
library, one at a time; they may call the client.
"""

from .keepwire_ffi import *  # noqa: F401,F403
from .keepwire_ffi import (  # noqa: F401
    AppState,
    BackgroundPolicy,
    Client,
    ConnectionState,
    Conversation,
    Event,
    EventListener,
    KeepwireError,
    Message,
    Network,
    Notification,
    Prefs,
    PushRegistration,
    PushResult,
    PushStatus,
    Stats,
    Status,
    StopReason,
    SyncOutcome,
    SyncReport,
    TokenProvider,
    runtime_worker_threads,
)

__all__ = [
    "AppState",
    "BackgroundPolicy",
    "Client",
    "ConnectionState",
    "Conversation",
    "Event",
    "EventListener",
    "KeepwireError",
    "Message",
    "Network",
    "Notification",
    "Prefs",
    "PushRegistration",
    "PushResult",
    "PushStatus",
    "Stats",
    "Status",
    "StopReason",
    "SyncOutcome",
    "SyncReport",
    "TokenProvider",
    "runtime_worker_threads",
]
