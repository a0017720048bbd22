//! `lifeboat-agent`: runs on every hypervisor host, reports the host and
//! its guests to the controller and carries out the controller's commands.
//!
//! Code map: [`config`] reads the agent's TOML file; [`domxml`] is the pure
//! parser of libvirt domain XML; [`epoch`] keeps the controller fencing
//! epoch; [`hostfacts`] reads host facts from local
//! files; [`libvirt`] is the one thread that owns every `virt` call;
//! [`session`] keeps the gRPC session to the controller; [`storage`] tells
//! which storage each disk path is on.

// Unsafe code only in libvirt::ffi (the calls the virt crate does not wrap), each block argued.
#![deny(unsafe_code)]

pub mod config;
pub mod domxml;
pub mod epoch;
pub mod hostfacts;
pub mod lease;
pub mod libvirt;
pub mod metrics;
pub mod session;
pub mod storage;

use std::sync::Arc;

use tracing::info;

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(cfg: config::AgentConfig) -> anyhow::Result<()> {
    let shutdown = async {
        let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("interrupted, exiting"),
            _ = sigterm.recv() => info!("SIGTERM, exiting"),
        }
    };
    run_until(cfg, shutdown).await
}

/// Runs the agent until `shutdown` completes.
pub async fn run_until(
    cfg: config::AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    lifeboat_common::tls::install_crypto_provider();
    let tls = cfg.controller.tls().load()?;
    let host_id = cfg.resolve_host_id()?;
    let controllers = cfg.controller.urls().join(",");
    info!(host_id = %host_id, uri = %cfg.libvirt_uri, controllers = %controllers, "lifeboat-agent starting");
    let shared = Arc::new(libvirt::Shared::default());
    let (actor, updates) = libvirt::spawn(libvirt::ActorConfig::from_agent(&cfg, host_id.clone()), shared.clone())?;
    metrics::get().set_state_dir(cfg.state_dir.clone());
    let metrics_task = match cfg.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on metrics_listen {addr}: {e}"))?;
            info!(listen = %addr, "metrics at /metrics");
            Some(tokio::spawn(metrics::serve(l)))
        }
        None => None,
    };
    let session = session::Session::new(&cfg, host_id, tls, actor.clone(), shared.clone());
    // systemd (Type=notify): ready now; feed the watchdog while the libvirt
    // actor keeps going round. Both are no-ops outside systemd.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut wd_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut wd_usec).then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let period = std::time::Duration::from_micros(wd_usec / 2);
            loop {
                tokio::time::sleep(period).await;
                let age =
                    lifeboat_common::now_unix_ms() - shared.last_tick_ms.load(std::sync::atomic::Ordering::Relaxed);
                if age < 10_000 {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!(age_ms = age, "libvirt actor stuck; not feeding the systemd watchdog");
                }
            }
        })
    });
    tokio::select! {
        r = session.run(updates) => r?,
        _ = shutdown => {},
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    if let Some(m) = metrics_task {
        m.abort();
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    actor.shutdown();
    Ok(())
}
