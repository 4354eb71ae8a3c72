//! The agent and the system bus: mock logind (`PrepareForSleep`) and mock
//! NetworkManager (state, primary connection) served with zbus on a private
//! `dbus-daemon` that the agent takes for its system bus
//! (`DBUS_SYSTEM_BUS_ADDRESS`), and a fault proxy between the agent and the
//! relay to kill its connection the way a sleep does.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keepwire_chaos::{Fault, FaultProxy};
use keepwire_testkit::{RelayProcess, TempDir, wait_until};
use serde_json::Value;
use zbus::OwnedObjectPath;
use zbus::object_server::SignalEmitter;

use crate::desktop::Bus;
use crate::{FAST, KillOnDrop, add_user, bin, kw_ok};

const LOGIN1_PATH: &str = "/org/freedesktop/login1";
const NM_PATH: &str = "/org/freedesktop/NetworkManager";
const HOME_NET: &str = "/org/freedesktop/NetworkManager/ActiveConnection/1";
const OFFICE_NET: &str = "/org/freedesktop/NetworkManager/ActiveConnection/2";
const HOME_UUID: &str = "5e1c2f8a-1111-4c3b-9d7e-0123456789ab";

struct MockLogind;

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl MockLogind {
    #[zbus(signal)]
    async fn prepare_for_sleep(emitter: &SignalEmitter<'_>, start: bool) -> zbus::Result<()>;

    #[zbus(property)]
    fn preparing_for_sleep(&self) -> bool {
        false
    }
}

struct MockNm {
    state: u32,
    primary: OwnedObjectPath,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager")]
impl MockNm {
    #[zbus(property)]
    fn state(&self) -> u32 {
        self.state
    }

    #[zbus(property)]
    fn primary_connection(&self) -> OwnedObjectPath {
        self.primary.clone()
    }

    /// `StateChanged` (named apart from the `State` property's own
    /// `state_changed`).
    #[zbus(signal, name = "StateChanged")]
    async fn state_signal(emitter: &SignalEmitter<'_>, state: u32) -> zbus::Result<()>;
}

struct MockActive {
    id: String,
    uuid: String,
    kind: String,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.Connection.Active")]
impl MockActive {
    #[zbus(property)]
    fn id(&self) -> String {
        self.id.clone()
    }

    #[zbus(property)]
    fn uuid(&self) -> String {
        self.uuid.clone()
    }

    #[zbus(property, name = "Type")]
    fn kind(&self) -> String {
        self.kind.clone()
    }
}

/// Serves a mock logind on `bus`.
async fn serve_logind(bus: &str) -> zbus::Connection {
    zbus::connection::Builder::address(bus)
        .name("org.freedesktop.login1")
        .serve_at(LOGIN1_PATH, MockLogind)
        .build()
        .await
        .expect("serve the mock logind")
}

async fn sleep_signal(logind: &zbus::Connection, start: bool) {
    let iface = logind
        .object_server()
        .interface::<_, MockLogind>(LOGIN1_PATH)
        .await
        .unwrap();
    MockLogind::prepare_for_sleep(iface.signal_emitter(), start)
        .await
        .unwrap();
}

/// Serves a mock NetworkManager on `bus`: connected (70) on "HomeNet"
/// (Wi-Fi), with "Office" (Ethernet) known too.
async fn serve_nm(bus: &str) -> zbus::Connection {
    let active = |id: &str, uuid: &str, kind: &str| MockActive {
        id: id.into(),
        uuid: uuid.into(),
        kind: kind.into(),
    };
    zbus::connection::Builder::address(bus)
        .name("org.freedesktop.NetworkManager")
        .serve_at(
            NM_PATH,
            MockNm {
                state: 70,
                primary: OwnedObjectPath::try_from(HOME_NET).unwrap(),
            },
        )
        .serve_at(HOME_NET, active("HomeNet", HOME_UUID, "802-11-wireless"))
        .serve_at(
            OFFICE_NET,
            active(
                "Office",
                "9f0e7d6c-2222-4b5a-8c9d-ba9876543210",
                "802-3-ethernet",
            ),
        )
        .build()
        .await
        .expect("serve the mock NetworkManager")
}

/// Switches the mock NetworkManager's state and primary connection, with
/// the signals the real one sends.
async fn nm_set(nm: &zbus::Connection, state: u32, primary: &str) {
    let iface = nm
        .object_server()
        .interface::<_, MockNm>(NM_PATH)
        .await
        .unwrap();
    {
        let mut m = iface.get_mut().await;
        m.state = state;
        m.primary = OwnedObjectPath::try_from(primary).unwrap();
    }
    let m = iface.get().await;
    m.primary_connection_changed(iface.signal_emitter())
        .await
        .unwrap();
    m.state_changed(iface.signal_emitter()).await.unwrap();
    MockNm::state_signal(iface.signal_emitter(), state)
        .await
        .unwrap();
}

/// Logs `home` in to `url` and starts its agent with `bus` as the system
/// bus; the agent's log goes to `log`.
fn start_agent(home: &Path, url: &str, token: &str, bus: &str, log: &Path) -> KillOnDrop {
    kw_ok(home, &["login", "--server", url, "--token", token]);
    KillOnDrop(
        Command::new(bin())
            .args(["agent", "--no-desktop"])
            .env("KEEPWIRE_HOME", home)
            // Debug for the client: its backoff waits.
            .env("KEEPWIRE_LOG", "info,keepwire::client=debug")
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
            // No keyring or notifications for the agent: nothing on that address.
            .env(
                "DBUS_SESSION_BUS_ADDRESS",
                "unix:path=/nonexistent/keepwire-test-bus",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// `keepwire status --json` (the agent's view).
fn status(home: &Path) -> Value {
    serde_json::from_str(&kw_ok(home, &["status", "--json"])).unwrap()
}

async fn wait_status(home: &Path, within: Duration, what: &str, f: impl Fn(&Value) -> bool) {
    wait_until(within, what, || {
        let ok = f(&status(home));
        async move { ok }
    })
    .await;
}

/// The wait before the next attempt in the agent's last `BackingOff` line.
fn last_backoff(log: &Path) -> Option<Duration> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("state=BackingOff"))?;
    let ms = line.split("retry_in_ms=").nth(1)?;
    let ms: String = ms.chars().take_while(char::is_ascii_digit).collect();
    Some(Duration::from_millis(ms.parse().ok()?))
}

fn connected(s: &Value) -> bool {
    s["agent"] == true && s["state"] == "Connected"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_replaces_the_connection_at_once_skipping_the_backoff() {
    let bus = Bus::start();
    let logind = serve_logind(&bus.address).await;
    let dir = TempDir::new("resume");
    let db = dir.join("relay.db");
    let token = add_user(&db, "alice");
    let relay = RelayProcess::start(&bin(), &db, FAST);
    let proxy = FaultProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        relay.host_port().parse().unwrap(),
    )
    .await
    .unwrap();
    let url = format!("ws://{}", proxy.addr());
    let (home, log) = (dir.join("alice"), dir.join("agent.log"));
    let _agent = start_agent(&home, &url, &token, &bus.address, &log);
    wait_status(
        &home,
        Duration::from_secs(15),
        "the agent to connect",
        connected,
    )
    .await;
    let accepted = || proxy.stats().accepted.load(Ordering::Relaxed);

    // 1. The socket dies silently while the machine sleeps (a NAT or the
    // relay forgot it): without the resume the agent would find out only
    // after its background heartbeat (minutes) and a pong timeout.
    sleep_signal(&logind, true).await;
    proxy.set(Fault::Blackhole);
    let before = accepted();
    proxy.set(Fault::Pass);
    let woke = Instant::now();
    sleep_signal(&logind, false).await;
    wait_status(
        &home,
        Duration::from_secs(5),
        "a new connection after the resume",
        |s| connected(s) && accepted() > before,
    )
    .await;
    assert!(woke.elapsed() < Duration::from_secs(5));

    // 2. While asleep the relay cannot be reached: attempts fail and the
    // backoff grows (full jitter), until the agent logs a wait of 4 s or
    // more before its next attempt. The resume skips that wait: the new
    // connection is up well before it would have ended.
    sleep_signal(&logind, true).await;
    proxy.set(Fault::Reset);
    wait_until(Duration::from_secs(60), "a backoff of 4 s or more", || {
        let w = last_backoff(&log);
        async move { w >= Some(Duration::from_secs(4)) }
    })
    .await;
    proxy.set(Fault::Pass);
    let failed = accepted();
    let woke = Instant::now();
    sleep_signal(&logind, false).await;
    wait_status(
        &home,
        Duration::from_secs(3),
        "a connection at once after the resume",
        |s| connected(s) && accepted() > failed,
    )
    .await;
    let took = woke.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("resumed from sleep"), "{text}");
    assert!(
        text.contains("no NetworkManager on the system bus"),
        "one info line for the missing NetworkManager: {text}"
    );
    assert!(!text.contains("ERROR"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networkmanager_changes_give_the_client_a_stable_opaque_network_id() {
    let bus = Bus::start();
    let nm = serve_nm(&bus.address).await;
    let dir = TempDir::new("nm");
    let db = dir.join("relay.db");
    let token = add_user(&db, "alice");
    let relay = RelayProcess::start(&bin(), &db, FAST);
    let (home, log) = (dir.join("alice"), dir.join("agent.log"));
    let _agent = start_agent(&home, &relay.url, &token, &bus.address, &log);
    let net = |s: &Value| s["network"].as_str().unwrap_or("").to_owned();
    wait_status(&home, Duration::from_secs(15), "the Wi-Fi network", |s| {
        connected(s) && net(s).starts_with("wifi-")
    })
    .await;
    let home_net = net(&status(&home));
    // Another primary connection: another id, and the connection probed there.
    nm_set(&nm, 70, OFFICE_NET).await;
    wait_status(
        &home,
        Duration::from_secs(10),
        "the Ethernet network",
        |s| net(s).starts_with("ethernet-"),
    )
    .await;
    let office = net(&status(&home));
    assert_ne!(office[9..], home_net[5..]);
    // Back home: the same id as before (what was learnt there applies again).
    nm_set(&nm, 70, HOME_NET).await;
    wait_status(
        &home,
        Duration::from_secs(10),
        "the Wi-Fi network again",
        |s| net(s) == home_net,
    )
    .await;
    // No network: the client waits for one instead of retrying.
    nm_set(&nm, 20, "/").await;
    wait_status(&home, Duration::from_secs(10), "no network", |s| {
        s["network"].is_null() && s["state"] == "WaitingForNetwork"
    })
    .await;
    nm_set(&nm, 70, HOME_NET).await;
    wait_status(&home, Duration::from_secs(10), "back online", |s| {
        connected(s) && net(s) == home_net
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&home_net), "{text}");
    for secret in ["HomeNet", "Office", HOME_UUID] {
        assert!(!text.contains(secret), "{secret} in the log: {text}");
    }
    assert!(text.contains("no logind on the system bus"), "{text}");
}

/// The agent in a network namespace of its own (`unshare -n`) with no
/// system bus: a veth pair is the "network" whose default route comes and
/// goes. Waits on conditions with deadlines (the status the agent reports).
const ROUTES_SCRIPT: &str = r#"
set -euo pipefail
KW=$1; D=$2
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
until_ok() { # WHAT SECONDS COMMAND...
    local what=$1 end=$((SECONDS + $2)); shift 2
    until "$@"; do
        if [ "$SECONDS" -ge "$end" ]; then
            echo "timed out waiting for $what (status: $(net))"; cat "$D/agent.log"; exit 1
        fi
        sleep 0.1
    done
}
net() { "$KW" status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["state"], s["network"])'; }
is_net() { [ "$(net)" = "$1" ]; }
on_route() { local n; n=$(net); [[ "$n" == "Connected route-"* ]] && [ "$n" != "${1:-}" ]; }

ip link set lo up
export KEEPWIRE_TOKEN_STORE=file KEEPWIRE_HOME="$D/alice"
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent DBUS_SESSION_BUS_ADDRESS=unix:path=/nonexistent
"$KW" admin --db "$D/relay.db" init >/dev/null
"$KW" admin --db "$D/relay.db" user add alice >"$D/token"
"$KW" serve --db "$D/relay.db" --listen 127.0.0.1:0 >"$D/url" 2>"$D/serve.log" & pids+=($!)
until_ok "the relay" 10 test -s "$D/url"
"$KW" login --server "$(head -1 "$D/url")" --token - <"$D/token" >/dev/null
KEEPWIRE_LOG=info "$KW" agent --no-desktop >/dev/null 2>"$D/agent.log" & pids+=($!)
# No default route: the network has no name, and the relay on loopback is reachable.
until_ok "connected on 'default'" 15 is_net "Connected default"
grep -q "watching the routing table" "$D/agent.log"

ip link add v0 type veth peer name v1
ip addr add 10.9.0.2/24 dev v0
ip link set v0 up
ip link set v1 up
ip route add default via 10.9.0.1
until_ok "a network named after the default route" 10 on_route
first=$(net)

ip route replace default via 10.9.0.254
until_ok "another gateway, another network" 10 on_route "$first"
ip route replace default via 10.9.0.1
until_ok "the first gateway's network again (a stable id)" 10 is_net "$first"
ip route del default
until_ok "'default' again" 10 is_net "Connected default"
echo ROUTES-OK
"#;

/// Without NetworkManager (here, without any system bus) the agent follows
/// the kernel's routing table over rtnetlink: a default route names the
/// network (`route-` and an opaque hash of interface and gateway), another
/// gateway is another network, the same one the same id, no default route is
/// `default` (never offline: the relay here is on loopback). Needs root for its network namespace
/// (CI runs as root).
#[test]
fn without_networkmanager_the_routing_table_names_the_network() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let netns = root
        && Command::new("unshare")
            .args(["-n", "ip", "link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
    if !netns {
        eprintln!("SKIPPED: needs root, unshare and ip for a network namespace (CI has them)");
        return;
    }
    let dir = TempDir::new("routes");
    let out = Command::new("unshare")
        .args(["-n", "bash", "-c", ROUTES_SCRIPT, "routes"])
        .arg(bin())
        .arg(dir.path())
        .output()
        .expect("run unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("ROUTES-OK"), "{text}");
}
