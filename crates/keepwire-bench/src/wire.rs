//! What each server under test speaks on its WebSocket, so one generator
//! drives them all: keepwire's frames, the plain-text broadcast peers (Node
//! `ws`, Python `websockets`), Socket.IO 4 (Engine.IO v4 framing) and MQTT
//! 3.1.1 over WebSocket (Mosquitto, QoS 1, persistent sessions).
//!
//! Every publish carries its send time (µs since the run's origin) so the
//! receiver measures latency on the generator's one clock.

use anyhow::bail;
use futures_util::{SinkExt as _, StreamExt as _};
use keepwire_proto::{ClientFrame, SUBPROTOCOL, Send, encode};
use tokio_tungstenite::tungstenite::Message;

use crate::servers::Target;
use crate::{Ws, hello, open_ws};

/// A server's wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// keepwire v1 JSON frames.
    Keepwire,
    /// Text frames `GROUP|SENT_US|padding` broadcast to the room.
    Text,
    /// Socket.IO 4 over a bare WebSocket (`EIO=4&transport=websocket`).
    SocketIo,
    /// MQTT 3.1.1 over WebSocket, QoS 1.
    Mqtt,
}

/// Per-connection receive state.
#[derive(Default)]
pub struct RxState {
    /// keepwire: entries since the last ack.
    since_ack: u32,
    /// MQTT: bytes of a packet split across WebSocket frames.
    buf: Vec<u8>,
}

impl Wire {
    /// The wire of a target.
    pub fn of(t: Target) -> Wire {
        match t {
            Target::Keepwire => Wire::Keepwire,
            Target::NodeWs | Target::PythonWs => Wire::Text,
            Target::SocketIo => Wire::SocketIo,
            Target::Mosquitto => Wire::Mqtt,
        }
    }

    /// Whether the server confirms each publish (the publisher keeps a window).
    pub fn confirms(self) -> bool {
        matches!(self, Wire::Keepwire | Wire::Mqtt)
    }

