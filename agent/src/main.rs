//! `lifeboat-agent` binary: parse arguments, load config, run.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lifeboat_agent::config::AgentConfig;

/// Lifeboat host agent: reports this host's libvirt guests to the controller.
#[derive(Parser)]
#[command(name = "lifeboat-agent", version = lifeboat_common::VERSION_LONG)]
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
    /// Start guard, run by libvirt's qemu hook (/etc/libvirt/hooks/qemu) as
    /// `lifeboat-agent guard GUEST OPERATION SUB-OPERATION EXTRA` with the
    /// domain XML on stdin. Local files only; exits non-zero to refuse.
    Guard {
        /// The hook's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
}

fn guard(config: &std::path::Path, args: Vec<String>) -> ExitCode {
    use lifeboat_agent::lease::{GuardEnv, Verdict, check_call, guard};
    use std::io::Read;
    if let Some(m) = check_call(&args) {
        eprintln!("{m}");
        return ExitCode::from(2);
    }
    let mut xml = String::new();
    let guarded = matches!(args.get(1).map(String::as_str), Some("prepare" | "migrate" | "restore"));
    if guarded {
        // Bounded: a definition is a few KiB. A read error or a truncated
        // definition leaves XML that does not parse, which refuses.
        let _ = std::io::stdin().take(16 << 20).read_to_string(&mut xml);
    }
    let cfg = AgentConfig::load(config).and_then(|c| c.resolve_host_id().map(|h| (c, h)));
    let (cfg, host) = match cfg {
        Ok(x) => x,
        Err(e) if guarded => {
            eprintln!("Lifeboat start guard: {e}; failing closed (no guest Lifeboat may manage starts without it)");
            return ExitCode::FAILURE;
        }
        Err(_) => return ExitCode::SUCCESS,
    };
    let env = GuardEnv {
        state_dir: &cfg.state_dir,
        host: &host,
        boot_id_file: &cfg.boot_id_file,
        now_ms: lifeboat_common::now_unix_ms(),
    };
    match guard(&args, &xml, &env) {
        Verdict::Allow => ExitCode::SUCCESS,
        Verdict::Refuse(m) => {
            eprintln!("{m}");
            ExitCode::FAILURE
        }
        Verdict::BadCall(m) => {
            eprintln!("{m}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    // Leases, state and logs this process writes are owner-only.
    lifeboat_common::files::set_private_umask();
    let cli = Cli::parse();
    if let Some(Cmd::Guard { args }) = cli.cmd {
        return guard(&cli.config, args);
    }
    lifeboat_common::logging::init("info");
    let cfg = match AgentConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lifeboat-agent: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Guard { .. } => unreachable!("handled above"),
        Cmd::CheckConfig => {
            // The same checks as a start (one list, AgentConfig::preflight).
            // Plus the controller epoch file: a start does not refuse it (the
            // running agent refuses every session instead, visible in its log
            // and metrics), but an operator checking the host wants to know.
            let checked = cfg
                .preflight()
                .map_err(|e| e.to_string())
                .and_then(|h| lifeboat_agent::epoch::load(&cfg.state_dir).map(|e| (h, e)).map_err(|e| e.to_string()));
            match checked {
                Ok((h, epoch)) => {
                    println!("configuration OK (host id {h})");
                    println!(
                        "highest controller epoch seen: {epoch} ({})",
                        lifeboat_agent::epoch::path(&cfg.state_dir).display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lifeboat-agent: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Run => {
            // A configuration error (missing or wrong certificate, ...) is
            // exit 2 at start as it is for check-config.
            if let Err(e) = cfg.preflight() {
                eprintln!("lifeboat-agent: {e}");
                return ExitCode::from(2);
            }
            // One thread runs the session, heartbeats and the metrics endpoint:
            // little work, and no hand-offs between threads for each message
            // (libvirt calls run on the actor's own threads).
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
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
