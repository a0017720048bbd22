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
        // The Welcome is queued first: the session's lease grant is decided
        // as it opens and may be queued by another task at once. (A refused
        // opening drops the queue unsent.)
        let welcome = ControllerMessage {
            msg: Some(controller_message::Msg::Welcome(Welcome {
                heartbeat_interval_ms: timing.heartbeat_interval_ms,
                epoch: self.reg.epoch(),
            })),
        };
        tx.try_send(Box::new(welcome)).map_err(|e| ControllerError::Internal(format!("queueing the Welcome: {e}")))?;
        // It may write (a new host, a return from OFFLINE, an alarm) under the
        // registry lock: on a blocking thread, never on an async worker.
        let (reg, host, boot, stx) = (self.reg.clone(), cert_host.clone(), hello.boot_id.clone(), tx.clone());
        let (sid, mut superseded) = tokio::task::spawn_blocking(move || reg.open_session_from(&host, &boot, stx, peer))
            .await
            .map_err(|e| ControllerError::Internal(format!("opening a session: {e}")))??;
        info!(host = %cert_host, ?peer, agent_version = %hello.agent_version, boot_id = %hello.boot_id, "agent session opened");
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
                // Heartbeats and unordered command results are answered at
                // once, here and behind a batch alike.
                let mut now = |m: AgentMessage| {
                    let answered = match m.msg {
                        Some(Msg::Heartbeat(ref h)) => answer_heartbeat(&reg, &tx, h),
                        Some(Msg::CommandResult(r)) if reg.answers_unordered(&host, &r.id) => {
                            complete_result(&reg, &host, r)
                        }
                        _ => return Some(m),
                    };
                    if let Err(MessageError::Refused(r)) = answered {
                        refusals.refused(&reg, &host, &tx, r);
                    }
                    None
                };
                let Some(msg) = now(msg) else { continue };
                let rs: Vec<Result<(), MessageError>> = {
                    // Inflating, validating and writing run on a blocking
                    // thread: a session busy with a large inventory must not
                    // hold up the runtime threads other sessions' heartbeats
                    // are read on. The messages received behind this one go
                    // along; inventory work waits for a permit (see [`gather`]).
                    let gathered = gather(
                        msg,
                        &mut inbound,
                        &mut stash,
                        inventory_permits(),
                        session_ends(&mut reader_superseded, stop.as_mut(), &host),
                        now,
                        || heard.store(reg.now_ms(), std::sync::atomic::Ordering::Relaxed),
                    )
                    .await;
                    let Some((batch, _permit)) = gathered else { break };
                    let (reg2, host2) = (reg.clone(), host.clone());
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

/// Encoded bytes of agent messages past which a batch reads no further:
/// the inventory of a host with a few dozen guests (definitions packed,
/// about ten 3 KiB pages) in one batch, and a bound on what 10,000 sessions
/// waiting for an inventory permit after a failover hold in memory
/// together. A message is sized only once read, so a batch holds at most
/// this much plus one message (up to [`intake::MAX_AGENT_MESSAGE_BYTES`]).
const BATCH_BYTES: usize = 32 * 1024;

/// Messages one blocking task takes in, in the order they arrived.
struct Batch {
    messages: Vec<AgentMessage>,
    bytes: usize,
}

impl Batch {
    fn new(first: AgentMessage) -> Self {
        let bytes = prost::Message::encoded_len(&first);
        Batch { messages: vec![first], bytes }
    }

    /// Whether it takes another message (below [`BATCH`] and [`BATCH_BYTES`]).
    fn wants_more(&self) -> bool {
        self.messages.len() < BATCH && self.bytes < BATCH_BYTES
    }

    fn has_inventory(&self) -> bool {
        self.messages.iter().any(|m| matches!(m.msg, Some(Msg::Inventory(_))))
    }

    /// Takes one more message read behind the batch: `now` answers what
    /// must not wait behind inventory work and depends on no order (it
    /// returns `None`), anything else joins the batch.
    fn push(&mut self, m: AgentMessage, now: &mut impl FnMut(AgentMessage) -> Option<AgentMessage>) {
        if let Some(m) = now(m) {
            self.bytes = self.bytes.saturating_add(prost::Message::encoded_len(&m));
            self.messages.push(m);
        }
    }
}

/// Gathers the messages already received behind `first` into one batch
/// (`now` takes heartbeats and unordered command results at once, see
/// [`Batch::push`]; `heard` is called for every message read). A
/// batch with inventory work then waits for one of `permits`, reading on
/// meanwhile up to the batch's bounds: the agent's heartbeats are answered
/// and keep it reachable however long the wait, and the rest of its
/// inventory joins the batch, so a whole inventory is taken in at one permit
/// rather than a page per turn (10,000 inventories after a failover then
/// complete one after another, not all together at the end). A stream end or
/// error read is left in `stash`, for after the batch. `None`: the session
/// ended (`ends` completed) while it waited.
async fn gather<'p, S>(
    first: AgentMessage,
    inbound: &mut S,
    stash: &mut Option<Result<Option<AgentMessage>, Status>>,
    permits: &'p tokio::sync::Semaphore,
    ends: impl std::future::Future<Output = ()>,
    mut now: impl FnMut(AgentMessage) -> Option<AgentMessage>,
    mut heard: impl FnMut(),
) -> Option<(Vec<AgentMessage>, Option<tokio::sync::SemaphorePermit<'p>>)>
where
    S: Stream<Item = Result<AgentMessage, Status>> + Unpin,
{
    let mut batch = Batch::new(first);
    while stash.is_none() && batch.wants_more() {
        match futures::FutureExt::now_or_never(inbound.next()) {
            Some(Some(Ok(m))) => {
                heard();
                batch.push(m, &mut now);
            }
            Some(other) => *stash = Some(other.transpose()),
            None => break,
        }
    }
    if !batch.has_inventory() {
        return Some((batch.messages, None));
    }
    tokio::pin!(ends);
    // One acquire for the whole wait: a new one per message read would go
    // to the back of the semaphore's queue each time.
    let acquire = permits.acquire();
    tokio::pin!(acquire);
    loop {
        tokio::select! {
            biased;
            p = &mut acquire => return Some((batch.messages, p.ok())),
            _ = &mut ends => return None,
            m = inbound.next(), if stash.is_none() && batch.wants_more() => match m {
                Some(Ok(m)) => {
                    heard();
                    batch.push(m, &mut now);
                }
                other => *stash = Some(other.transpose()),
            },
        }
    }
}

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

/// Takes in a command's result: checked, then it completes the command
/// sent to `host` that awaits it.
fn complete_result(reg: &Registry, host: &str, r: CommandResult) -> Result<(), MessageError> {
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
        Some(true) => Ok(()),
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
            Ok(())
        }
    }
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
            complete_result(reg, host, r)?;
            Ok(None)
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

