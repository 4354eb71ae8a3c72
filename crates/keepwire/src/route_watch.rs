//! Where NetworkManager is absent (systemd-networkd alone, a bare window
//! manager, a container): the kernel's routing table, watched over
//! rtnetlink. Every change of links or routes (an interface up or down, a
//! new default gateway) makes the agent read the default route again; when
//! it points somewhere else, the client hears of a new network at once (it
//! probes its connection, so a socket left on the old path is found dead by
//! a pong timeout instead of a heartbeat interval, and the adaptive
//! heartbeat is learnt per network).
//!
//! The network's id is opaque: `route-` and a hash of the default route's
//! interface and gateway. Without a default route it is `default`. The
//! routing table never makes the agent *offline*: a relay on the local
//! network or on this machine needs no default route, so only
//! NetworkManager's own state says "no network".

use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::time::Duration;

use keepwire_client::{Client, Network};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use sha2::Digest as _;
use tokio::sync::mpsc::error::TrySendError;

/// rtnetlink multicast groups (`linux/rtnetlink.h`): links, IPv4 and IPv6 routes.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
/// A route that is up (`RTF_UP`), and one that rejects (`RTF_REJECT`).
const RTF_UP: u32 = 0x1;
const RTF_REJECT: u32 = 0x200;
/// An interface coming up changes several routes at once: let them settle.
const SETTLE: Duration = Duration::from_millis(200);

/// The id when there is no default route (as without any network watcher).
pub(crate) const NO_ROUTE: &str = "default";

/// Watches the routing table and feeds `client` until the socket fails.
/// Never fails: a kernel without rtnetlink is logged once at info level.
pub(crate) async fn run(client: Client) {
    let fd = match subscribe() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::info!(target: "keepwire::background", error = %e, "cannot watch the routing table: every network is 'default'");
            return;
        }
    };
    tracing::info!(target: "keepwire::background", "no NetworkManager: watching the routing table for network changes");
    // A thread blocks on the socket (a netlink socket is no tokio type) and
    // says "changed"; a full channel already says it.
    let (changed, mut changes) = tokio::sync::mpsc::channel::<()>(1);
    let reader = std::thread::Builder::new()
        .name("keepwire-routes".into())
        .spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            while read_one(&fd, &mut buf).is_ok() {
                if let Err(TrySendError::Closed(())) = changed.try_send(()) {
                    return;
                }
            }
        });
    if let Err(e) = reader {
        tracing::info!(target: "keepwire::background", error = %e, "cannot watch the routing table");
        return;
    }
    let mut last = None;
    report(&client, &mut last);
    while changes.recv().await.is_some() {
        // What arrives meanwhile belongs to the same change.
        tokio::time::sleep(SETTLE).await;
        while changes.try_recv().is_ok() {}
        report(&client, &mut last);
    }
    tracing::info!(target: "keepwire::background", "the routing table is no longer watched");
}

fn subscribe() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let groups = RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
    Ok(fd)
}

/// Blocks for one datagram. An overrun (`ENOBUFS`: the kernel dropped
/// messages) still means "something changed": the table is read whole.
fn read_one(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<()> {
    match recv(fd.as_raw_fd(), buf, MsgFlags::empty()) {
        Ok(_) | Err(nix::errno::Errno::ENOBUFS) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Tells the client when the default route points somewhere new.
fn report(client: &Client, last: &mut Option<String>) {
    let id = current();
    if last.as_deref() == Some(id.as_str()) {
        return;
    }
    tracing::info!(target: "keepwire::background", network = %id, "network (from the routing table)");
    client.set_network(Network::Online(id.clone()));
    *last = Some(id);
}

/// The network the default route points at now.
pub(crate) fn current() -> String {
    let v4 = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| default_v4(&t));
    let v6 = || {
        std::fs::read_to_string("/proc/net/ipv6_route")
            .ok()
            .and_then(|t| default_v6(&t))
    };
    match v4.or_else(v6) {
        Some((iface, gateway)) => route_id(&iface, &gateway),
        None => NO_ROUTE.to_owned(),
    }
}

/// The IPv4 default route of `/proc/net/route` with the lowest metric:
/// (interface, gateway in the file's hex). Loopback does not count.
fn default_v4(table: &str) -> Option<(String, String)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, gateway, flags, metric, mask) = (
                *f.first()?,
                *f.get(1)?,
                *f.get(2)?,
                f.get(3)?,
                f.get(6)?,
                *f.get(7)?,
            );
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let metric: u32 = metric.parse().ok()?;
            (dest == "00000000"
                && mask == "00000000"
                && iface != "lo"
                && flags & RTF_UP != 0
                && flags & RTF_REJECT == 0)
                .then(|| (metric, iface.to_owned(), gateway.to_owned()))
        })
        .min()
        .map(|(_, iface, gateway)| (iface, gateway))
}

/// The IPv6 default route of `/proc/net/ipv6_route` with the lowest metric
/// (the kernel lists unreachable defaults on `lo`: skipped).
fn default_v6(table: &str) -> Option<(String, String)> {
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, prefix, next_hop, metric, flags, iface) = (
                *f.first()?,
                *f.get(1)?,
                *f.get(4)?,
                f.get(5)?,
                f.get(8)?,
                *f.get(9)?,
            );
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let metric = u32::from_str_radix(metric, 16).ok()?;
            (dest.bytes().all(|b| b == b'0')
                && prefix == "00"
                && iface != "lo"
                && flags & RTF_UP != 0
                && flags & RTF_REJECT == 0)
                .then(|| (metric, iface.to_owned(), next_hop.to_owned()))
        })
        .min()
        .map(|(_, iface, gateway)| (iface, gateway))
}

/// An opaque, stable id for a default route: never the addresses themselves.
fn route_id(iface: &str, gateway: &str) -> String {
    let hash = sha2::Sha256::digest(format!("{iface}/{gateway}").as_bytes());
    let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("route-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
        eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
        lo\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n";

    #[test]
    fn the_ipv4_default_route_with_the_lowest_metric_wins_and_loopback_never() {
        assert_eq!(
            default_v4(V4),
            Some(("eth0".to_owned(), "0100000A".to_owned()))
        );
        let only_lo = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                       lo\t00000000\t00000000\t0001\t0\t0\t0\t00000000\n";
        assert_eq!(default_v4(only_lo), None);
        assert_eq!(default_v4(""), None);
        assert_eq!(default_v4("Iface\nnonsense line\n"), None);
    }

    #[test]
    fn the_ipv6_default_route_skips_the_kernels_unreachable_ones_on_lo() {
        let table = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 wlan0\n\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n\
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 wlan0\n";
        assert_eq!(
            default_v6(table),
            Some((
                "wlan0".to_owned(),
                "fe800000000000000000000000000001".to_owned()
            ))
        );
    }

    #[test]
    fn ids_are_stable_opaque_and_differ_per_gateway() {
        let a = route_id("wlan0", "0101A8C0");
        assert_eq!(a, route_id("wlan0", "0101A8C0"));
        assert_ne!(a, route_id("wlan0", "FE01A8C0"));
        assert_ne!(a, route_id("eth0", "0101A8C0"));
        assert!(a.starts_with("route-") && a.len() == "route-".len() + 12);
        assert!(!a.contains("wlan0") && !a.contains("A8C0"));
    }
}
