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
    /// Copy a SQLite database into the configured etcd prefix (the upgrade
    /// path to `[store] backend = "etcd"`): only into an empty prefix while no
    /// controller is elected. Not atomic: after a failure, empty the prefix
    /// and run it again.
    EtcdImport {
        /// The SQLite database (controller.db) to copy.
        #[arg(long)]
        from: PathBuf,
    },
    /// Write Lifeboat's keys in etcd, read at one revision, into a file (a
    /// backup; the controllers may run).
    EtcdExport {
        /// The file to write (refused if it exists).
        #[arg(long)]
        to: PathBuf,
    },
    /// Write an export back into an EMPTY etcd prefix while no controller
    /// is elected.
    EtcdRestore {
        /// The export file.
        #[arg(long)]
        from: PathBuf,
    },
}

/// Runs one etcd operation (import, export, restore) on its own runtime.
fn etcd_op(cfg: &ControllerConfig, what: &str, op: EtcdOp) -> ExitCode {
    use lifeboat_controller::store::etcd;
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lifeboat-controller: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let prefix = cfg.store.prefix.clone();
    let r = rt.block_on(async {
        let st = &cfg.store;
        let mut client = etcd::connect(&st.endpoints, st.ca.as_deref(), st.cert.as_deref(), st.key.as_deref()).await?;
        match op {
            EtcdOp::Init => etcd::ops::init(&mut client, &prefix)
                .await
                .map(|_| format!("wrote the schema key under {prefix} (a new, empty pool); start the controllers")),
            EtcdOp::Import(from) => {
                // The SQLite controller holds this lock while it runs: an
                // import of a live database would leave two controllers
                // commanding (the SQLite one with no epoch fencing).
                let _held = lifeboat_controller::backup::lock(&from).map_err(|e| {
                    etcd::EtcdError::Refused(format!("{e}; stop the SQLite controller before importing its database"))
                })?;
                etcd::ops::import(&mut client, &prefix, &from).await.map(|s| {
                    format!(
                        "imported {} keys from {} under {prefix} in {} etcd transactions; start the controllers",
                        s.keys,
                        from.display(),
                        s.revision_or_txns
                    )
                })
            }
            EtcdOp::Export(to) => etcd::ops::export(&mut client, &prefix, &to).await.map(|s| {
                format!(
                    "exported {} keys under {prefix} at etcd revision {} to {}",
                    s.keys,
                    s.revision_or_txns,
                    to.display()
                )
            }),
            EtcdOp::Restore(from) => etcd::ops::restore(&mut client, &prefix, &from).await.map(|s| {
                format!("restored {} keys from {} under {prefix}; start the controllers", s.keys, from.display())
            }),
        }
    });
    match r {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lifeboat-controller: {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An etcd operation and its file.
enum EtcdOp {
    Init,
    Import(PathBuf),
    Export(PathBuf),
    Restore(PathBuf),
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
    // backup, restore and init work on the SQLite `database`, which the
    // etcd backend does not use: refuse rather than copy an unused file.
    if matches!(cfg.store.backend, lifeboat_controller::config::Backend::Etcd)
        && matches!(cli.cmd, Some(Cmd::Backup { .. } | Cmd::Restore { .. }))
    {
        eprintln!(
            "lifeboat-controller: [store] backend = \"etcd\": use etcd-export (backup), etcd-restore (restore) or \
             etcd-import (from a SQLite database) instead"
        );
        return ExitCode::from(2);
    }
    if matches!(cfg.store.backend, lifeboat_controller::config::Backend::Etcd) && matches!(cli.cmd, Some(Cmd::Init)) {
        return etcd_op(&cfg, "init", EtcdOp::Init);
    }
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
        Some(Cmd::EtcdImport { from }) => return etcd_op(&cfg, "etcd-import", EtcdOp::Import(from)),
        Some(Cmd::EtcdExport { to }) => return etcd_op(&cfg, "etcd-export", EtcdOp::Export(to)),
        Some(Cmd::EtcdRestore { from }) => return etcd_op(&cfg, "etcd-restore", EtcdOp::Restore(from)),
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
    let rt = match lifeboat_controller::serving_runtime(cfg.store.backend) {
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
