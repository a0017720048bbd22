//! `AgentSession`: one bidirectional stream per agent.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_common::identity::Identity;
use lifeboat_proto::v1::{
    AgentMessage, ControllerMessage, Guest, HeartbeatAck, Inventory, Welcome, agent_message::Msg, agent_session_server::AgentSession,
    controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::error::ControllerError;
use crate::registry::Registry;

/// The agent-facing service.
pub struct AgentService {
    reg: Arc<Registry>,
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
}

impl AgentService {
    /// Wraps the registry.
    pub fn new(reg: Arc<Registry>) -> Self {
        AgentService { reg, stopping: None }
    }

    /// Ends every session (with a status telling the agent to dial again)
    /// once `stopping` turns true: the controller is shutting down.
    pub fn with_shutdown(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }
}

/// Completes once `stopping` turns true (never without one).
async fn stopped(stopping: Option<tokio::sync::watch::Receiver<bool>>) {
    match stopping {
        Some(mut s) => {
            if s.wait_for(|v| *v).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// The status an agent's session ends with when the controller stops.
pub const SHUTDOWN_MESSAGE: &str = "controller shutting down; dial again";

type OutStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentSession for AgentService {
    type SessionStream = OutStream;

    async fn session(&self, req: Request<Streaming<AgentMessage>>) -> Result<Response<OutStream>, Status> {
        let peer = req.remote_addr();
        let busy = crate::conn::busy(&req);
        let cert_host = match super::peer_identity(&req)? {
            Identity::Agent { host_id } => host_id,
            other => {
                let msg = format!("only agent certificates may open an agent session; this certificate is for {other}");
                crate::conn::request_denied("session_not_agent", &other.to_string(), peer, &msg);
                return Err(ControllerError::PermissionDenied(msg).into());
            }
        };
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Err(_) => return Err(Status::invalid_argument("no Hello within 10 s")),
            Ok(m) => match m?.and_then(|m| m.msg) {
                Some(Msg::Hello(h)) => h,
                _ => return Err(Status::invalid_argument("the first message of a session must be Hello")),
            },
        };
        if hello.host_id != cert_host {
            let msg = format!(
                "certificate is for host '{cert_host}' but the agent claims to be '{}'; refusing the session",
                hello.host_id
            );
            crate::conn::request_denied("session_host_mismatch", &format!("agent {cert_host}"), peer, &msg);
            return Err(ControllerError::PermissionDenied(msg).into());
        }
        let timing = self.reg.timing();
        // Boxed: the queue's blocks hold 32 slots each, and a slot the size
        // of a whole message costs 5.7 KiB per session (heaptrack).
        let (tx, rx) = mpsc::channel::<Box<ControllerMessage>>(64);
        let (sid, mut superseded) = self.reg.open_session_from(&cert_host, &hello.boot_id, tx.clone(), peer)?;
        info!(host = %cert_host, ?peer, agent_version = %hello.agent_version, boot_id = %hello.boot_id, "agent session opened");
        let welcome = ControllerMessage {
            msg: Some(controller_message::Msg::Welcome(Welcome {
                heartbeat_interval_ms: timing.heartbeat_interval_ms,
                resync_interval_s: 30,
            })),
        };
        let _ = tx.send(Box::new(welcome)).await;
        let reg = self.reg.clone();
        let heard = reg.heard_cell(&cert_host, sid);
        let mut reader_superseded = superseded.clone();
        let host_for_stream = cert_host.clone();
        let reader_stopping = self.stopping.clone();
        tokio::spawn(async move {
            let _busy = busy;
            let host = cert_host;
            let stop = stopped(reader_stopping);
            tokio::pin!(stop);
            let Some(heard) = heard else { return };
            let mut paged: Option<Inventory> = None;
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = reader_superseded.wait_for(|s| *s) => {
                        info!(host = %host, "session superseded by a newer one: closing it");
                        break;
                    }
                    _ = &mut stop => {
                        info!(host = %host, "controller shutting down: closing the session");
                        break;
                    }
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        info!(host = %host, "agent stream error: {e}");
                        break;
                    }
                };
                // Liveness without the registry lock: heartbeats from
                // 10,000 hosts must not queue behind inventory writes.
                heard.store(lifeboat_common::now_unix_ms(), std::sync::atomic::Ordering::Relaxed);
                let r = match msg.msg {
                    Some(Msg::Heartbeat(h)) => {
                        // A full outbound queue means the agent is not reading:
                        // drop the ack rather than stall this stream.
                        let _ = tx.try_send(Box::new(ControllerMessage {
                            msg: Some(controller_message::Msg::HeartbeatAck(HeartbeatAck {
                                seq: h.seq,
                                handled_unix_ms: lifeboat_common::now_unix_ms(),
                            })),
                        }));
                        Ok(())
                    }
                    Some(Msg::Inventory(page)) => match gather_page(&mut paged, page) {
                        Err(e) => Err(e),
                        Ok(None) => Ok(()),
                        Ok(Some(inv)) => reg.apply_inventory(&host, sid, inv).map(|skipped| {
                            for s in skipped {
                                warn!(host = %host, "skipped invalid guest: {s}");
                            }
                        }),
                    },
                    Some(Msg::GuestChanged(c)) => match c.guest {
                        Some(mut g) => {
                            unpack(&mut g);
                            reg.apply_guest(&host, sid, g)
                        }
                        None => Err(ControllerError::InvalidArgument("GuestChanged without a guest".into())),
                    },
                    Some(Msg::GuestRemoved(r)) => reg.remove_guest(&host, sid, &r.uuid),
                    Some(Msg::Host(h)) => reg.apply_host(&host, sid, h),
                    Some(Msg::CommandResult(r)) => {
                        reg.complete(r);
                        Ok(())
                    }
                    Some(Msg::Hello(_)) => Err(ControllerError::InvalidArgument("Hello sent twice".into())),
                    None => Err(ControllerError::InvalidArgument("empty message".into())),
                };
                if let Err(e) = r {
                    warn!(host = %host, "agent message rejected: {e}");
                }
            }
            reg.close_session(&host, sid);
            info!(host = %host, "agent session closed");
        });
        // Ends as soon as another session takes the host over, with a status
        // the agent logs before it dials again; nothing queued for this
        // session is sent after that.
        let check = superseded.clone();
        let stopping = self.stopping.clone();
        let check_stopping = self.stopping.clone();
        let ended = async move {
            tokio::select! {
                _ = superseded.wait_for(|s| *s) => {}
                _ = stopped(stopping) => {}
            }
        };
        let out = futures::StreamExt::chain(
            futures::StreamExt::take_until(ReceiverStream::new(rx).map(|m| Ok(*m)), ended),
            futures::stream::once(async move {
                if *check.borrow() {
                    Some(Status::aborted(format!(
                        "another session for host '{host_for_stream}' took over this one; if this agent is {host_for_stream}, it dials again"
                    )))
                } else if check_stopping.as_ref().is_some_and(|s| *s.borrow()) {
                    Some(Status::unavailable(SHUTDOWN_MESSAGE))
                } else {
                    None
                }
            })
            .filter_map(|e| e.map(Err)),
        );
        Ok(Response::new(Box::pin(out)))
    }
}