#[cfg(test)]
mod gather_tests {
    //! The session reader's batching: heartbeats are answered while a batch
    //! waits for an inventory permit, within the batch's bounds.
    use super::*;
    use lifeboat_proto::v1::{Guest, GuestChanged, Heartbeat, Inventory};
    use std::sync::Mutex;

    type Inbound = mpsc::Sender<Result<AgentMessage, Status>>;

    fn page(n: usize, bytes: usize) -> AgentMessage {
        let g = Guest { uuid: format!("u{n}"), definition_deflate: vec![7; bytes], ..Default::default() };
        AgentMessage { msg: Some(Msg::Inventory(Inventory { host: None, guests: vec![g], more: true })) }
    }

    fn beat(seq: u64) -> AgentMessage {
        AgentMessage { msg: Some(Msg::Heartbeat(Heartbeat { seq, ..Default::default() })) }
    }

    fn uuids(batch: &[AgentMessage]) -> Vec<String> {
        batch
            .iter()
            .map(|m| match &m.msg {
                Some(Msg::Inventory(i)) => i.guests[0].uuid.clone(),
                Some(Msg::GuestChanged(c)) => {
                    format!("changed {}", c.guest.as_ref().map(|g| g.uuid.as_str()).unwrap_or(""))
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// The permit a batch got (`None`: it needed none).
    struct Held(Option<tokio::sync::SemaphorePermit<'static>>);

    impl Held {
        fn is_some(&self) -> bool {
            self.0.is_some()
        }
    }

    /// Runs `gather` on its own task; returns the inbound sender, the
    /// answered heartbeats, the count of messages read, and the task.
    #[allow(clippy::type_complexity)]
    fn start(
        first: AgentMessage,
        permits: &'static tokio::sync::Semaphore,
        ends: tokio::sync::oneshot::Receiver<()>,
    ) -> (
        Inbound,
        Arc<Mutex<Vec<u64>>>,
        Arc<Mutex<usize>>,
        tokio::task::JoinHandle<Option<(Vec<AgentMessage>, Held, Option<Result<Option<AgentMessage>, Status>>)>>,
    ) {
        let (tx, rx) = mpsc::channel(256);
        let beats = Arc::new(Mutex::new(Vec::new()));
        let read = Arc::new(Mutex::new(0usize));
        let (b, r) = (beats.clone(), read.clone());
        let task = tokio::spawn(async move {
            let mut inbound = ReceiverStream::new(rx);
            let mut stash = None;
            let ends = async move {
                let _ = ends.await;
            };
            let got = gather(
                first,
                &mut inbound,
                &mut stash,
                permits,
                ends,
                |m| match m.msg {
                    Some(Msg::Heartbeat(h)) => {
                        b.lock().unwrap().push(h.seq);
                        None
                    }
                    // Stands for a result the registry says may jump the queue.
                    Some(Msg::CommandResult(r)) if r.id.starts_with("unordered") => {
                        b.lock().unwrap().push(1000);
                        None
                    }
                    _ => Some(m),
                },
                || {
                    let mut n = r.lock().unwrap();
                    *n = (*n).saturating_add(1);
                },
            )
            .await;
            got.map(|(batch, permit)| (batch, Held(permit), stash))
        });
        (tx, beats, read, task)
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn permits(n: usize) -> &'static tokio::sync::Semaphore {
        Box::leak(Box::new(tokio::sync::Semaphore::new(n)))
    }

    #[tokio::test]
    async fn heartbeats_are_answered_while_an_inventory_waits_for_its_permit_and_its_pages_join_the_batch() {
        let sem = permits(0);
        let (_end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (tx, beats, read, task) = start(page(1, 100), sem, end_rx);
        tx.send(Ok(beat(1))).await.unwrap();
        tx.send(Ok(page(2, 100))).await.unwrap();
        until("the first heartbeat answered", || *beats.lock().unwrap() == [1]).await;
        // Long after the batch started waiting: still read, still answered.
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(Ok(beat(2))).await.unwrap();
        let changed = Guest { uuid: "c".into(), ..Default::default() };
        tx.send(Ok(AgentMessage { msg: Some(Msg::GuestChanged(GuestChanged { guest: Some(changed) })) }))
            .await
            .unwrap();
        tx.send(Ok(page(3, 100))).await.unwrap();
        until("the second heartbeat answered", || *beats.lock().unwrap() == [1, 2]).await;
        until("every message read", || *read.lock().unwrap() == 5).await;
        assert!(!task.is_finished(), "no permit yet: the batch waits");
        sem.add_permits(1);
        let (batch, permit, stash) = task.await.unwrap().expect("not ended");
        assert!(permit.is_some(), "it holds the permit");
        assert!(stash.is_none());
        assert_eq!(uuids(&batch), ["u1", "u2", "changed c", "u3"], "in arrival order, without the heartbeats");
    }

    #[tokio::test]
    async fn an_unordered_result_is_taken_at_once_and_an_ordered_one_keeps_its_place() {
        let sem = permits(0);
        let (_end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (tx, answered, _, task) = start(page(1, 100), sem, end_rx);
        let result = |id: &str| AgentMessage {
            msg: Some(Msg::CommandResult(CommandResult { id: id.into(), ok: true, ..Default::default() })),
        };
        tx.send(Ok(result("ordered"))).await.unwrap();
        tx.send(Ok(result("unordered-grant"))).await.unwrap();
        until("the unordered result taken", || *answered.lock().unwrap() == [1000]).await;
        sem.add_permits(1);
        let (batch, _, _) = task.await.unwrap().expect("not ended");
        assert_eq!(uuids(&batch).len(), 2);
        assert!(matches!(&batch[1].msg, Some(Msg::CommandResult(r)) if r.id == "ordered"), "{batch:?}");
    }

    #[tokio::test]
    async fn a_waiting_batch_reads_no_further_than_its_bounds() {
        let sem = permits(0);
        let (_end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (tx, beats, read, task) = start(page(0, 100), sem, end_rx);
        let per = 10 * 1024;
        for n in 1..=6 {
            tx.send(Ok(page(n, per))).await.unwrap();
        }
        tx.send(Ok(beat(9))).await.unwrap();
        // 4 pages of 10 KiB pass 32 KiB: the batch stops reading there.
        until("four pages read", || *read.lock().unwrap() == 4).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*read.lock().unwrap(), 4, "nothing read past the bound");
        assert!(beats.lock().unwrap().is_empty(), "the heartbeat behind waits in the stream (flow control)");
        assert_eq!(tx.max_capacity() - tx.capacity(), 3, "three messages left unread");
        sem.add_permits(1);
        let (batch, _, _) = task.await.unwrap().expect("not ended");
        assert_eq!(uuids(&batch), ["u0", "u1", "u2", "u3", "u4"]);
        let bytes: usize = batch.iter().map(prost::Message::encoded_len).sum();
        assert!(bytes < BATCH_BYTES + per + 64, "{bytes}");

        // A first message past the bound (it may be as large as a message
        // may be): nothing more is read while it waits.
        let sem = permits(0);
        let (_end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (tx, _, read, task) = start(page(0, BATCH_BYTES * 2), sem, end_rx);
        tx.send(Ok(page(1, 10))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*read.lock().unwrap(), 0);
        sem.add_permits(1);
        assert_eq!(task.await.unwrap().expect("not ended").0.len(), 1);

        // At most BATCH messages, however small.
        let sem = permits(0);
        let (_end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (tx, _, read, task) = start(page(0, 1), sem, end_rx);
        for n in 1..=(BATCH + 10) {
            tx.send(Ok(page(n, 1))).await.unwrap();
        }
        until("a full batch read", || *read.lock().unwrap() == BATCH - 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*read.lock().unwrap(), BATCH - 1);
        sem.add_permits(1);
        assert_eq!(task.await.unwrap().expect("not ended").0.len(), BATCH);
    }

    #[tokio::test]
    async fn a_session_that_ends_while_waiting_stops_and_a_stream_end_waits_for_the_batch() {
        let sem = permits(0);
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (_tx, _, _, task) = start(page(1, 10), sem, end_rx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        end_tx.send(()).unwrap();
        assert!(task.await.unwrap().is_none(), "ended: no batch, no permit");
        assert_eq!(sem.available_permits(), 0);

        // The agent closes its stream behind two pages: both are taken in
        // first, the end is left for after them.
        let sem = permits(0);
        let (_end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (tx, _, _, task) = start(page(1, 10), sem, end_rx);
        tx.send(Ok(page(2, 10))).await.unwrap();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        sem.add_permits(1);
        let (batch, permit, stash) = task.await.unwrap().expect("not ended");
        assert!(permit.is_some());
        assert_eq!(uuids(&batch), ["u1", "u2"]);
        assert!(matches!(stash, Some(Ok(None))), "{stash:?}");

        // A stream error likewise.
        let sem = permits(1);
        let (_end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (tx, _, _, task) = start(page(1, 10), sem, end_rx);
        tx.send(Err(Status::internal("reset"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (batch, _, stash) = task.await.unwrap().expect("not ended");
        assert_eq!(batch.len(), 1);
        assert!(matches!(stash, Some(Err(_))));
    }

    #[tokio::test]
    async fn a_batch_that_reads_while_it_waits_keeps_its_place_in_the_permit_queue() {
        let sem = permits(0);
        let (_a_end, a_rx) = tokio::sync::oneshot::channel();
        let (a_tx, a_beats, _, a) = start(page(1, 10), sem, a_rx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_b_end, b_rx) = tokio::sync::oneshot::channel();
        let (_b_tx, _, _, b) = start(page(2, 10), sem, b_rx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The first to wait reads heartbeats meanwhile, after the second queued.
        for seq in 1..=3 {
            a_tx.send(Ok(beat(seq))).await.unwrap();
        }
        until("a's heartbeats answered", || a_beats.lock().unwrap().len() == 3).await;
        sem.add_permits(1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(a.is_finished() && !b.is_finished(), "the first to wait is served first");
        let (batch, permit, _) = a.await.unwrap().unwrap();
        assert!(permit.is_some() && uuids(&batch) == ["u1"]);
        drop(permit);
        let (batch, _, _) = tokio::time::timeout(Duration::from_secs(5), b).await.unwrap().unwrap().unwrap();
        assert_eq!(uuids(&batch), ["u2"], "then the second");
    }

    #[tokio::test]
    async fn a_stream_that_ends_while_the_batch_waits_is_left_for_after_it() {
        let sem = permits(0);
        let (_end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (tx, _, read, task) = start(page(1, 10), sem, end_rx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Ok(page(2, 10))).await.unwrap();
        until("the second page read while waiting", || *read.lock().unwrap() == 1).await;
        drop(tx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!task.is_finished(), "the end waits for the batch's permit");
        sem.add_permits(1);
        let (batch, _, stash) = task.await.unwrap().expect("not ended");
        assert_eq!(uuids(&batch), ["u1", "u2"]);
        assert!(matches!(stash, Some(Ok(None))), "{stash:?}");
    }

    #[tokio::test]
    async fn a_batch_without_inventory_work_does_not_wait_for_a_permit() {
        let sem = permits(0);
        let (_end_tx, end_rx) = tokio::sync::oneshot::channel();
        let changed = Guest { uuid: "c".into(), ..Default::default() };
        let first = AgentMessage { msg: Some(Msg::GuestChanged(GuestChanged { guest: Some(changed) })) };
        let (_tx, _, _, task) = start(first, sem, end_rx);
        let (batch, permit, _) = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap().unwrap();
        assert_eq!(batch.len(), 1);
        assert!(!permit.is_some());
    }
}