    fn subprotocol(self) -> Option<&'static str> {
        match self {
            Wire::Keepwire => Some(SUBPROTOCOL),
            Wire::Mqtt => Some("mqtt"),
            Wire::Text | Wire::SocketIo => None,
        }
    }

    /// The URL a member of group `g` opens on a server at `base`.
    pub fn url(self, base: &str, g: usize) -> String {
        match self {
            Wire::Keepwire => base.to_owned(),
            Wire::Text => format!("{base}/?room={g}"),
            Wire::SocketIo => format!("{base}/socket.io/?EIO=4&transport=websocket&room={g}"),
            Wire::Mqtt => format!("{base}/mqtt"),
        }
    }

    /// Opens a connection from `source` and completes the handshake:
    /// keepwire `hello`/`welcome` with `token`; Socket.IO open + namespace
    /// connect; MQTT CONNECT (persistent session `client_id`) and, for a
    /// subscriber, SUBSCRIBE to its group with QoS 1.
    pub async fn connect(
        self,
        url: &str,
        source: std::net::IpAddr,
        token: &str,
        client_id: &str,
        subscribe: Option<usize>,
    ) -> anyhow::Result<Ws> {
        let mut ws = open_ws(url, source, self.subprotocol()).await?;
        match self {
            Wire::Keepwire => hello(&mut ws, token, client_id).await?,
            Wire::Text => {}
            Wire::SocketIo => {
                let open = next_text(&mut ws).await?;
                if !open.starts_with('0') {
                    bail!("expected an Engine.IO open packet, got {open}");
                }
                ws.send(Message::Text("40".into())).await?;
                let connect = next_text(&mut ws).await?;
                if !connect.starts_with("40") {
                    bail!("expected a Socket.IO connect packet, got {connect}");
                }
            }
            Wire::Mqtt => {
                ws.send(Message::Binary(mqtt::connect(client_id, 300).into()))
                    .await?;
                let (kind, body) = next_mqtt(&mut ws).await?;
                if kind != mqtt::CONNACK || body.get(1) != Some(&0) {
                    bail!("MQTT CONNECT refused: {kind:#x} {body:?}");
                }
                if let Some(g) = subscribe {
                    let sub = mqtt::subscribe(1, &topic(g));
                    ws.send(Message::Binary(sub.into())).await?;
                    let (kind, body) = next_mqtt(&mut ws).await?;
                    if kind != mqtt::SUBACK || body.last() == Some(&0x80) {
                        bail!("MQTT SUBSCRIBE refused: {kind:#x} {body:?}");
                    }
                }
            }
        }
        Ok(ws)
    }

    /// Publish number `n` of group `g` (keepwire conversation `conv`), sent
    /// at `now_us`, padded to `payload` bytes.
    pub fn publish(self, g: usize, conv: u64, n: u64, now_us: u64, payload: usize) -> Message {
        let text = |t: String| {
            let pad = payload.saturating_sub(t.len());
            t + &"x".repeat(pad)
        };
        match self {
            Wire::Keepwire => Message::Text(
                encode(&ClientFrame::Send(Send {
                    cid: format!("{g:016x}{n:016x}"),
                    conv,
                    kind: "text".into(),
                    body: text(format!("{now_us:020}")),
                }))
                .into(),
            ),
            Wire::Text => Message::Text(text(format!("{g}|{now_us}|")).into()),
            Wire::SocketIo => {
                Message::Text(format!("42[\"m\",\"{}\"]", text(format!("{g}|{now_us}|"))).into())
            }
            Wire::Mqtt => {
                let id = (n % 65_535) as u16 + 1;
                let body = text(format!("{g}|{now_us}|"));
                Message::Binary(mqtt::publish(&topic(g), id, body.as_bytes()).into())
            }
        }
    }

    /// How many publishes a message from the server confirms (at a publisher).
    pub fn confirmations(self, m: &Message, st: &mut RxState) -> usize {
        match (self, m) {
            (Wire::Keepwire, Message::Text(t)) => {
                usize::from(t.starts_with("{\"type\":\"confirm\""))
            }
            (Wire::Mqtt, Message::Binary(b)) => {
                let mut n = 0;
                mqtt::each_packet(&mut st.buf, b, |kind, _| {
                    n += usize::from(kind == mqtt::PUBACK)
                });
                n
            }
            _ => 0,
        }
    }

    /// Reads a message at a subscriber: pushes the send time of each
    /// publish it carries to `sent` and the answers it needs (keepwire acks,
    /// MQTT PUBACKs, Engine.IO pongs) to `replies`.
    pub fn receive(
        self,
        m: &Message,
        st: &mut RxState,
        sent: &mut Vec<u64>,
        replies: &mut Vec<Message>,
    ) {
        match (self, m) {
            (Wire::Keepwire, Message::Text(t)) => {
                if !t.starts_with("{\"type\":\"entry\"") {
                    return;
                }
                st.since_ack += 1;
                if st.since_ack >= 64 {
                    st.since_ack = 0;
                    if let Some(seq) = crate::field_u64(t, "\"seq\":") {
                        replies.push(Message::Text(encode(&ClientFrame::Ack { seq }).into()));
                    }
                }
                if let Some(s) =
                    crate::field_str(t, "\"body\":\"").and_then(|b| b.get(..20)?.parse().ok())
                {
                    sent.push(s);
                }
            }
            (Wire::Text, Message::Text(t)) => sent.extend(sent_time(t)),
            (Wire::SocketIo, Message::Text(t)) => {
                if t.as_str() == "2" {
                    replies.push(Message::Text("3".into()));
                } else if t.starts_with("42") {
                    sent.extend(sent_time(t));
                }
            }
            (Wire::Mqtt, Message::Binary(b)) => {
                mqtt::each_packet(&mut st.buf, b, |kind, body| {
                    if kind & 0xf0 != mqtt::PUBLISH {
                        return;
                    }
                    let Some((id, payload)) = mqtt::publish_parts(kind, body) else {
                        return;
                    };
                    if let Some(id) = id {
                        replies.push(Message::Binary(mqtt::puback(id).into()));
                    }
                    if let Ok(t) = std::str::from_utf8(payload) {
                        sent.extend(sent_time(t));
                    }
                });
            }
            _ => {}
        }
    }
}

fn topic(g: usize) -> String {
    format!("bench/{g}")
}

/// The send time in a `GROUP|SENT_US|...` payload.
fn sent_time(t: &str) -> Option<u64> {
    t.split('|').nth(1)?.parse().ok()
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    while let Some(m) = ws.next().await {
        if let Message::Text(t) = m? {
            return Ok(t.as_str().to_owned());
        }
    }
    bail!("closed during the handshake")
}