/// Restores a guest's packed definition. One that cannot be restored is kept
/// as a guest whose definition could not be read (the planner then refuses
/// to move it and says why) rather than dropped, which would read as the
/// guest being gone from its host.
fn unpack(g: &mut Guest) {
    if let Err(e) = lifeboat_proto::unpack_definition(g) {
        warn!(guest = %g.uuid, "{e}");
        g.definition_deflate = Vec::new();
        if g.error.is_empty() {
            g.error = e.to_string();
        }
    }
}

/// Most guests one inventory may carry, over all its pages.
pub const MAX_INVENTORY_GUESTS: usize = 100_000;

/// Adds one inventory page (its definitions unpacked); returns the whole
/// inventory when `page` is the last one. An oversized inventory is refused
/// (and dropped) as a whole.
fn gather_page(paged: &mut Option<Inventory>, mut page: Inventory) -> Result<Option<Inventory>, ControllerError> {
    page.guests.iter_mut().for_each(unpack);
    let acc = match paged.take() {
        None => page,
        Some(mut acc) => {
            if page.host.is_some() {
                acc.host = page.host;
            }
            acc.guests.extend(page.guests);
            acc.more = page.more;
            acc
        }
    };
    if acc.guests.len() > MAX_INVENTORY_GUESTS {
        return Err(ControllerError::InvalidArgument(format!(
            "inventory of more than {MAX_INVENTORY_GUESTS} guests refused"
        )));
    }
    if acc.more {
        *paged = Some(acc);
        Ok(None)
    } else {
        Ok(Some(acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_proto::v1::HostInfo;

    #[test]
    fn a_definition_that_cannot_be_unpacked_marks_the_guest_instead_of_dropping_it() {
        let mut good = Guest { uuid: "u1".into(), definition_xml: "<domain><name>vm1</name></domain>".into(), ..Default::default() };
        lifeboat_proto::pack_definition(&mut good);
        unpack(&mut good);
        assert_eq!(good.definition_xml, "<domain><name>vm1</name></domain>");
        assert!(good.error.is_empty());
        let mut bad = Guest { uuid: "u2".into(), definition_deflate: b"garbage".to_vec(), ..Default::default() };
        unpack(&mut bad);
        assert!(bad.definition_xml.is_empty() && bad.definition_deflate.is_empty());
        assert!(bad.error.contains("u2") && bad.error.contains("zlib"), "{}", bad.error);
    }

    #[test]
    fn pages_are_gathered_into_one_inventory() {
        let g = |u: &str| Guest { uuid: u.into(), name: u.into(), ..Default::default() };
        let mut acc = None;
        let first = Inventory { host: Some(HostInfo { host_id: "h".into(), ..Default::default() }), guests: vec![g("1")], more: true };
        assert!(gather_page(&mut acc, first).unwrap().is_none());
        assert!(gather_page(&mut acc, Inventory { host: None, guests: vec![g("2")], more: true }).unwrap().is_none());
        let inv = gather_page(&mut acc, Inventory { host: None, guests: vec![g("3")], more: false }).unwrap().unwrap();
        assert_eq!(inv.host.unwrap().host_id, "h");
        assert_eq!(inv.guests.iter().map(|g| g.uuid.as_str()).collect::<Vec<_>>(), ["1", "2", "3"]);
        assert!(acc.is_none());
        let single = gather_page(&mut acc, Inventory { host: None, guests: vec![g("9")], more: false }).unwrap().unwrap();
        assert_eq!(single.guests.len(), 1);
    }
}
