//! `lifeboat-agent` binary: parse arguments, load config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lifeboat_agent::config::AgentConfig;

/// Lifeboat host agent: reports this host's libvirt guests to the controller.
#[derive(Parser)]
#[command(name = "lifeboat-agent", version = lifeboat_common::VERSION)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/lifeboat/agent.toml", env = "LIFEBOAT_AGENT_CONFIG", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Check the configuration and certificate files, then exit.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lifeboat_common::logging::init("info");
    let cfg = match AgentConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lifeboat-agent: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::CheckConfig => {
            let r = cfg.resolve_host_id().map_err(anyhow::Error::from).and_then(|h| {
                cfg.controller.tls().load()?;
                Ok(h)
            });
            match r {
                Ok(h) => {
                    println!("configuration OK (host id {h})");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lifeboat-agent: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Run => {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("lifeboat-agent: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(lifeboat_agent::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lifeboat-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
