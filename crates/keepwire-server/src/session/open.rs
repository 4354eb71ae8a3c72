//! The open session: frames from the client, delivery, answers, closing.

use keepwire_proto::{
    ClientFrame, CloseCode, ConvId, DecodeError, ErrorCode, ErrorFrame, Instant, Rejected,
    ServerFrame, decode_client, encode,
};

use super::answers::SlotKind;
use super::{Outgoing, Phase, READ_BATCH, Read, Session, StoreAnswer, StoreRequest, Transmit};
use crate::ratelimit::Verdict;
use crate::store::StoreError;

/// The bad frames that count toward the limit (PROTOCOL.md §10).
fn counts_as_bad(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Malformed
            | ErrorCode::UnknownType
            | ErrorCode::Invalid
            | ErrorCode::BadAck
            | ErrorCode::UnexpectedHello
    )
}

/// An `error` frame: which frame it answers (`frame`, `rid`, `conv`), why.
fn error_frame(
    frame: Option<&str>,
    rid: Option<&str>,
    conv: Option<ConvId>,
    code: ErrorCode,
    message: impl Into<String>,
) -> String {
    encode(&ServerFrame::Error(ErrorFrame {
        rid: rid.map(str::to_owned),
        code,
        message: message.into(),
        frame: frame.map(str::to_owned),
        conv,
    }))
}

/// A `rejected` frame for a send.
fn rejected(
    cid: &str,
    code: ErrorCode,
    message: impl Into<String>,
    retry_ms: Option<u64>,
) -> String {
    encode(&ServerFrame::Rejected(Rejected {
        cid: cid.to_owned(),
        code,
        message: message.into(),
        retry_after_ms: retry_ms,
    }))
}

