//! `lifeboat-controller` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lifeboat_controller::config::ControllerConfig;

/// Lifeboat controller: the source of truth for hosts, guests and jobs.
#[derive(Parser)]
#[command(name = "lifeboat-controller", version = lifeboat_common::VERSION)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/lifeboat/controller.toml", env = "LIFEBOAT_CONTROLLER_CONFIG")]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lifeboat_common::logging::init("info");
    let cfg = match ControllerConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lifeboat-controller: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cfg.tls.load() {
        eprintln!("lifeboat-controller: {e}");
        return ExitCode::from(2);
    }
    if cli.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lifeboat-controller: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
            tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
            tracing::info!("shutting down");
        };
        lifeboat_controller::serve(cfg, listener, shutdown).await
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lifeboat-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}
