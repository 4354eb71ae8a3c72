//! What the agent hears from the system bus: logind's suspend/resume
//! (`org.freedesktop.login1.Manager.PrepareForSleep`) and NetworkManager's
//! state and primary connection. A resume replaces the connection at once
//! (a socket from before the sleep has most likely died with it), and each
//! network NetworkManager reports gets its own stable, opaque id, so the
//! adaptive heartbeat is learnt per network.
//!
//! The system bus is the one `DBUS_SYSTEM_BUS_ADDRESS` names (zbus's
//! default otherwise): tests point it at a private bus with mock services.
//! No system bus, no logind or no NetworkManager is logged once at info
//! level and the agent runs on without it; without NetworkManager, network
//! changes come from the routing table (`route_watch`).

use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use keepwire_client::{Client, Network};
use sha2::Digest as _;
use zbus::OwnedObjectPath;

const LOGIN1: &str = "org.freedesktop.login1";
const LOGIN1_PATH: &str = "/org/freedesktop/login1";
const LOGIN1_MANAGER: &str = "org.freedesktop.login1.Manager";
const NM: &str = "org.freedesktop.NetworkManager";
const NM_PATH: &str = "/org/freedesktop/NetworkManager";
const NM_ACTIVE: &str = "org.freedesktop.NetworkManager.Connection.Active";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

/// How long one exchange on the system bus may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// `NM_STATE_CONNECTED_LOCAL`: the lowest state with a usable link.
const NM_CONNECTED_LOCAL: u32 = 50;

type Signals = std::pin::Pin<Box<dyn Stream<Item = zbus::Message> + Send>>;

/// Watches the system bus and feeds `client` until the bus goes away.
/// Never fails: what is missing is logged once at info level.
pub(crate) async fn run(client: Client) {
    let conn = match tokio::time::timeout(CALL_TIMEOUT, zbus::Connection::system()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            absent(&format!("no system bus ({e})"));
            return crate::route_watch::run(client).await;
        }
        Err(_) => {
            absent("the system bus did not answer");
            return crate::route_watch::run(client).await;
        }
    };
    let mut sleep = match signals(
        &conn,
        LOGIN1,
        LOGIN1_PATH,
        LOGIN1_MANAGER,
        "PrepareForSleep",
    )
    .await
    {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::info!(target: "keepwire::background", reason = %e, "no logind on the system bus: suspend/resume is not watched");
            None
        }
    };
    let mut nm = match nm_signals(&conn).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::info!(target: "keepwire::background", reason = %e, "no NetworkManager on the system bus");
            None
        }
    };
    if nm.is_none() {
        tokio::spawn(crate::route_watch::run(client.clone()));
    }
    let mut last = None;
    if nm.is_some() {
        report_network(&conn, &client, &mut last).await;
    }
    loop {
        tokio::select! {
            Some(msg) = next(&mut sleep) => on_sleep(&msg, &client),
            Some(_) = next(&mut nm) => report_network(&conn, &client, &mut last).await,
            else => break,
        }
    }
    tracing::info!(target: "keepwire::background", "the system bus went away: sleep and network changes are no longer watched");
}

fn absent(why: &str) {
    tracing::info!(target: "keepwire::background", reason = %why, "suspend/resume is not watched");
}

/// The next message of a stream that may be absent (then never).
async fn next(s: &mut Option<Signals>) -> Option<zbus::Message> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

fn on_sleep(msg: &zbus::Message, client: &Client) {
    match msg.body().deserialize::<bool>() {
        Ok(true) => {
            tracing::info!(target: "keepwire::background", "the system is going to sleep");
        }
        Ok(false) => {
            tracing::info!(target: "keepwire::background", "the system resumed from sleep");
            client.resume();
        }
        Err(e) => {
            tracing::warn!(target: "keepwire::background", error = %e, "a PrepareForSleep signal without its boolean");
        }
    }
}

/// An uncached proxy.
async fn proxy(
    conn: &zbus::Connection,
    dest: &'static str,
    path: &str,
    iface: &'static str,
) -> zbus::Result<zbus::Proxy<'static>> {
    zbus::proxy::Builder::<zbus::Proxy<'static>>::new(conn)
        .destination(dest)
        .path(path.to_owned())
        .interface(iface)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