async fn next_mqtt(ws: &mut Ws) -> anyhow::Result<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    while let Some(m) = ws.next().await {
        if let Message::Binary(b) = m? {
            let mut got = None;
            mqtt::each_packet(&mut buf, &b, |kind, body| {
                got.get_or_insert((kind, body.to_vec()));
            });
            if let Some(p) = got {
                return Ok(p);
            }
        }
    }
    bail!("closed during the MQTT handshake")
}

/// The few MQTT 3.1.1 packets the benchmark needs (OASIS MQTT 3.1.1, §3).
mod mqtt {
    pub const CONNACK: u8 = 0x20;
    pub const PUBLISH: u8 = 0x30;
    pub const PUBACK: u8 = 0x40;
    pub const SUBACK: u8 = 0x90;

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut len = body.len();
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// CONNECT with a persistent session (clean session 0).
    pub fn connect(client_id: &str, keep_alive_secs: u16) -> Vec<u8> {
        let mut b = Vec::new();
        string(&mut b, b"MQTT");
        b.push(4); // protocol level 3.1.1
        b.push(0); // flags: clean session off
        b.extend_from_slice(&keep_alive_secs.to_be_bytes());
        string(&mut b, client_id.as_bytes());
        packet(0x10, &b)
    }

    /// SUBSCRIBE to one topic at QoS 1.
    pub fn subscribe(id: u16, topic: &str) -> Vec<u8> {
        let mut b = id.to_be_bytes().to_vec();
        string(&mut b, topic.as_bytes());
        b.push(1);
        packet(0x82, &b)
    }

    /// PUBLISH at QoS 1.
    pub fn publish(topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(topic.len() + payload.len() + 4);
        string(&mut b, topic.as_bytes());
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(payload);
        packet(PUBLISH | 0x02, &b)
    }

    pub fn puback(id: u16) -> Vec<u8> {
        packet(PUBACK, &id.to_be_bytes())
    }

    /// A PUBLISH's packet id (QoS > 0) and payload.
    pub fn publish_parts(first: u8, body: &[u8]) -> Option<(Option<u16>, &[u8])> {
        let tlen = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
        let rest = body.get(2 + tlen..)?;
        if (first >> 1) & 0x03 == 0 {
            return Some((None, rest));
        }
        let id = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
        Some((Some(id), &rest[2..]))
    }

    /// Calls `f(first byte, body)` for each complete packet in `pending` +
    /// `data`; keeps an incomplete tail in `pending`.
    pub fn each_packet(pending: &mut Vec<u8>, data: &[u8], mut f: impl FnMut(u8, &[u8])) {
        let owned;
        let buf: &[u8] = if pending.is_empty() {
            data
        } else {
            pending.extend_from_slice(data);
            owned = std::mem::take(pending);
            &owned
        };
        let mut at = 0;
        while let Some((first, body, next)) = split(&buf[at..]) {
            f(first, body);
            at += next;
        }
        *pending = buf[at..].to_vec();
    }

    /// One packet at the start of `buf`: (first byte, body, total length).
    fn split(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
        let first = *buf.first()?;
        let (mut len, mut shift, mut i) = (0usize, 0, 1);
        loop {
            let byte = *buf.get(i)?;
            len |= usize::from(byte & 0x7f) << shift;
            i += 1;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                return None;
            }
        }
        let body = buf.get(i..i + len)?;
        Some((first, body, i + len))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn packets_split_across_frames_are_reassembled() {
            let p = publish("bench/1", 7, &[b'x'; 300]);
            let mut two = p.clone();
            two.extend_from_slice(&puback(9));
            let mut pending = Vec::new();
            let mut seen = Vec::new();
            each_packet(&mut pending, &two[..100], |k, b| seen.push((k, b.len())));
            assert!(seen.is_empty());
            each_packet(&mut pending, &two[100..], |k, b| seen.push((k, b.len())));
            assert_eq!(seen, vec![(0x32, p.len() - 3), (PUBACK, 2)]);
            assert!(pending.is_empty());
            let (id, payload) = publish_parts(0x32, &p[3..]).unwrap();
            assert_eq!((id, payload.len()), (Some(7), 300));
        }
    }
}