impl Session {
    pub(super) fn activity(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Open) {
            self.idle_deadline = now + self.idle_timeout;
        }
    }

    fn alloc_id(&mut self) -> super::RequestId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Issues a request at once (handshake steps, ack positions).
    pub(super) fn issue_now(&mut self, req: StoreRequest) -> super::RequestId {
        let id = self.alloc_id();
        self.requests.push_back((id, req));
        id
    }

    /// A request with an answer slot.
    fn enqueue(&mut self, kind: SlotKind, req: StoreRequest) {
        let id = self.alloc_id();
        self.answers.push(id, kind);
        self.waiting.push_back((id, req));
        self.pump();
    }

    /// An answer decided at once, in order behind the pending ones.
    fn answer_now(&mut self, frame: String) {
        let id = self.alloc_id();
        self.answers.push_ready(id, frame);
        self.flush_answers();
    }

    fn flush_answers(&mut self) {
        while let Some(frame) = self.answers.pop_ready() {
            if let Some(f) = frame {
                self.transmits.push_back(Transmit::Text(f));
            }
        }
    }

    /// Issues what may go now: writes in order, a read once this
    /// connection's earlier writes are answered, and the next inbox batch.
    pub(super) fn pump(&mut self) {
        if !matches!(self.phase, Phase::Open) {
            return;
        }
        while let Some((_, req)) = self.waiting.front() {
            if req.is_write() {
                self.writes_in_flight += 1;
            } else if self.read.is_none() && self.writes_in_flight == 0 {
                self.read = Some(Read::Request(self.waiting[0].0));
            } else {
                break;
            }
            let r = self.waiting.pop_front().expect("front exists");
            self.requests.push_back(r);
        }
        let credit = (self.acked + self.window + 1).saturating_sub(self.next);
        if self.read.is_none() && self.next <= self.head && credit > 0 {
            let Some(peer) = self.peer.as_ref() else {
                return;
            };
            let req = StoreRequest::ReadInbox {
                user: peer.user.id,
                from: self.next,
                limit: credit.min(READ_BATCH),
            };
            let head = self.head;
            let id = self.issue_now(req);
            self.read = Some(Read::Inbox { id, head });
        }
    }

    /// Sends the entries of an inbox read; `head` was known when it was issued.
    pub(super) fn deliver(&mut self, res: Result<Vec<Outgoing>, StoreError>, head: u64) {
        let entries = match res {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(target: "keepwire::ws", error = %e, "reading the inbox failed");
                return self.close(CloseCode::InternalError);
            }
        };
        if entries.is_empty() && self.next <= head {
            // The store no longer has what it announced: trimmed meanwhile.
            tracing::warn!(target: "keepwire::ws", expected = self.next, "entries trimmed under a live connection");
            return self.close(CloseCode::Resync);
        }
        let mut n = 0;
        for e in entries {
            if e.seq() != self.next {
                // Retention trimmed entries this connection had not sent
                // yet: the client reconnects and gets the gap in `welcome`.
                tracing::warn!(target: "keepwire::ws", expected = self.next, got = e.seq(), "entries trimmed under a live connection");
                self.cfg.metrics.deliveries.inc_by(n);
                return self.close(CloseCode::Resync);
            }
            self.transmits.push_back(Transmit::Text(e.into_text()));
            self.next += 1;
            n += 1;
        }
        self.cfg.metrics.deliveries.inc_by(n);
    }

    /// Persists the ack position now.
    pub(super) fn flush_ack(&mut self) {
        self.ack_flush_at = None;
        if let Some(peer) = &self.peer {
            let req = StoreRequest::RecordAck {
                user: peer.user.id,
                device: peer.device.clone(),
                seq: self.acked,
            };
            self.issue_now(req);
        }
    }

    /// Ends the session with a close frame.
    pub(super) fn close(&mut self, code: CloseCode) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        self.end();
        self.cfg
            .metrics
            .closes
            .get_or_create(&crate::metrics::CodeLabel { code: code.code() })
            .inc();
        self.transmits.push_back(Transmit::Close(code));
    }

    /// The peer went away. Signals it sent before still go to the members
    /// (a client that signals and closes at once): their membership lookups
    /// are issued even if earlier requests held them back. Everything else
    /// not yet issued is dropped.
    pub(super) fn gone(&mut self) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        let waiting = std::mem::take(&mut self.waiting);
        self.end();
        self.requests.extend(
            waiting
                .into_iter()
                .filter(|(_, r)| matches!(r, StoreRequest::ConvMembers { .. })),
        );
    }

    fn end(&mut self) {
        let open = matches!(self.phase, Phase::Open);
        self.phase = Phase::Closed;
        if open && self.ack_flush_at.is_some() {
            self.flush_ack();
        }
        // Nothing more is issued; answers still pending are dropped.
        self.waiting.clear();
    }

    // -- frames -------------------------------------------------------------

    pub(super) fn handle_frame(&mut self, text: &str, now: Instant) {
        match decode_client(text, &self.cfg.limits) {
            Ok(frame) => self.handle_decoded(frame, now),
            Err(e) => self.refuse_decoded(e),
        }
        if self.protocol_errors > self.cfg.limits.max_protocol_errors {
            self.close(CloseCode::ProtocolViolation);
        }
    }

    fn count_error(&mut self, code: ErrorCode) {
        if counts_as_bad(code) {
            self.protocol_errors += 1;
        }
        self.cfg
            .metrics
            .errors
            .get_or_create(&crate::metrics::ResultLabel {
                result: code.to_string(),
            })
            .inc();
    }

    /// A frame that failed to decode: a send with a readable cid gets its
    /// `rejected`, anything else an `error` naming the frame.
    fn refuse_decoded(&mut self, e: DecodeError) {
        self.count_error(e.code);
        let frame = match (&e.frame_type, &e.cid) {
            (Some(t), Some(cid)) if t == "send" => {
                self.cfg.metrics.send_result(e.code.as_str());
                rejected(cid, e.code, e.message, None)
            }
            _ => error_frame(
                e.frame_type.as_deref(),
                e.rid.as_deref(),
                None,
                e.code,
                e.message,
            ),
        };
        self.answer_now(frame);
    }

    fn handle_decoded(&mut self, frame: ClientFrame, now: Instant) {
        let Some(peer) = self.peer.as_ref() else {
            return;
        };
        let user = peer.user.id;
        let ty = frame.type_name();
        match frame {
            ClientFrame::Hello(_) => {
                self.count_error(ErrorCode::UnexpectedHello);
                self.answer_now(error_frame(
                    Some(ty),
                    None,
                    None,
                    ErrorCode::UnexpectedHello,
                    "hello was already received on this connection",
                ));
            }
            ClientFrame::Ack { seq } => {
                if seq >= self.next {
                    self.count_error(ErrorCode::BadAck);
                    let msg = format!(
                        "ack {seq} is beyond the last entry sent ({})",
                        self.next.saturating_sub(1)
                    );
                    self.answer_now(error_frame(Some(ty), None, None, ErrorCode::BadAck, msg));
                } else if seq > self.acked {
                    self.acked = seq;
                    self.ack_flush_at.get_or_insert(now + super::ACK_FLUSH);
                    self.pump();
                }
            }
            ClientFrame::Ping {} => {
                let pong = ServerFrame::Pong {
                    head: Some(self.head),
                };
                self.transmits.push_back(Transmit::Text(encode(&pong)));
            }
            ClientFrame::SetHeartbeat { heartbeat_ms } => {
                (self.heartbeat, self.idle_timeout) =
                    self.cfg.heartbeat.negotiate(Some(heartbeat_ms));
                self.idle_deadline = now + self.idle_timeout;
                let set = ServerFrame::HeartbeatSet {
                    heartbeat_ms: self.heartbeat.as_millis() as u64,
                    idle_timeout_ms: self.idle_timeout.as_millis() as u64,
                };
                self.transmits.push_back(Transmit::Text(encode(&set)));
            }
            ClientFrame::Send(s) => self.handle_send(s, user, now),
            f @ (ClientFrame::ConvCreate(_)
            | ClientFrame::ConvAdd(_)
            | ClientFrame::ConvRemove(_)) => self.handle_membership(f, user, now),
            f @ (ClientFrame::History(_)
            | ClientFrame::ConvList { .. }
            | ClientFrame::Read { .. }
            | ClientFrame::Signal { .. }
            | ClientFrame::PushRegister(_)
            | ClientFrame::Mute { .. }) => self.handle_request(f, user, now),
            _ => {
                self.count_error(ErrorCode::UnknownType);
                self.answer_now(error_frame(
                    Some(ty),
                    None,
                    None,
                    ErrorCode::UnknownType,
                    "frame type not supported",
                ));
            }
        }
    }

    /// A `send`: rate-limited, then stored (answered in order).
    fn handle_send(&mut self, s: keepwire_proto::Send, user: crate::store::UserId, now: Instant) {
        let budget = self.cfg.user_budget.clone();
        let verdict = self.limiter().send(&s.cid, user, &*budget, now);
        match verdict {
            Verdict::Accept => {
                let device = self
                    .peer
                    .as_ref()
                    .map(|p| p.device.clone())
                    .unwrap_or_default();
                self.enqueue(
                    SlotKind::Send(s.cid.as_str().into()),
                    StoreRequest::Send {
                        user,
                        device,
                        send: s,
                    },
                );
            }
            Verdict::Reject(wait) => {
                self.cfg.metrics.send_result("rate_limited");
                self.answer_now(rejected(
                    &s.cid,
                    ErrorCode::RateLimited,
                    "too many sends; wait retry_after_ms, then resend from the first rejected send",
                    Some((wait.as_millis() as u64).max(1)),
                ));
            }
            Verdict::Abuse => self.close(CloseCode::RateLimited),
        }
    }

    /// `conv_create`, `conv_add`, `conv_remove`: the consent model, charged
    /// by the inboxes they reach, then stored.
    fn handle_membership(&mut self, frame: ClientFrame, user: crate::store::UserId, now: Instant) {
        let ty = frame.type_name();
        match frame {
            ClientFrame::ConvCreate(c)
                if self.cfg.member_adds == crate::MemberAdds::Backend
                    && c.members.iter().any(|m| *m != self.peer_name()) =>
            {
                self.refuse_adds(ty, &c.rid);
            }
            ClientFrame::ConvAdd(m) if self.cfg.member_adds == crate::MemberAdds::Backend => {
                self.refuse_adds(ty, &m.rid);
            }
            ClientFrame::ConvCreate(c) => {
                let reach = 1 + c.members.len() as u32;
                let verdict = self.fanout_verdict(reach, now);
                if self.admit(verdict, ty, Some(&c.rid), None) {
                    let rid = c.rid.as_str().into();
                    self.enqueue(
                        SlotKind::Create(rid),
                        StoreRequest::ConvCreate { user, req: c },
                    );
                }
            }
            ClientFrame::ConvAdd(m) | ClientFrame::ConvRemove(m) => {
                let add = ty == "conv_add";
                // Charged one now, and the members reached once it went through.
                let verdict = self.fanout_verdict(1, now);
                if self.admit(verdict, ty, Some(&m.rid), None) {
                    let rid = m.rid.as_str().into();
                    let req = StoreRequest::ConvMember {
                        user,
                        conv: m.conv,
                        target: m.user,
                        add,
                    };
                    self.enqueue(SlotKind::Member(rid), req);
                }
            }
            _ => {}
        }
    }

    /// The other requests: one rate bucket, then the store.
    fn handle_request(&mut self, frame: ClientFrame, user: crate::store::UserId, now: Instant) {
        let ty = frame.type_name();
        match frame {
            ClientFrame::History(h) => {
                let verdict = self.limiter().frame(now);
                if self.admit(verdict, ty, Some(&h.rid), Some(h.conv)) {
                    // An out-of-range limit is clamped (PROTOCOL.md §6).
                    let limit = h.limit.unwrap_or(50).min(self.cfg.limits.max_history_page);
                    let req = StoreRequest::History {
                        user,
                        conv: h.conv,
                        before: h.before,
                        limit,
                    };
                    self.enqueue(SlotKind::History(h.rid.as_str().into()), req);
                }
            }
            ClientFrame::ConvList { rid } => {
                let verdict = self.limiter().frame(now);
                if self.admit(verdict, ty, Some(&rid), None) {
                    self.enqueue(
                        SlotKind::List(rid.as_str().into()),
                        StoreRequest::ConvList { user },
                    );
                }
            }
            ClientFrame::Read { conv, up_to } => {
                let verdict = self.limiter().frame(now);
                if self.admit(verdict, ty, None, Some(conv)) {
                    self.enqueue(
                        SlotKind::Read(conv),
                        StoreRequest::MarkRead { user, conv, up_to },
                    );
                }
            }
            ClientFrame::Signal { conv, data } => {
                let verdict = self.limiter().frame(now);
                if self.admit(verdict, ty, None, Some(conv)) {
                    let req = StoreRequest::ConvMembers { user, conv };
                    self.enqueue(SlotKind::Signal(conv, Box::new(data)), req);
                }
            }
            ClientFrame::PushRegister(p) => {
                let verdict = self.limiter().frame(now);
                if !self.admit(verdict, ty, Some(&p.rid), None) {
                    return;
                }
                let push = if p.registration.is_null() {
                    Ok(None)
                } else {
                    match &self.cfg.push {
                        None => Err("this relay sends no push wake-ups".to_owned()),
                        Some(policy) => policy.check(&p.registration, p.previews).map(Some),
                    }
                };
                match push {
                    Ok(push) => {
                        let device = self
                            .peer
                            .as_ref()
                            .map(|p| p.device.clone())
                            .unwrap_or_default();
                        let req = StoreRequest::SetPush { user, device, push };
                        self.enqueue(SlotKind::Push(p.rid.as_str().into()), req);
                    }
                    Err(why) => {
                        self.count_error(ErrorCode::Invalid);
                        let f = error_frame(Some(ty), Some(&p.rid), None, ErrorCode::Invalid, why);
                        self.answer_now(f);
                    }
                }
            }
            ClientFrame::Mute { rid, conv, muted } => {
                let verdict = self.limiter().frame(now);
                if self.admit(verdict, ty, Some(&rid), Some(conv)) {
                    let req = StoreRequest::Mute { user, conv, muted };
                    self.enqueue(SlotKind::Mute(rid.as_str().into(), conv, muted), req);
                }
            }
            _ => {}
        }
    }

    fn peer_name(&self) -> String {
        self.peer
            .as_ref()
            .map(|p| p.user.name.clone())
            .unwrap_or_default()
    }

    /// Under `--member-adds backend`, users put nobody else into conversations.
    fn refuse_adds(&mut self, ty: &str, rid: &str) {
        self.count_error(ErrorCode::Forbidden);
        self.answer_now(error_frame(
            Some(ty),
            Some(rid),
            None,
            ErrorCode::Forbidden,
            "this relay lets only the app's backend add users to conversations",
        ));
    }

    fn limiter(&mut self) -> &mut crate::ratelimit::Limiter {
        self.limiter.as_mut().expect("open sessions have a limiter")
    }

    fn fanout_verdict(&mut self, reach: u32, now: Instant) -> Verdict {
        let user = self.peer.as_ref().map_or(0, |p| p.user.id);
        let budget = self.cfg.user_budget.clone();
        self.limiter().fanout(reach, user, &*budget, now)
    }

    /// Applies a rate-limit verdict to a request: true to go ahead; a
    /// refusal is answered in order, abuse closes.
    fn admit(&mut self, v: Verdict, ty: &str, rid: Option<&str>, conv: Option<ConvId>) -> bool {
        match v {
            Verdict::Accept => true,
            Verdict::Reject(wait) => {
                self.count_error(ErrorCode::RateLimited);
                let msg = format!(
                    "too many requests; wait {} ms before the next one",
                    wait.as_millis().max(1)
                );
                self.answer_now(error_frame(
                    Some(ty),
                    rid,
                    conv,
                    ErrorCode::RateLimited,
                    msg,
                ));
                false
            }
            Verdict::Abuse => {
                self.close(CloseCode::RateLimited);
                false
            }
        }
    }

    // -- answers ------------------------------------------------------------

    /// Builds the frame answering a slot (`None`: nothing to send).
    pub(super) fn answer_frame(
        &mut self,
        kind: SlotKind,
        answer: StoreAnswer,
        now: Instant,
    ) -> Option<String> {
        match (kind, answer) {
            (SlotKind::Send(cid), StoreAnswer::Confirm(res)) => Some(match res {
                Ok(c) => {
                    self.cfg.metrics.send_result(if c.duplicate {
                        "duplicate"
                    } else {
                        "confirmed"
                    });
                    encode(&ServerFrame::Confirm(c))
                }
                Err(StoreError::Refused(code, message)) => {
                    self.cfg.metrics.send_result(code.as_str());
                    rejected(&cid, code, message, None)
                }
                Err(e) => {
                    tracing::error!(target: "keepwire::ws", error = %e, "send failed");
                    self.cfg.metrics.send_result("internal");
                    rejected(
                        &cid,
                        ErrorCode::Internal,
                        "the server could not store the message; retry later",
                        Some(1000),
                    )
                }
            }),
            (SlotKind::History(rid), StoreAnswer::History(res)) => Some(match res {
                Ok(mut page) => {
                    page.rid = rid.into();
                    encode(&ServerFrame::History(page))
                }
                Err(e) => self.request_error("history", Some(&rid), None, e),
            }),
            (SlotKind::Create(rid), StoreAnswer::Conv(res)) => Some(match res {
                Ok((conv, changed)) => encode(&ServerFrame::Conv {
                    rid: rid.into(),
                    conv,
                    changed,
                }),
                Err(e) => self.request_error("conv_create", Some(&rid), None, e),
            }),
            (SlotKind::Member(rid), StoreAnswer::Conv(res)) => Some(match res {
                Ok((conv, changed)) => {
                    if changed {
                        // Paid after the fact: the next writes wait for it.
                        let user = self.peer.as_ref().map_or(0, |p| p.user.id);
                        let budget = self.cfg.user_budget.clone();
                        let reach = conv.members.len() as u32;
                        self.limiter().charge(reach, user, &*budget, now);
                    }
                    encode(&ServerFrame::Conv {
                        rid: rid.into(),
                        conv,
                        changed,
                    })
                }
                Err(e) => self.request_error("conv_member", Some(&rid), None, e),
            }),
            (SlotKind::List(rid), StoreAnswer::Convs(res)) => Some(match res {
                Ok(convs) => encode(&ServerFrame::Convs {
                    rid: rid.into(),
                    convs,
                }),
                Err(e) => self.request_error("conv_list", Some(&rid), None, e),
            }),
            (SlotKind::Read(conv), StoreAnswer::Done(res)) => match res {
                Ok(()) => None,
                Err(e) => Some(self.request_error("read", None, Some(conv), e)),
            },
            (SlotKind::Signal(conv, data), StoreAnswer::Members(res)) => match res {
                Ok(members) => {
                    let from = self
                        .peer
                        .as_ref()
                        .map(|p| p.user.name.clone())
                        .unwrap_or_default();
                    let frame = ServerFrame::Signal {
                        conv,
                        from,
                        data: *data,
                    };
                    self.events.push_back(super::Event::Signal {
                        members,
                        frame: Box::new(frame),
                    });
                    None
                }
                Err(e) => Some(self.request_error("signal", None, Some(conv), e)),
            },
            (SlotKind::Push(rid), StoreAnswer::Push(res)) => Some(match res {
                Ok(id) => encode(&ServerFrame::Push {
                    rid: rid.into(),
                    id,
                }),
                Err(e) => self.request_error("push_register", Some(&rid), None, e),
            }),
            (SlotKind::Mute(rid, conv, muted), StoreAnswer::Muted(res)) => Some(match res {
                Ok(changed) => encode(&ServerFrame::Muted {
                    rid: rid.into(),
                    conv,
                    muted,
                    changed,
                }),
                Err(e) => self.request_error("mute", Some(&rid), Some(conv), e),
            }),
            (kind, answer) => {
                tracing::error!(target: "keepwire::ws", ?kind, ?answer, "a store answer of the wrong kind");
                Some(error_frame(
                    None,
                    None,
                    None,
                    ErrorCode::Internal,
                    "the server failed",
                ))
            }
        }
    }

    fn request_error(
        &mut self,
        frame: &str,
        rid: Option<&str>,
        conv: Option<ConvId>,
        e: StoreError,
    ) -> String {
        let (code, msg) = match e {
            StoreError::Refused(code, msg) => (code, msg),
            other => {
                tracing::error!(target: "keepwire::ws", error = %other, "request failed");
                (
                    ErrorCode::Internal,
                    "the server failed to handle the request; retry later".to_owned(),
                )
            }
        };
        self.count_error(code);
        error_frame(Some(frame), rid, conv, code, msg)
    }
}