/// A signal of a service that must be on the bus now.
async fn signals(
    conn: &zbus::Connection,
    dest: &'static str,
    path: &str,
    iface: &'static str,
    member: &'static str,
) -> anyhow::Result<Signals> {
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let name = zbus::names::BusName::try_from(dest)?;
    let owned = tokio::time::timeout(CALL_TIMEOUT, dbus.name_has_owner(name)).await??;
    if !owned {
        anyhow::bail!("{dest} has no owner");
    }
    let p = proxy(conn, dest, path, iface).await?;
    Ok(Box::pin(p.receive_signal(member).await?))
}

/// NetworkManager's `StateChanged` and its properties' changes, merged.
async fn nm_signals(conn: &zbus::Connection) -> anyhow::Result<Signals> {
    let state = signals(conn, NM, NM_PATH, NM, "StateChanged").await?;
    let props = signals(conn, NM, NM_PATH, PROPERTIES, "PropertiesChanged").await?;
    Ok(Box::pin(futures_util::stream::select(state, props)))
}

/// Reads NetworkManager's view and tells the client when it changed.
async fn report_network(conn: &zbus::Connection, client: &Client, last: &mut Option<Network>) {
    let now = match tokio::time::timeout(CALL_TIMEOUT, current_network(conn)).await {
        Ok(Ok(Some(n))) => n,
        // Unknown state: no opinion, keep what the client has.
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!(target: "keepwire::background", error = %e, "cannot read NetworkManager's state");
            return;
        }
        Err(_) => return,
    };
    if last.as_ref() == Some(&now) {
        return;
    }
    match &now {
        Network::Online(id) => {
            tracing::info!(target: "keepwire::background", network = %id, "network")
        }
        Network::Offline => tracing::info!(target: "keepwire::background", "no network"),
    }
    client.set_network(now.clone());
    *last = Some(now);
}

/// NetworkManager's state as a [`Network`]; `None` while it does not know.
async fn current_network(conn: &zbus::Connection) -> anyhow::Result<Option<Network>> {
    let nm = proxy(conn, NM, NM_PATH, NM).await?;
    let state: u32 = nm.get_property("State").await?;
    if state == 0 {
        return Ok(None);
    }
    if state < NM_CONNECTED_LOCAL {
        return Ok(Some(Network::Offline));
    }
    let primary: OwnedObjectPath = nm.get_property("PrimaryConnection").await?;
    if primary.as_str() == "/" {
        return Ok(Some(Network::Online("nm-other".into())));
    }
    let active = proxy(conn, NM, primary.as_str(), NM_ACTIVE).await?;
    let kind: String = active.get_property("Type").await?;
    let mut uuid: String = active.get_property("Uuid").await?;
    if uuid.is_empty() {
        uuid = active.get_property("Id").await?;
    }
    Ok(Some(Network::Online(network_id(&kind, &uuid))))
}

/// A stable, opaque id for a NetworkManager connection profile: its kind in
/// words and a hash of its UUID (never its name, often the Wi-Fi's SSID).
pub(crate) fn network_id(kind: &str, uuid: &str) -> String {
    let kind = match kind {
        "802-11-wireless" | "wifi" => "wifi",
        "802-3-ethernet" | "ethernet" => "ethernet",
        "gsm" | "cdma" | "wwan" => "cellular",
        "vpn" | "wireguard" => "vpn",
        "bluetooth" => "bluetooth",
        _ => "net",
    };
    let digest = sha2::Sha256::digest(format!("keepwire network {uuid}").as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_ids_are_stable_opaque_and_say_the_kind() {
        let a = network_id("802-11-wireless", "6a1f0f7e-0000-4000-8000-000000000001");
        assert_eq!(
            a,
            network_id("802-11-wireless", "6a1f0f7e-0000-4000-8000-000000000001")
        );
        assert!(
            a.starts_with("wifi-") && a.len() == "wifi-".len() + 16,
            "{a}"
        );
        assert!(!a.contains("6a1f"), "{a}");
        let b = network_id("802-3-ethernet", "6a1f0f7e-0000-4000-8000-000000000002");
        assert!(b.starts_with("ethernet-"), "{b}");
        assert_ne!(a[5..], b[9..]);
        assert!(network_id("tun", "x").starts_with("net-"));
    }
}
