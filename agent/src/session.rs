//! The agent's gRPC session to the controller: dial, say hello, send the
//! inventory and then changes and heartbeats; reconnect with backoff.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lifeboat_common::tls::TlsMaterial;
use lifeboat_proto::v1::{
    AgentMessage, GuestChanged, GuestRemoved, Heartbeat, Hello, agent_message, agent_session_client::AgentSessionClient,
    controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::hostfacts;
use crate::libvirt::{Actor, Shared, Update};

/// Session settings and handles.
pub struct Session {
    url: String,
    server_name: String,
    host_id: String,
    boot_id_file: std::path::PathBuf,
    tls: TlsMaterial,
    actor: Actor,
    shared: Arc<Shared>,
}

/// Why one session attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Could not reach or handshake with the controller.
    #[error("cannot connect to controller {url}: {source}")]
    Connect {
        /// Controller URL.
        url: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The controller refused or ended the session.
    #[error("controller ended the session: {0}")]
    Status(#[from] tonic::Status),
    /// The controller sent something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Session {
    /// Prepares a session; nothing is dialled until [`Session::run`].
    pub fn new(cfg: &AgentConfig, host_id: String, tls: TlsMaterial, actor: Actor, shared: Arc<Shared>) -> Self {
        Session {
            url: cfg.controller.url.clone(),
            server_name: cfg.controller.server_name.clone(),
            host_id,
            boot_id_file: cfg.boot_id_file.clone(),
            tls,
            actor,
            shared,
        }
    }

    /// Keeps a session open forever, reconnecting with capped exponential
    /// backoff (0.5 s .. 10 s, with jitter).
    pub async fn run(&self, mut updates: mpsc::Receiver<Update>) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(500);
        loop {
            let started = Instant::now();
            match self.once(&mut updates).await {
                Ok(()) => info!("session closed by controller"),
                Err(e) => warn!("{}", lifeboat_common::error_chain(&e)),
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(500);
            }
            let jitter = Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * 2);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn channel(&self) -> Result<Channel, SessionError> {
        let err = |source| SessionError::Connect { url: self.url.clone(), source };
        Endpoint::from_shared(self.url.clone())
            .map_err(err)?
            .tls_config(self.tls.client_config(&self.server_name))
            .map_err(err)?
            .connect_timeout(Duration::from_secs(3))
            .tcp_keepalive(Some(Duration::from_secs(10)))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(err)
    }

    async fn once(&self, updates: &mut mpsc::Receiver<Update>) -> Result<(), SessionError> {
        let channel = self.channel().await?;
        let mut client = AgentSessionClient::new(channel);
        let (tx, rx) = mpsc::channel::<AgentMessage>(256);
        let send = |m: agent_message::Msg| AgentMessage { msg: Some(m) };
        let boot_id = hostfacts::read_trimmed(&self.boot_id_file).unwrap_or_default();
        let _ = tx
            .send(send(agent_message::Msg::Hello(Hello {
                host_id: self.host_id.clone(),
                agent_version: lifeboat_common::VERSION.to_string(),
                boot_id,
            })))
            .await;
        let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        let welcome = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Err(_) => return Err(SessionError::Protocol("no Welcome within 10 s".into())),
            Ok(r) => match r?.and_then(|m| m.msg) {
                Some(controller_message::Msg::Welcome(w)) => w,
                other => return Err(SessionError::Protocol(format!("expected Welcome, got {other:?}"))),
            },
        };
        let hb_ms = u64::from(welcome.heartbeat_interval_ms.max(100));
        info!(controller = %self.url, heartbeat_ms = hb_ms, "session established");
        crate::metrics::get().session_up.store(true, Ordering::Relaxed);
        let r = self.serve(updates, tx, inbound, hb_ms).await;
        crate::metrics::get().session_up.store(false, Ordering::Relaxed);
        r
    }

    async fn serve(
        &self,
        updates: &mut mpsc::Receiver<Update>,
        tx: mpsc::Sender<AgentMessage>,
        mut inbound: tonic::Streaming<lifeboat_proto::v1::ControllerMessage>,
        hb_ms: u64,
    ) -> Result<(), SessionError> {
        let send = |m: agent_message::Msg| AgentMessage { msg: Some(m) };
        while updates.try_recv().is_ok() {}
        self.actor.request_snapshot();
        let mut hb = tokio::time::interval(Duration::from_millis(hb_ms));
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // The controller answers every heartbeat; a session that stops
        // answering is dead even while TCP still looks open (a healed
        // partition can leave such a stream behind): dial again.
        let silent_limit = Duration::from_millis((hb_ms * 5).max(3000));
        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = hb.tick() => {
                    if last_heard.elapsed() > silent_limit {
                        return Err(SessionError::Protocol(format!(
                            "the controller answered nothing for {} ms; reconnecting",
                            last_heard.elapsed().as_millis()
                        )));
                    }
                    seq += 1;
                    let m = send(agent_message::Msg::Heartbeat(Heartbeat {
                        seq,
                        sent_unix_ms: lifeboat_common::now_unix_ms(),
                        memory_free_kib: self.shared.memory_free_kib.load(Ordering::Relaxed),
                    }));
                    if tx.send(m).await.is_err() { return Err(SessionError::Protocol("outbound stream closed".into())); }
                }
                u = updates.recv() => {
                    let Some(u) = u else { return Err(SessionError::Protocol("libvirt actor stopped".into())) };
                    let m = match u {
                        Update::Inventory(mut inv) => {
                            inv.guests.iter_mut().for_each(lifeboat_proto::pack_definition);
                            // Pages, so no buffer grows with the guest count.
                            let mut pages = lifeboat_proto::inventory_pages(inv, lifeboat_proto::INVENTORY_PAGE_BYTES);
                            let last = pages.pop().expect("one page at least");
                            for p in pages {
                                if tx.send(send(agent_message::Msg::Inventory(p))).await.is_err() {
                                    return Err(SessionError::Protocol("outbound stream closed".into()));
                                }
                            }
                            agent_message::Msg::Inventory(last)
                        }
                        Update::Changed(mut g) => {
                            lifeboat_proto::pack_definition(&mut g);
                            agent_message::Msg::GuestChanged(GuestChanged { guest: Some(g) })
                        }
                        Update::Removed { uuid, name } => agent_message::Msg::GuestRemoved(GuestRemoved { uuid, name }),
                        Update::Host(h) => agent_message::Msg::Host(h),
                    };
                    if tx.send(send(m)).await.is_err() { return Err(SessionError::Protocol("outbound stream closed".into())); }
                }
                m = inbound.message() => {
                    match m? {
                        None => return Ok(()),
                        Some(msg) => { last_heard = tokio::time::Instant::now(); match msg.msg {
                            Some(controller_message::Msg::Command(c)) => {
                                let actor = self.actor.clone();
                                let tx = tx.clone();
                                tokio::spawn(async move {
                                    let r = actor.command(c).await;
                                    let _ = tx.send(AgentMessage { msg: Some(agent_message::Msg::CommandResult(r)) }).await;
                                });
                            }
                            Some(controller_message::Msg::Welcome(_))
                            | Some(controller_message::Msg::HeartbeatAck(_))
                            | None => {}
                        }},
                    }
                }
            }
        }
    }
}
