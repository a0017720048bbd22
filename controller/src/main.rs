//! `lifeboat-controller` binary.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lifeboat_controller::config::ControllerConfig;

/// jemalloc: with 10,000 agent sessions glibc malloc kept ~20 % of its heap
/// as free fragments (malloc_stats); jemalloc holds ~10 % less resident.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Lifeboat controller: the source of truth for hosts, guests and jobs.
#[derive(Parser)]
#[command(
    name = "lifeboat-controller",
    version = lifeboat_common::VERSION_LONG,
    after_help = "Exit status: 0 stopped by a signal; 1 failed; 2 configuration refused; \
                  3 lost the etcd leadership (restart it: it comes back as a follower)."
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/lifeboat/controller.toml", env = "LIFEBOAT_CONTROLLER_CONFIG")]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Write an online, consistent copy of the database (the controller may run).
    Backup {
        /// The backup file to write.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Replace the database with a backup (the controller must be stopped).
    Restore {
        /// The backup file to restore.
        #[arg(long)]
        from: PathBuf,
    },
    /// Create a new, empty database at the configured path (a new
    /// installation); refuses if it exists. A start never creates one.
    Init,
}

fn main() -> ExitCode {
    // Everything this process creates (database, WAL, lock, backups) is
    // owner-only: the database holds guest definitions with their secrets.
    lifeboat_common::files::set_private_umask();
    let cli = Cli::parse();
    lifeboat_common::logging::init("info");
    let cfg = match ControllerConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lifeboat-controller: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.cmd {
        Some(Cmd::Backup { out, force }) => {
            return match lifeboat_controller::backup::backup(&cfg.database, &out, force) {
                Ok(s) => {
                    println!("backup of {} written to {} ({s})", cfg.database.display(), out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lifeboat-controller: backup failed: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::Restore { from }) => {
            return match lifeboat_controller::backup::restore(&from, &cfg.database) {
                Ok(s) => {
                    println!("{} restored from {} ({s}); start the controller", cfg.database.display(), from.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lifeboat-controller: restore refused: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::Init) => {
            return match lifeboat_controller::config::init_database(&cfg.database, &cli.config) {
                Ok(v) => {
                    println!("created an empty database {} (schema {v}); start the controller", cfg.database.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lifeboat-controller: init refused: {e}");
                    ExitCode::from(2)
                }
            };
        }
        None => {}
    }
    // One list of checks for a start and for --check-config.
    if let Err(e) = cfg.preflight(&cli.config) {
        eprintln!("lifeboat-controller: {e}");
        return ExitCode::from(2);
    }
    if cli.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    lifeboat_common::raise_open_files_limit();
    // More workers than cores: a worker waiting for the registry lock or
    // the database must not leave 10,000 sessions' heartbeats unread.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads((cores * 2).max(4)).enable_all().build() {
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
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| anyhow::anyhow!("cannot handle SIGTERM: {e}"))?;
        let shutdown = async move {
            tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
            tracing::info!(
                bound_s = lifeboat_controller::SHUTDOWN_BOUND.as_secs(),
                "shutting down: ending agent sessions, then flushing the database"
            );
        };
        lifeboat_controller::serve(cfg, listener, shutdown).await
    });
    // Blocking work still running (a fence agent, a database call) must not
    // hold the exit past the bound: the flush is done by now.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<lifeboat_controller::LeadershipLost>().is_some() => {
            // The supervisor starts it again, as a follower (docs/operations.md).
            eprintln!("lifeboat-controller: {e:#}");
            ExitCode::from(lifeboat_controller::EXIT_LEADERSHIP_LOST)
        }
        Err(e) => {
            eprintln!("lifeboat-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}
