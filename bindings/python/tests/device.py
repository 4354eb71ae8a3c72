"""A keepwire app process for the two-process tests: commands on stdin, one
answer line each on stdout. `fg`, `bg` (set_app_state), `wait` (connected),
`count CONV`, `shown` (notifications heard), `quit`."""

import sys
import threading

import keepwire


class Heard:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.notified = []

    def on_event(self, event) -> None:
        if event.is_show_notification():
            with self.lock:
                self.notified.extend(event.notification.message_ids)


def main() -> None:
    home, url, token = sys.argv[1:4]
    client = keepwire.Client(home)
    heard = Heard()
    client.set_listener(heard)
    client.login(url, token)
    client.wait_connected(30_000)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words == ["fg"]:
            client.set_app_state(keepwire.AppState.FOREGROUND)
            answer = "ok"
        elif words == ["bg"]:
            client.set_app_state(keepwire.AppState.BACKGROUND)
            answer = "ok"
        elif words == ["wait"]:
            client.wait_connected(30_000)
            answer = "connected"
        elif words[:1] == ["count"]:
            answer = str(len(client.messages(int(words[1]), 100_000)))
        elif words == ["shown"]:
            with heard.lock:
                answer = " ".join(map(str, heard.notified)) or "-"
        elif words == ["quit"]:
            client.close()
            print("bye", flush=True)
            return
        else:
            answer = f"unknown command {line.strip()!r}"
        print(answer, flush=True)


if __name__ == "__main__":
    main()
