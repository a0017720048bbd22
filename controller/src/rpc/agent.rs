//! `AgentSession`: one bidirectional stream per agent. Every message passes
//! the intake ([`crate::intake`]) before the registry sees it.
#![warn(clippy::arithmetic_side_effects)]

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_common::identity::Identity;
use lifeboat_proto::v1::{
    AgentMessage, CommandResult, ControllerMessage, HeartbeatAck, Refused, Welcome,
    agent_message::Msg,
    agent_session_server::{AgentSession, AgentSessionServer},
    controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::error::ControllerError;
use crate::intake::{self, Page, Refusal, SessionIntake};
use crate::registry::{Registry, SessionId};
use crate::rpc::unwritten::{self, Observation, Unwritten};

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

    /// The gRPC service, decoding messages of at most
    /// [`intake::MAX_AGENT_MESSAGE_BYTES`] (a larger one ends the stream with
    /// an error before it is held in memory).
    pub fn into_server(self) -> AgentSessionServer<Self> {
        AgentSessionServer::new(self).max_decoding_message_size(intake::MAX_AGENT_MESSAGE_BYTES)
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
        if let Err(r) = intake::check_hello(&hello) {
            crate::metrics::agent_message_refused(r.kind);
            warn!(host = %cert_host, field = %r.what(), "refused agent session: {r}");
            return Err(Status::invalid_argument(format!("refused: {r}")));
        }
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
        // It may write (a new host, a return from OFFLINE, an alarm) under the
        // registry lock: on a blocking thread, never on an async worker.
        let (reg, host, boot, stx) = (self.reg.clone(), cert_host.clone(), hello.boot_id.clone(), tx.clone());
        let (sid, mut superseded) = tokio::task::spawn_blocking(move || reg.open_session_from(&host, &boot, stx, peer))
            .await
            .map_err(|e| ControllerError::Internal(format!("opening a session: {e}")))??;
        info!(host = %cert_host, ?peer, agent_version = %hello.agent_version, boot_id = %hello.boot_id, "agent session opened");
        let welcome = ControllerMessage {
            msg: Some(controller_message::Msg::Welcome(Welcome {
                heartbeat_interval_ms: timing.heartbeat_interval_ms,
                epoch: self.reg.epoch(),
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
            let mut intake = Some(SessionIntake::new(reg.now_ms()));
            let mut refusals = RefusalReport::default();
            let mut unwritten = Some(Unwritten::default());
            // A message read ahead while batching, handled first next time.
            let mut stash: Option<Result<Option<AgentMessage>, Status>> = None;
            loop {
                // Observations the database refused are tried again even
                // when the agent sends nothing new.
                let retry_at = unwritten.as_ref().and_then(Unwritten::next_try);
                let next = if let Some(m) = stash.take() {
                    Some(m)
                } else {
                    tokio::select! {
                        m = inbound.message() => Some(m),
                        _ = session_ends(&mut reader_superseded, stop.as_mut(), &host) => break,
                        _ = sleep_until(retry_at), if retry_at.is_some() => None,
                    }
                };
                let Some(next) = next else {
                    let (reg2, host2) = (reg.clone(), host.clone());
                    let mut un = unwritten.take().unwrap_or_default();
                    match tokio::task::spawn_blocking(move || {
                        un.retry(&reg2, &host2, sid, std::time::Instant::now());
                        un
                    })
                    .await
                    {
                        Ok(un) => unwritten = Some(un),
                        Err(e) => {
                            warn!(host = %host, "writing waiting observations failed: {e}");
                            break;
                        }
                    }
                    continue;
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) if matches!(e.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) => {
                        // Too large to decode: nothing of it was read. The
                        // stream cannot go on, but the agent learns why.
                        let r = Refusal {
                            kind: "message",
                            field: "size".into(),
                            reason: format!(
                                "{}; a message may have at most {} bytes (docs/security.md, Agent input); the session ends",
                                e.message(),
                                intake::MAX_AGENT_MESSAGE_BYTES
                            ),
                        };
                        refusals.refused(&reg, &host, &tx, r);
                        // Closing the session ends the outbound stream at
                        // once: first let the agent read the refusal (2 s at most).
                        let until = tokio::time::Instant::now().checked_add(Duration::from_secs(2));
                        let until = until.unwrap_or_else(tokio::time::Instant::now);
                        while tx.capacity() < tx.max_capacity() && tokio::time::Instant::now() < until {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        break;
                    }
                    Err(e) => {
                        info!(host = %host, "agent stream error: {e}");
                        break;
                    }
                };
                // Liveness without the registry lock: heartbeats from
                // 10,000 hosts must not queue behind inventory writes.
                heard.store(reg.now_ms(), std::sync::atomic::Ordering::Relaxed);
                let rs: Vec<Result<(), MessageError>> = if let Some(Msg::Heartbeat(h)) = &msg.msg {
                    vec![answer_heartbeat(&reg, &tx, h)]
                } else {
                    // Inflating, validating and writing run on a blocking
                    // thread: a session busy with a large inventory must not
                    // hold up the runtime threads other sessions' heartbeats
                    // are read on. The messages already received behind this
                    // one go along (the next inventory pages, say), up to a
                    // heartbeat, which is answered before any wait.
                    let mut batch = vec![msg];
                    while batch.len() < BATCH {
                        match futures::FutureExt::now_or_never(inbound.message()) {
                            Some(Ok(Some(m))) if !matches!(m.msg, Some(Msg::Heartbeat(_))) => batch.push(m),
                            Some(other) => {
                                stash = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    if let Some(Ok(Some(AgentMessage { msg: Some(Msg::Heartbeat(h)) }))) = &stash {
                        heard.store(reg.now_ms(), std::sync::atomic::Ordering::Relaxed);
                        if let Err(MessageError::Refused(r)) = answer_heartbeat(&reg, &tx, h) {
                            refusals.refused(&reg, &host, &tx, r);
                        }
                        stash = None;
                    }
                    let (reg2, host2) = (reg.clone(), host.clone());
                    let _permit = if batch.iter().any(|m| matches!(m.msg, Some(Msg::Inventory(_)))) {
                        // A session that ends meanwhile stops waiting.
                        tokio::select! {
                            p = inventory_permits().acquire() => p.ok(),
                            _ = session_ends(&mut reader_superseded, stop.as_mut(), &host) => break,
                        }
                    } else {
                        None
                    };
                    let mut st = intake.take().unwrap_or_else(|| SessionIntake::new(reg.now_ms()));
                    let mut un = unwritten.take().unwrap_or_default();
                    match tokio::task::spawn_blocking(move || {
                        let rs: Vec<Result<(), MessageError>> = batch
                            .into_iter()
                            .map(|msg| {
                                take_in(&reg2, &host2, &mut st, msg, reg2.now_ms()).and_then(|obs| match obs {
                                    Some(obs) => Ok(un.apply(&reg2, &host2, sid, obs, std::time::Instant::now())?),
                                    None => Ok(()),
                                })
                            })
                            .collect();
                        (st, un, rs)
                    })
                    .await
                    {
                        Ok((st, un, rs)) => {
                            intake = Some(st);
                            unwritten = Some(un);
                            rs
                        }
                        Err(e) => {
                            warn!(host = %host, "handling an agent message failed: {e}");
                            break;
                        }
                    }
                };
                for r in rs {
                    match r {
                        Ok(()) => {}
                        Err(MessageError::Failed(e)) => warn!(host = %host, "agent message not applied: {e}"),
                        Err(MessageError::Refused(r)) => refusals.refused(&reg, &host, &tx, r),
                    }
                }
            }
            if let Some(n) = unwritten.as_ref().map(Unwritten::len).filter(|n| *n > 0) {
                warn!(host = %host, waiting = n, "session closed with observations the database had not taken; the agent's next session sends a whole inventory");
            }
            // Writes the last-heard time: on a blocking thread.
            let (closing, h) = (reg.clone(), host.clone());
            let _ = tokio::task::spawn_blocking(move || closing.close_session(&h, sid)).await;
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
        // A command queued while this controller led is dropped here if it
        // no longer does when the stream hands it to the connection: no
        // command leaves after the leadership's deadline.
        let leading = self.reg.clone();
        let queued = futures::StreamExt::filter(ReceiverStream::new(rx), move |m| {
            let pass = leading.leads() || !matches!(m.msg, Some(controller_message::Msg::Command(_)));
            if !pass {
                tracing::warn!("a queued command was dropped: this controller no longer leads");
            }
            futures::future::ready(pass)
        });
        let out = futures::StreamExt::chain(
            futures::StreamExt::take_until(queued.map(|m| Ok(*m)), ended),
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

/// Agent messages already received that one blocking task takes in (the
/// 4 KiB stream window lets a page or two wait behind the one read): a
/// thread hand-off per message cost more than the message when 10,000
/// agents sent their inventories at once after a failover.
const BATCH: usize = 64;

/// Blocking tasks taking in inventory pages at once, across all sessions. Restoring,
/// checking and applying them is CPU work and the registry's lock: more
/// than two per core only adds blocking threads queued on that lock
/// (10,000 agents reconnecting after a failover queued hundreds, and the
/// inventories then took seconds longer). Other messages (command results,
/// changes) do not wait for these.
fn inventory_permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(2);
        tokio::sync::Semaphore::new(cores.saturating_mul(2).max(4))
    })
}

/// Answers a heartbeat (nothing to store: the caller has marked the host
/// heard).
fn answer_heartbeat(
    reg: &Registry,
    tx: &mpsc::Sender<Box<ControllerMessage>>,
    h: &lifeboat_proto::v1::Heartbeat,
) -> Result<(), MessageError> {
    intake::check_heartbeat(h)?;
    // A full outbound queue means the agent is not reading: drop the ack
    // rather than stall this stream.
    let _ = tx.try_send(Box::new(ControllerMessage {
        msg: Some(controller_message::Msg::HeartbeatAck(HeartbeatAck { seq: h.seq, handled_unix_ms: reg.now_ms() })),
    }));
    Ok(())
}

/// Completes, saying why, once the session is superseded by a newer one or
/// the controller `stop`s.
async fn session_ends(
    superseded: &mut tokio::sync::watch::Receiver<bool>,
    stop: Pin<&mut (impl std::future::Future<Output = ()> + ?Sized)>,
    host: &str,
) {
    tokio::select! {
        _ = superseded.wait_for(|s| *s) => info!(host, "session superseded by a newer one: closing it"),
        _ = stop => info!(host, "controller shutting down: closing the session"),
    }
}

/// Sleeps until `at` (forever when `None`; the caller guards the branch).
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Why a message after `Hello` was not applied.
#[derive(Debug)]
pub enum MessageError {
    /// The intake refused it whole (nothing stored); the agent is told.
    Refused(Refusal),
    /// It was valid but applying it failed (a database error, say).
    Failed(ControllerError),
}

impl From<Refusal> for MessageError {
    fn from(r: Refusal) -> Self {
        MessageError::Refused(r)
    }
}

impl From<ControllerError> for MessageError {
    fn from(e: ControllerError) -> Self {
        MessageError::Failed(e)
    }
}

/// Handles one agent message after `Hello` (heartbeats included): the
/// intake validates it (rules in [`crate::intake`]), then the registry
/// applies it. A refused message changes nothing. Tests call this directly;
/// the session's reader runs [`take_in`] and applies what it returns through
/// its [`Unwritten`] queue.
pub fn handle_message(
    reg: &Registry,
    host: &str,
    sid: SessionId,
    intake: &mut SessionIntake,
    msg: AgentMessage,
    now_ms: i64,
) -> Result<(), MessageError> {
    match take_in(reg, host, intake, msg, now_ms)? {
        Some(obs) => Ok(unwritten::apply_once(reg, host, sid, obs)?),
        None => Ok(()),
    }
}

/// The intake's part of one message: validates it and returns the
/// observation the registry is to apply (`None`: nothing to store, e.g. a
/// heartbeat, a page of an inventory still arriving, a command's result).
pub fn take_in(
    reg: &Registry,
    host: &str,
    intake: &mut SessionIntake,
    msg: AgentMessage,
    now_ms: i64,
) -> Result<Option<Observation>, MessageError> {
    match msg.msg {
        Some(Msg::Heartbeat(h)) => {
            intake::check_heartbeat(&h)?;
            Ok(None)
        }
        Some(Msg::Inventory(page)) => match intake.page(page, now_ms, &|| reg.reported_hashes(host))? {
            Page::Pending | Page::Discarded => Ok(None),
            Page::Complete(inv) => Ok(Some(Observation::Inventory(inv))),
        },
        Some(Msg::GuestChanged(c)) => {
            let g = intake.guest_changed(c, now_ms)?;
            if !reg.has_reported(host, &g.uuid) && reg.reported_count(host) >= intake::MAX_INVENTORY_GUESTS {
                return Err(Refusal {
                    kind: "GuestChanged",
                    field: "guest.uuid".into(),
                    reason: format!(
                        "{host} already has {} guests, the most one host may report",
                        intake::MAX_INVENTORY_GUESTS
                    ),
                }
                .into());
            }
            Ok(Some(Observation::Guest(Box::new(g))))
        }
        Some(Msg::GuestRemoved(r)) => {
            intake::check_removed(&r)?;
            // A removal of a guest this host never reported changes nothing
            // (the registry removes only from the sending host) and happens
            // honestly: a change dropped in a reconnect, or still waiting
            // for the database. Dropped quietly, like a late result.
            if !reg.has_reported(host, &r.uuid) {
                tracing::debug!(host, uuid = %r.uuid, "a removal of a guest this host did not report dropped");
                return Ok(None);
            }
            Ok(Some(Observation::Removed(r.uuid)))
        }
        Some(Msg::Host(h)) => {
            intake::check_host_info("HostInfo", "", &h)?;
            Ok(Some(Observation::Host(Box::new(h))))
        }
        Some(Msg::CommandResult(r)) => {
            if let Err(refusal) = intake::check_command_result(&r) {
                // The caller learns at once that the answer was refused,
                // instead of waiting out its timeout; a result for another
                // host's command completes nothing.
                if intake::check_uuid("CommandResult", "id", &r.id).is_ok() {
                    let failed = CommandResult {
                        id: r.id,
                        ok: false,
                        error: format!("the agent's answer was refused by the controller's intake: {refusal}"),
                        ..Default::default()
                    };
                    let _ = reg.complete_from(host, failed);
                }
                return Err(refusal.into());
            }
            let id = r.id.clone();
            match reg.complete_from(host, r) {
                Some(true) => Ok(None),
                Some(false) => Err(Refusal {
                    kind: "CommandResult",
                    field: "id".into(),
                    reason: format!("command {id} was sent to another host; a host answers only its own commands"),
                }
                .into()),
                // A late answer (the caller timed out, or the session was
                // replaced) is an honest agent's normal race: dropped quietly.
                None => {
                    tracing::debug!(host, command = %id, "a result for no awaited command dropped");
                    Ok(None)
                }
            }
        }
        Some(Msg::Hello(_)) => {
            Err(Refusal { kind: "Hello", field: "hello".into(), reason: "Hello sent twice in one session".into() }
                .into())
        }
        None => {
            Err(Refusal { kind: "message", field: "msg".into(), reason: "empty message (no known kind set)".into() }
                .into())
        }
    }
}

/// Least time between two log lines or alarm refreshes about one session's
/// refused messages (ms): a flood of bad messages costs a counter each.
pub const REFUSAL_REPORT_INTERVAL_MS: i64 = 10_000;

/// Reports one session's refusals: the agent gets a `Refused` for each
/// (when its queue has room), the metric counts each, the log and the host's
/// `agent-input-refused` alarm at most once per [`REFUSAL_REPORT_INTERVAL_MS`].
#[derive(Debug, Default)]
struct RefusalReport {
    last_ms: i64,
    total: u64,
    unreported: u64,
}

impl RefusalReport {
    fn refused(&mut self, reg: &Arc<Registry>, host: &str, tx: &mpsc::Sender<Box<ControllerMessage>>, r: Refusal) {
        crate::metrics::agent_message_refused(r.kind);
        self.total = self.total.saturating_add(1);
        self.unreported = self.unreported.saturating_add(1);
        let _ = tx.try_send(Box::new(ControllerMessage {
            msg: Some(controller_message::Msg::Refused(Refused { what: r.what(), reason: r.reason.clone() })),
        }));
        let now = reg.now_ms();
        if self.last_ms != 0 && now.saturating_sub(self.last_ms) < REFUSAL_REPORT_INTERVAL_MS {
            return;
        }
        self.last_ms = now;
        warn!(host = %host, field = %r.what(), refused_since_last_line = self.unreported, "refused an agent message whole: {r}");
        self.unreported = 0;
        let detail = format!(
            "the agent of {host} sent a message the controller refused whole (nothing of it was stored; {} refused in its \
             current session): {r}. A buggy, mismatched or compromised agent: check `journalctl -u lifeboat-agent` on {host} \
             and that its version matches the controller's; if the host is not trusted, revoke its certificate. Clear with \
             `lifeboat alarms clear --host {host} --kind agent-input-refused`",
            self.total
        );
        // Awaited on the store thread, never under the registry lock.
        let (reg, host) = (reg.clone(), host.to_string());
        tokio::spawn(async move {
            if let Err(e) = reg.raise_or_refresh_alarm(&host, "agent-input-refused", &detail).await {
                warn!(host = %host, "recording the agent-input-refused alarm failed: {e}");
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::domain::host::Timing;
    use lifeboat_proto::v1::{Guest, GuestChanged, GuestRemoved, HostInfo, Inventory};

    fn uuid(i: usize) -> String {
        format!("00000000-0000-4000-8000-{i:012x}")
    }

    fn guest(i: usize) -> Guest {
        let mut g = Guest {
            uuid: uuid(i),
            name: format!("vm{i}"),
            state: 6,
            memory_kib: 1024,
            definition_xml: format!("<domain><name>vm{i}</name></domain>"),
            ..Default::default()
        };
        lifeboat_proto::pack_definition(&mut g);
        g
    }

    fn inv(guests: Vec<Guest>, more: bool) -> AgentMessage {
        AgentMessage { msg: Some(Msg::Inventory(Inventory { host: None, guests, more })) }
    }

    fn names(reg: &Registry) -> Vec<String> {
        reg.list_guests(None, None, false).unwrap().into_iter().map(|r| r.guest.unwrap().name).collect()
    }

    #[test]
    fn pages_are_gathered_and_a_refused_inventory_stores_nothing_not_even_its_last_page() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let sid = reg.open_session("h", "boot", tx).unwrap();
        let mut st = SessionIntake::new(0);
        handle_message(&reg, "h", sid, &mut st, inv(vec![guest(1)], true), 0).unwrap();
        handle_message(&reg, "h", sid, &mut st, inv(vec![guest(2)], false), 0).unwrap();
        assert_eq!(names(&reg), ["vm1", "vm2"]);
        let mut bad = guest(4);
        bad.memory_kib = u64::MAX;
        handle_message(&reg, "h", sid, &mut st, inv(vec![guest(3)], true), 0).unwrap();
        let e = handle_message(&reg, "h", sid, &mut st, inv(vec![bad], true), 0).unwrap_err();
        assert!(matches!(&e, MessageError::Refused(r) if r.field == "guests[1].memory_kib"), "{e:?}");
        handle_message(&reg, "h", sid, &mut st, inv(vec![guest(5)], false), 0).unwrap();
        assert_eq!(names(&reg), ["vm1", "vm2"], "the refused inventory's last page must not replace the host's guests");
    }

    #[test]
    fn removals_and_results_for_what_the_host_does_not_own_change_nothing() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, mut _rx) = mpsc::channel(8);
        let (tx2, _rx2) = mpsc::channel(8);
        let a = reg.open_session("a", "boot", tx).unwrap();
        let b = reg.open_session("b", "boot", tx2).unwrap();
        let mut st = SessionIntake::new(0);
        handle_message(&reg, "a", a, &mut st, inv(vec![guest(1)], false), 0).unwrap();
        let rm = AgentMessage { msg: Some(Msg::GuestRemoved(GuestRemoved { uuid: uuid(1), name: "vm1".into() })) };
        handle_message(&reg, "b", b, &mut SessionIntake::new(0), rm, 0).expect("an unknown removal is dropped quietly");
        assert_eq!(names(&reg), ["vm1"], "b cannot remove a's guest");
        let res = |id: String| AgentMessage {
            msg: Some(Msg::CommandResult(lifeboat_proto::v1::CommandResult { id, ok: true, ..Default::default() })),
        };
        assert!(handle_message(&reg, "b", b, &mut st, res(uuid(9)), 0).is_ok(), "a late answer is dropped quietly");
        // A result for a command awaiting host a's answer, sent by b: refused, a's command still waits.
        let reg = std::sync::Arc::new(reg);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let r2 = reg.clone();
            let call = tokio::spawn(async move {
                r2.call(
                    "a",
                    lifeboat_proto::v1::command::Kind::CheckPaths(Default::default()),
                    std::time::Duration::from_secs(5),
                )
                .await
            });
            let id = loop {
                tokio::task::yield_now().await;
                if let Ok(Some(controller_message::Msg::Command(c))) = _rx.try_recv().map(|m| m.msg) {
                    break c.id;
                }
            };
            let e = handle_message(&reg, "b", b, &mut SessionIntake::new(0), res(id.clone()), 0).unwrap_err();
            assert!(matches!(&e, MessageError::Refused(r) if r.what() == "CommandResult id"), "{e:?}");
            handle_message(&reg, "a", a, &mut SessionIntake::new(0), res(id), 0).unwrap();
            assert!(call.await.unwrap().unwrap().ok);
        });
        let reg = std::sync::Arc::try_unwrap(reg).ok().unwrap();
        let twice = AgentMessage { msg: Some(Msg::Hello(Default::default())) };
        assert!(
            matches!(handle_message(&reg, "a", a, &mut st, twice, 0), Err(MessageError::Refused(r)) if r.kind == "Hello")
        );
        let host =
            AgentMessage { msg: Some(Msg::Host(HostInfo { hostname: "x\u{1b}[2J".into(), ..Default::default() })) };
        assert!(
            matches!(handle_message(&reg, "a", a, &mut st, host, 0), Err(MessageError::Refused(r)) if r.field == "hostname")
        );
        assert!(reg.get_host("a").unwrap().info.unwrap().hostname.is_empty());
        let mut g = guest(2);
        g.uuid = "../../x".into();
        let ch = AgentMessage { msg: Some(Msg::GuestChanged(GuestChanged { guest: Some(g) })) };
        assert!(
            matches!(handle_message(&reg, "a", a, &mut st, ch, 0), Err(MessageError::Refused(r)) if r.field == "guest.uuid")
        );
        assert_eq!(names(&reg), ["vm1"]);
    }
}

#[cfg(test)]
mod inventory_tests {
    use super::*;
    use crate::intake::SessionIntake;
    use crate::registry::Registry;
    use crate::rpc::unwritten::{Observation, apply_once};
    use lifeboat_proto::v1::GuestState;
    use lifeboat_proto::v1::{Guest, Inventory};
    use std::sync::Arc;

    const U: &str = "6f1c7e2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn packed(state: GuestState, xml: &str) -> Guest {
        let mut g = Guest {
            uuid: U.into(),
            name: "vm1".into(),
            state: state as i32,
            memory_kib: 1024,
            vcpus: 1,
            definition_xml: xml.into(),
            ..Default::default()
        };
        lifeboat_proto::pack_definition(&mut g);
        assert!(!g.definition_deflate.is_empty() && g.definition_xml.is_empty());
        g
    }

    fn inventory(g: Guest) -> AgentMessage {
        AgentMessage { msg: Some(Msg::Inventory(Inventory { host: None, guests: vec![g], more: false })) }
    }

    /// What the session reader makes of one inventory message.
    fn taken(reg: &Registry, intake: &mut SessionIntake, m: AgentMessage) -> Inventory {
        match take_in(reg, "a", intake, m, reg.now_ms()) {
            Ok(Some(Observation::Inventory(inv))) => *inv,
            other => panic!("expected an inventory, got {other:?}"),
        }
    }

    fn stored(reg: &Registry) -> Vec<crate::ports::GuestRow> {
        reg.repos().call_blocking(|r| r.guests().all()).unwrap()
    }

    #[test]
    fn an_unchanged_guest_is_neither_inflated_nor_written_and_a_stale_match_is_checked_before_it_is_stored() {
        let clock = Arc::new(crate::ports::ManualClock::new(1_000));
        let timing = crate::domain::host::Timing { heartbeat_interval_ms: 1000, unreachable_after_ms: 3000 };
        let repos = crate::store::sqlite::SqliteRepos::start_in_memory().unwrap();
        let reg = Registry::load_with_clock(repos, timing, clock.clone()).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        let sid = reg.open_session("a", "boot", tx).unwrap();
        let xml = format!("<domain><name>vm1</name><uuid>{U}</uuid>{}</domain>", "<!-- padding -->".repeat(200));
        let mut intake = SessionIntake::new(reg.now_ms());

        // First report: restored, checked, stored whole with the digest of the bytes that came.
        let first = packed(GuestState::Running, &xml);
        let inv = taken(&reg, &mut intake, inventory(first.clone()));
        assert_eq!(inv.guests[0].definition_xml, xml, "a new guest is restored");
        assert!(inv.guests[0].definition_deflate.is_empty());
        apply_once(&reg, "a", sid, Observation::Inventory(Box::new(inv))).unwrap();
        let rows = stored(&reg);
        assert_eq!((rows.len(), rows[0].guest.definition_xml.as_str(), rows[0].updated_ms), (1, xml.as_str(), 1_000));
        assert_eq!(rows[0].guest.definition_digest, crate::intake::definition_digest(&first));

        // The same report again (a reconnect, a failover): kept packed, not written.
        clock.advance(5_000);
        let inv = taken(&reg, &mut intake, inventory(first.clone()));
        assert!(inv.guests[0].definition_xml.is_empty(), "not inflated");
        assert_eq!(inv.guests[0].definition_deflate, first.definition_deflate);
        apply_once(&reg, "a", sid, Observation::Inventory(Box::new(inv))).unwrap();
        let rows = stored(&reg);
        assert_eq!((rows[0].guest.definition_xml.as_str(), rows[0].updated_ms), (xml.as_str(), 1_000), "not written");
        assert!(reg.inventory_fresh("a"), "the kept inventory counts as this session's inventory");

        // The same definition with another state: restored and written (the row is whole).
        let paused = packed(GuestState::Paused, &xml);
        let inv = taken(&reg, &mut intake, inventory(paused.clone()));
        assert_eq!(inv.guests[0].definition_xml, xml);
        apply_once(&reg, "a", sid, Observation::Inventory(Box::new(inv))).unwrap();
        assert_eq!(stored(&reg)[0].updated_ms, 6_000);
        assert_eq!(stored(&reg)[0].guest.state, GuestState::Paused as i32);

        // Found unchanged, but the entry changes before the inventory is
        // applied (here a report of the guest running): the kept definition is
        // restored and checked under the lock, and stored whole.
        let inv = taken(&reg, &mut intake, inventory(paused.clone()));
        assert!(inv.guests[0].definition_xml.is_empty(), "kept packed");
        let mut running = packed(GuestState::Running, &xml);
        running.definition_digest = crate::intake::definition_digest(&running);
        lifeboat_proto::unpack_definition(&mut running).unwrap();
        reg.apply_guest("a", sid, running).unwrap();
        clock.advance(1_000);
        apply_once(&reg, "a", sid, Observation::Inventory(Box::new(inv))).unwrap();
        let rows = stored(&reg);
        assert_eq!(
            (rows[0].guest.state, rows[0].guest.definition_xml.as_str(), rows[0].updated_ms),
            (GuestState::Paused as i32, xml.as_str(), 7_000)
        );
        assert!(rows[0].guest.definition_deflate.is_empty(), "never stored packed");

        // A kept guest whose packed bytes do not inflate and whose entry
        // differs by now: the inventory is refused whole, nothing changes.
        let mut corrupt = paused.clone();
        corrupt.definition_deflate = vec![0x78, 0x9c, 0xff, 0xff, 0xff];
        corrupt.definition_digest = crate::intake::definition_digest(&corrupt);
        let before = stored(&reg);
        let e = apply_once(
            &reg,
            "a",
            sid,
            Observation::Inventory(Box::new(Inventory { host: None, guests: vec![corrupt], more: false })),
        )
        .unwrap_err();
        assert!(e.to_string().contains("definition_deflate"), "{e}");
        assert_eq!(stored(&reg)[0].updated_ms, before[0].updated_ms);
        assert_eq!(stored(&reg)[0].guest.definition_xml, xml);
        // And a packed guest change that did not pass the intake is refused.
        let e = reg.apply_guest("a", sid, paused).unwrap_err();
        assert!(e.to_string().contains("packed"), "{e}");
    }
}
