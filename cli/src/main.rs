//! `lifeboat`: the operators' command-line tool.

mod client;
mod migrate;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lifeboat_common::identity::Role;
use lifeboat_common::pki::{self, Leaf};

use client::{CliError, Connection};

/// Lifeboat: get KVM guests running again after their host fails.
#[derive(Parser)]
#[command(name = "lifeboat", version = lifeboat_common::VERSION_LONG)]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Output formats.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// A readable table.
    Table,
    /// JSON with stable field names (docs/cli.md).
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hypervisor hosts.
    #[command(subcommand)]
    Hosts(HostsCmd),
    /// Guests (virtual machines).
    #[command(subcommand)]
    Vms(VmsCmd),
    /// Show who the controller thinks you are.
    Whoami,
    /// Certificates for controller, agents and operators.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Recreate a failed host's guests on other hosts (needs --force).
    Migrate(migrate::MigrateArgs),
    /// Move guests off a running host: stop, redefine on the target, start, undefine on the source.
    Move(migrate::MoveArgs),
    /// Remove from a returned host the stale definitions of guests moved away from it.
    Cleanup {
        /// The returned host.
        host: String,
        /// Only print what would be removed (the default without --yes).
        #[arg(long, conflicts_with = "yes")]
        plan: bool,
        /// Carry it out.
        #[arg(long)]
        yes: bool,
        /// Destroy a stale copy found running before removing it (normally refused).
        #[arg(long)]
        destroy_running: bool,
        /// Carry out this reviewed plan only.
        #[arg(long)]
        plan_id: Option<String>,
    },
    /// Alarms: split brain, stale copies found running, guests a job left behind.
    #[command(args_conflicts_with_subcommands = true)]
    Alarms {
        /// Include cleared alarms.
        #[arg(long)]
        all: bool,
        #[command(subcommand)]
        cmd: Option<AlarmsCmd>,
    },
    /// Jobs (forced migrations).
    #[command(subcommand)]
    Jobs(JobsCmd),
    /// Generate man pages or shell completions from this CLI's definition.
    #[command(subcommand)]
    Generate(GenerateCmd),
    /// The audit log: every decision and side effect.
    Log {
        /// Only entries about this host.
        #[arg(long)]
        host: Option<String>,
        /// Only entries about this guest (name or UUID).
        #[arg(long)]
        vm: Option<String>,
        /// Only entries of this job.
        #[arg(long)]
        job: Option<String>,
        /// Only entries since TIME (RFC 3339, or 30s / 15m / 2h / 1d ago).
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand)]
enum GenerateCmd {
    /// Write lifeboat.1 and one page per subcommand (lifeboat-hosts.1, ...) into DIR.
    Man {
        /// Output directory.
        dir: PathBuf,
    },
    /// Print a completion script for a shell.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn generate(cmd: GenerateCmd) -> Result<(), CliError> {
    use clap::CommandFactory;
    let root = Cli::command();
    match cmd {
        GenerateCmd::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(|e| CliError::Usage(format!("cannot create {}: {e}", dir.display())))?;
            clap_mangen::generate_to(root, &dir).map_err(|e| CliError::Other(format!("writing man pages to {}: {e}", dir.display())))?;
            Ok(())
        }
        GenerateCmd::Completions { shell } => {
            let mut root = root;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut root, "lifeboat", &mut buf);
            use std::io::Write;
            // A closed pipe (e.g. `| head`) is not an error worth a panic.
            let _ = std::io::stdout().write_all(&buf);
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum AlarmsCmd {
    /// Clear a host's active alarms of one kind (operator role; audited).
    Clear {
        /// The host the alarm is on.
        #[arg(long, value_name = "HOST")]
        host: String,
        /// The alarm kind, e.g. guests-not-moved (see `lifeboat alarms`).
        #[arg(long, value_name = "KIND")]
        kind: String,
        /// Why it can be cleared (recorded in the audit log).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum JobsCmd {
    /// Jobs, newest first.
    List {
        /// Only jobs whose source is this host.
        #[arg(long)]
        host: Option<String>,
    },
    /// One job with every guest's move.
    Show {
        /// Job id.
        id: String,
    },
    /// Follow a job until it ends.
    Watch {
        /// Job id.
        id: String,
    },
}

#[derive(Subcommand)]
enum HostsCmd {
    /// List all hosts.
    List,
    /// Show one host (by host id or hostname).
    Show {
        /// Host id or hostname.
        host: String,
    },
    /// Set a host's status: AVAILABLE, NOT_ACCEPTING, MAINTENANCE or OFFLINE.
    SetStatus {
        /// Host id or hostname.
        host: String,
        /// The new status.
        status: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: Option<String>,
        /// With OFFLINE: you verified it is powered off (no BMC reads Off); needs --reason.
        #[arg(long, requires = "reason")]
        attest_powered_off: bool,
    },
}

#[derive(Subcommand)]
enum VmsCmd {
    /// List guests.
    List {
        /// Only guests of this host.
        #[arg(long)]
        host: Option<String>,
    },
    /// Show one guest (by name or UUID), with its disks, NICs and definition.
    Show {
        /// Guest name or UUID.
        vm: String,
        /// Only on this host (when the same guest is defined on several).
        #[arg(long)]
        host: Option<String>,
        /// Also print the full libvirt definition.
        #[arg(long)]
        xml: bool,
    },
    /// Define a guest missing on its owner again from its kept definition
    /// (operator role). Refused, changing nothing, when it is defined anywhere.
    Restore {
        /// Guest name or UUID.
        vm: String,
        /// Define it on this host instead of its owner (a placement change:
        /// its owner must be talking or OFFLINE, HOST reachable and AVAILABLE).
        #[arg(long = "to")]
        to: Option<String>,
        /// Then grant its lease and start it.
        #[arg(long)]
        start: bool,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Drop a missing guest's record and kept definition on purpose
    /// (operator role; audited with the definition's size and SHA-256).
    Forget {
        /// Guest name or UUID.
        vm: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Start a stopped guest on its owner now (a waiting one, or any stopped
    /// guest its host owns), also on a MAINTENANCE host; the same
    /// never-twice checks as every start (operator role, audited).
    Start {
        /// Guest name or UUID.
        vm: String,
        /// Why (recorded in the audit log).
        #[arg(long, value_name = "TEXT", required = true)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a new certificate authority in DIR (ca.pem, ca.key).
    Init {
        /// Directory for the CA files.
        dir: PathBuf,
    },
    /// Issue a certificate signed by the CA.
    Issue(IssueArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("kind").required(true).args(["agent", "controller", "client"])))]
struct IssueArgs {
    /// Directory holding ca.pem and ca.key.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Where to write the certificate and key (default: the CA directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// An agent certificate for this host id.
    #[arg(long, value_name = "HOST_ID")]
    agent: Option<String>,
    /// The controller's certificate.
    #[arg(long)]
    controller: bool,
    /// Extra DNS names or IP addresses for the controller certificate.
    #[arg(long, requires = "controller")]
    san: Vec<String>,
    /// A client certificate for a person or tool.
    #[arg(long, value_name = "NAME", requires = "role")]
    client: Option<String>,
    /// The client's role: viewer, operator or admin.
    #[arg(long, requires = "client")]
    role: Option<String>,
}

fn certs(cmd: CertsCmd) -> Result<(), CliError> {
    match cmd {
        CertsCmd::Init { dir } => {
            let (c, k) = pki::init(&dir).map_err(|e| CliError::Usage(e.to_string()))?;
            println!("CA created: {} (keep {} secret)", c.display(), k.display());
        }
        CertsCmd::Issue(a) => {
            let leaf = if let Some(h) = a.agent {
                Leaf::Agent(h)
            } else if a.controller {
                Leaf::Controller(a.san)
            } else {
                let role: Role = a.role.unwrap_or_default().parse().map_err(|e: lifeboat_common::identity::IdentityError| CliError::Usage(e.to_string()))?;
                Leaf::Client(a.client.unwrap_or_default(), role)
            };
            let out = a.out.unwrap_or_else(|| a.ca_dir.clone());
            let (c, k) = pki::issue(&a.ca_dir, &out, &leaf).map_err(|e| CliError::Usage(e.to_string()))?;
            println!("issued {} and {}", c.display(), k.display());
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let fmt = cli.output;
    match cli.cmd {
        Cmd::Certs(c) => certs(c),
        Cmd::Generate(g) => generate(g),
        Cmd::Hosts(HostsCmd::SetStatus { host, status, reason, attest_powered_off }) => {
            let mut c = cli.conn.admin().await?;
            let h = c
                .set_host_status(lifeboat_proto::v1::SetHostStatusRequest {
                    host,
                    status,
                    reason: reason.unwrap_or_default(),
                    attest_powered_off,
                })
                .await
                .map_err(CliError::from_status)?;
            output::host(fmt, &h.into_inner());
            Ok(())
        }
        Cmd::Cleanup { host, plan, yes, destroy_running, plan_id } => {
            migrate::cleanup(&mut cli.conn.admin().await?, host, plan || (!yes && plan_id.is_none()), destroy_running, plan_id, fmt).await
        }
        Cmd::Alarms { all, cmd: None } => migrate::alarms(&mut cli.conn.admin().await?, all, fmt).await,
        Cmd::Alarms { cmd: Some(AlarmsCmd::Clear { host, kind, reason }), .. } => {
            migrate::alarms_clear(&mut cli.conn.admin().await?, host, kind, reason.unwrap_or_default(), fmt).await
        }
        Cmd::Migrate(a) => migrate::migrate(&mut cli.conn.admin().await?, a, fmt).await,
        Cmd::Move(a) => migrate::migrate(&mut cli.conn.admin().await?, a.into(), fmt).await,
        Cmd::Jobs(JobsCmd::List { host }) => migrate::jobs_list(&mut cli.conn.admin().await?, host, fmt).await,
        Cmd::Jobs(JobsCmd::Show { id }) => migrate::jobs_show(&mut cli.conn.admin().await?, id, fmt).await,
        Cmd::Jobs(JobsCmd::Watch { id }) => migrate::jobs_watch(&mut cli.conn.admin().await?, id, fmt).await,
        Cmd::Log { host, vm, job, since } => migrate::log(&mut cli.conn.admin().await?, host, vm, job, since, fmt).await,
        Cmd::Whoami => {
            let mut c = cli.conn.admin().await?;
            let r = c.who_am_i(lifeboat_proto::v1::WhoAmIRequest {}).await.map_err(CliError::from_status)?.into_inner();
            output::whoami(fmt, &r);
            Ok(())
        }
        Cmd::Hosts(HostsCmd::List) => {
            let mut c = cli.conn.admin().await?;
            let r = c.list_hosts(lifeboat_proto::v1::ListHostsRequest {}).await.map_err(CliError::from_status)?;
            output::hosts(fmt, &r.into_inner().hosts);
            Ok(())
        }
        Cmd::Hosts(HostsCmd::Show { host }) => {
            let mut c = cli.conn.admin().await?;
            let h = c.get_host(lifeboat_proto::v1::GetHostRequest { host }).await.map_err(CliError::from_status)?;
            output::host(fmt, &h.into_inner());
            Ok(())
        }
        Cmd::Vms(VmsCmd::List { host }) => {
            let mut c = cli.conn.admin().await?;
            let guests = list_guests(&mut c, lifeboat_proto::v1::ListGuestsRequest { host: host.unwrap_or_default(), ..Default::default() }).await?;
            output::vms(fmt, &guests);
            Ok(())
        }
        Cmd::Vms(VmsCmd::Start { vm, reason }) => {
            let mut c = cli.conn.admin().await?;
            let g = c.start_vm(lifeboat_proto::v1::StartVmRequest { vm, reason }).await.map_err(CliError::from_status)?;
            output::vm_detail(fmt, &[g.into_inner()], false);
            Ok(())
        }
        Cmd::Vms(VmsCmd::Show { vm, host, xml }) => {
            let mut c = cli.conn.admin().await?;
            let guests = list_guests(
                &mut c,
                lifeboat_proto::v1::ListGuestsRequest { host: host.unwrap_or_default(), vm: vm.clone(), with_definitions: xml, ..Default::default() },
            )
            .await?;
            let found: Vec<_> = guests
                .into_iter()
                .filter(|g| g.guest.as_ref().is_some_and(|x| x.name == vm || x.uuid == vm))
                .collect();
            if found.is_empty() {
                return Err(CliError::NotFound(format!("unknown guest '{vm}' (see `lifeboat vms list`)")));
            }
            output::vm_detail(fmt, &found, xml);
            Ok(())
        }
        Cmd::Vms(VmsCmd::Restore { vm, to, start, reason }) => {
            let mut c = cli.conn.admin().await?;
            let req = lifeboat_proto::v1::RestoreGuestRequest { vm, to_host: to.unwrap_or_default(), start, reason };
            let r = c.restore_guest(req).await.map_err(CliError::from_status)?.into_inner();
            output::vm_detail(fmt, &[r], false);
            Ok(())
        }
        Cmd::Vms(VmsCmd::Forget { vm, reason }) => {
            let mut c = cli.conn.admin().await?;
            let r = c.forget_guest(lifeboat_proto::v1::ForgetGuestRequest { vm, reason }).await.map_err(CliError::from_status)?;
            output::forgotten(fmt, &r.into_inner());
            Ok(())
        }
    }
}

/// Every page of a `ListGuests` answer.
async fn list_guests(
    c: &mut lifeboat_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    mut req: lifeboat_proto::v1::ListGuestsRequest,
) -> Result<Vec<lifeboat_proto::v1::GuestRecord>, CliError> {
    req.page_size = 2000;
    let mut all = Vec::new();
    loop {
        let page = c.list_guests(req.clone()).await.map_err(CliError::from_status)?.into_inner();
        all.extend(page.guests);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        req.page_token = page.next_page_token;
    }
}

fn main() -> ExitCode {
    // Like every Unix tool: end quietly when the reader of stdout goes away
    // (`lifeboat vms list | head`) instead of panicking on EPIPE.
    // SAFETY: called first, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lifeboat: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lifeboat: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
