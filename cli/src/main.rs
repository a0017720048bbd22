//! `lifeboat`: the operators' command-line tool.

#![forbid(unsafe_code)]

mod args;
mod client;
mod leader;
mod migrate;
mod output;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lifeboat_common::identity::Role;
use lifeboat_common::pki::{self, Leaf};

use client::{CliError, Connection};
use output::{err, out};

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
    /// The web dashboard.
    #[command(subcommand)]
    Dashboard(DashboardCmd),
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
        #[arg(value_parser = args::host)]
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
        #[arg(long, value_parser = args::id)]
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
        #[arg(long, value_parser = args::host)]
        host: Option<String>,
        /// Only entries about this guest (name or UUID).
        #[arg(long, value_parser = args::vm)]
        vm: Option<String>,
        /// Only entries of this job.
        #[arg(long, value_parser = args::id)]
        job: Option<String>,
        /// Only entries since TIME (RFC 3339, or 30s / 15m / 2h / 1d ago, at most 3650d).
        #[arg(long, value_parser = args::since, value_name = "TIME")]
        since: Option<i64>,
    },
}

#[derive(Subcommand)]
enum DashboardCmd {
    /// Print a one-time sign-in link (works once, within 60 s) for your certificate's name and role.
    Login,
    /// End the dashboard sessions and unused sign-in links of one name, or of everybody (admin role).
    EndSessions {
        /// The certificate name (CN) whose sessions end.
        #[arg(long, required_unless_present = "all", conflicts_with = "all", value_parser = args::cert_name)]
        name: Option<String>,
        /// Every session of every name.
        #[arg(long)]
        all: bool,
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
    let root = command();
    match cmd {
        GenerateCmd::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| CliError::Usage(format!("cannot create {}: {e}", dir.display())))?;
            clap_mangen::generate_to(root, &dir)
                .map_err(|e| CliError::Other(format!("writing man pages to {}: {e}", dir.display())))?;
            Ok(())
        }
        GenerateCmd::Completions { shell } => {
            let mut root = root;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut root, "lifeboat", &mut buf);
            output::emit_raw(String::from_utf8_lossy(&buf).trim_end_matches('\n'));
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum AlarmsCmd {
    /// Clear a host's active alarms of one kind (operator role; audited).
    Clear {
        /// The host the alarm is on.
        #[arg(long, value_name = "HOST", value_parser = args::host)]
        host: String,
        /// The alarm kind, e.g. guests-not-moved (see `lifeboat alarms`).
        #[arg(long, value_name = "KIND", value_parser = args::id)]
        kind: String,
        /// Why it can be cleared (recorded in the audit log).
        #[arg(long, value_name = "TEXT", value_parser = args::reason)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum JobsCmd {
    /// Jobs, newest first.
    List {
        /// Only jobs whose source is this host.
        #[arg(long, value_parser = args::host)]
        host: Option<String>,
    },
    /// One job with every guest's move.
    Show {
        /// Job id.
        #[arg(value_parser = args::id)]
        id: String,
    },
    /// Follow a job until it ends.
    Watch {
        /// Job id.
        #[arg(value_parser = args::id)]
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
        #[arg(value_parser = args::host)]
        host: String,
    },
    /// Set a host's status: AVAILABLE, NOT_ACCEPTING, MAINTENANCE or OFFLINE.
    SetStatus {
        /// Host id or hostname.
        #[arg(value_parser = args::host)]
        host: String,
        /// The new status.
        #[arg(value_parser = args::status)]
        status: String,
        /// Why (recorded in the audit log).
        #[arg(long, value_parser = args::reason)]
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
        #[arg(long, value_parser = args::host)]
        host: Option<String>,
    },
    /// Show one guest (by name or UUID), with its disks, NICs and definition.
    Show {
        /// Guest name or UUID.
        #[arg(value_parser = args::vm)]
        vm: String,
        /// Only on this host (when the same guest is defined on several).
        #[arg(long, value_parser = args::host)]
        host: Option<String>,
        /// Also print the full libvirt definition.
        #[arg(long)]
        xml: bool,
    },
    /// Define a guest missing on its owner again from its kept definition
    /// (operator role). Refused, changing nothing, when it is defined anywhere.
    Restore {
        /// Guest name or UUID.
        #[arg(value_parser = args::vm)]
        vm: String,
        /// Define it on this host instead of its owner (a placement change:
        /// its owner must be talking or OFFLINE, HOST reachable and AVAILABLE).
        #[arg(long = "to", value_parser = args::host)]
        to: Option<String>,
        /// Then grant its lease and start it.
        #[arg(long)]
        start: bool,
        /// Why (recorded in the audit log).
        #[arg(long, value_parser = args::reason)]
        reason: String,
    },
    /// Drop a missing guest's record and kept definition on purpose
    /// (operator role; audited with the definition's size and SHA-256).
    Forget {
        /// Guest name or UUID.
        #[arg(value_parser = args::vm)]
        vm: String,
        /// Why (recorded in the audit log).
        #[arg(long, value_parser = args::reason)]
        reason: String,
    },
    /// Start a stopped guest on its owner now (a waiting one, or any stopped
    /// guest its host owns), also on a MAINTENANCE host; the same
    /// never-twice checks as every start (operator role, audited).
    Start {
        /// Guest name or UUID.
        #[arg(value_parser = args::vm)]
        vm: String,
        /// Why (recorded in the audit log).
        #[arg(long, value_name = "TEXT", required = true, value_parser = args::start_reason)]
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
    #[arg(long, value_name = "HOST_ID", value_parser = args::host)]
    agent: Option<String>,
    /// The controller's certificate.
    #[arg(long)]
    controller: bool,
    /// Extra DNS names or IP addresses for the controller certificate.
    #[arg(long, requires = "controller", value_parser = args::host)]
    san: Vec<String>,
    /// A client certificate for a person or tool.
    #[arg(long, value_name = "NAME", requires = "role", value_parser = args::id)]
    client: Option<String>,
    /// The client's role: viewer, operator or admin.
    #[arg(long, requires = "client")]
    role: Option<String>,
}

fn certs(cmd: CertsCmd) -> Result<(), CliError> {
    match cmd {
        CertsCmd::Init { dir } => {
            let (c, k) = pki::init(&dir).map_err(|e| CliError::Usage(e.to_string()))?;
            out!("CA created: {} (keep {} secret)", c.display(), k.display());
        }
        CertsCmd::Issue(a) => {
            let leaf = if let Some(h) = a.agent {
                Leaf::Agent(h)
            } else if a.controller {
                Leaf::Controller(a.san)
            } else {
                let role: Role = a
                    .role
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e: lifeboat_common::identity::IdentityError| CliError::Usage(e.to_string()))?;
                Leaf::Client(a.client.unwrap_or_default(), role)
            };
            let out = a.out.unwrap_or_else(|| a.ca_dir.clone());
            let (c, k) = pki::issue(&a.ca_dir, &out, &leaf).map_err(|e| CliError::Usage(e.to_string()))?;
            out!("issued {} and {}", c.display(), k.display());
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
            let mut c = connect(&cli.conn).await?;
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
            migrate::cleanup(
                &mut connect(&cli.conn).await?,
                host,
                plan || (!yes && plan_id.is_none()),
                destroy_running,
                plan_id,
                fmt,
            )
            .await
        }
        Cmd::Alarms { all, cmd: None } => migrate::alarms(&mut connect(&cli.conn).await?, all, fmt).await,
        Cmd::Alarms { cmd: Some(AlarmsCmd::Clear { host, kind, reason }), .. } => {
            migrate::alarms_clear(&mut connect(&cli.conn).await?, host, kind, reason.unwrap_or_default(), fmt).await
        }
        Cmd::Migrate(a) => migrate::migrate(&mut connect(&cli.conn).await?, a, fmt).await,
        Cmd::Move(a) => migrate::migrate(&mut connect(&cli.conn).await?, a.into(), fmt).await,
        Cmd::Jobs(JobsCmd::List { host }) => migrate::jobs_list(&mut connect(&cli.conn).await?, host, fmt).await,
        Cmd::Jobs(JobsCmd::Show { id }) => migrate::jobs_show(&mut connect(&cli.conn).await?, id, fmt).await,
        Cmd::Jobs(JobsCmd::Watch { id }) => migrate::jobs_watch(&mut connect(&cli.conn).await?, id, fmt).await,
        Cmd::Log { host, vm, job, since } => {
            migrate::log(&mut connect(&cli.conn).await?, host, vm, job, since, fmt).await
        }
        Cmd::Dashboard(DashboardCmd::Login) => {
            let (mut c, url) = connect_with_url(&cli.conn).await?;
            let r = c
                .create_dashboard_login(lifeboat_proto::v1::CreateDashboardLoginRequest {})
                .await
                .map_err(CliError::from_status)?
                .into_inner();
            output::dashboard_login(fmt, &dashboard_url(&url, &r)?, &r);
            Ok(())
        }
        Cmd::Dashboard(DashboardCmd::EndSessions { name, all }) => {
            let mut c = connect(&cli.conn).await?;
            let req = lifeboat_proto::v1::EndDashboardSessionsRequest { name: name.unwrap_or_default(), all };
            let r = c.end_dashboard_sessions(req).await.map_err(CliError::from_status)?.into_inner();
            output::dashboard_sessions_ended(fmt, &r);
            Ok(())
        }
        Cmd::Whoami => {
            let mut c = connect(&cli.conn).await?;
            let r = c.who_am_i(lifeboat_proto::v1::WhoAmIRequest {}).await.map_err(CliError::from_status)?.into_inner();
            output::whoami(fmt, &r);
            Ok(())
        }
        Cmd::Hosts(HostsCmd::List) => {
            let mut c = connect(&cli.conn).await?;
            let r = c.list_hosts(lifeboat_proto::v1::ListHostsRequest {}).await.map_err(CliError::from_status)?;
            output::hosts(fmt, &r.into_inner().hosts);
            Ok(())
        }
        Cmd::Hosts(HostsCmd::Show { host }) => {
            let mut c = connect(&cli.conn).await?;
            let h = c.get_host(lifeboat_proto::v1::GetHostRequest { host }).await.map_err(CliError::from_status)?;
            output::host(fmt, &h.into_inner());
            Ok(())
        }
        Cmd::Vms(VmsCmd::List { host }) => {
            let mut c = connect(&cli.conn).await?;
            let guests = list_guests(
                &mut c,
                lifeboat_proto::v1::ListGuestsRequest { host: host.unwrap_or_default(), ..Default::default() },
            )
            .await?;
            output::vms(fmt, &guests);
            Ok(())
        }
        Cmd::Vms(VmsCmd::Start { vm, reason }) => {
            let mut c = connect(&cli.conn).await?;
            let g =
                c.start_vm(lifeboat_proto::v1::StartVmRequest { vm, reason }).await.map_err(CliError::from_status)?;
            output::vm_detail(fmt, &[g.into_inner()], false);
            Ok(())
        }
        Cmd::Vms(VmsCmd::Show { vm, host, xml }) => {
            let mut c = connect(&cli.conn).await?;
            let guests = list_guests(
                &mut c,
                lifeboat_proto::v1::ListGuestsRequest {
                    host: host.unwrap_or_default(),
                    vm: vm.clone(),
                    with_definitions: xml,
                    ..Default::default()
                },
            )
            .await?;
            let found: Vec<_> =
                guests.into_iter().filter(|g| g.guest.as_ref().is_some_and(|x| x.name == vm || x.uuid == vm)).collect();
            if found.is_empty() {
                return Err(CliError::NotFound(format!(
                    "unknown guest '{}' (see `lifeboat vms list`)",
                    output::clean(&vm)
                )));
            }
            output::vm_detail(fmt, &found, xml);
            Ok(())
        }
        Cmd::Vms(VmsCmd::Restore { vm, to, start, reason }) => {
            let mut c = connect(&cli.conn).await?;
            let req = lifeboat_proto::v1::RestoreGuestRequest { vm, to_host: to.unwrap_or_default(), start, reason };
            let r = c.restore_guest(req).await.map_err(CliError::from_status)?.into_inner();
            output::vm_detail(fmt, &[r], false);
            Ok(())
        }
        Cmd::Vms(VmsCmd::Forget { vm, reason }) => {
            let mut c = connect(&cli.conn).await?;
            let r = c
                .forget_guest(lifeboat_proto::v1::ForgetGuestRequest { vm, reason })
                .await
                .map_err(CliError::from_status)?;
            output::forgotten(fmt, &r.into_inner());
            Ok(())
        }
    }
}

/// Connects and asks who we are before the command's own call: with TLS
/// 1.3 the controller checks our certificate after our side of the
/// handshake is done, and refuses it by closing the connection, often
/// before its alert can be read. A connection closed with no answer to this
/// first call is reported as that refusal (exit 4), not as an unreachable
/// controller.
///
/// With several controller URLs, this first call also finds the leader
/// ([`leader::find`]): a follower refuses it (doing nothing) and names the
/// leader. The command's own call then goes to the leader only, once.
async fn connect(
    conn: &Connection,
) -> Result<lifeboat_proto::v1::admin_client::AdminClient<tonic::transport::Channel>, CliError> {
    Ok(connect_with_url(conn).await?.0)
}

/// The sign-in link: the host of the controller URL that answered, the
/// dashboard's port, the token (brackets of an IPv6 host are kept).
fn dashboard_url(url: &str, r: &lifeboat_proto::v1::DashboardLogin) -> Result<String, CliError> {
    let uri: tonic::codegen::http::Uri =
        url.parse().map_err(|e| CliError::Other(format!("controller URL {url:?}: {e}")))?;
    let host = uri.host().ok_or_else(|| CliError::Other(format!("controller URL {url:?} has no host")))?;
    if r.token.len() != 64 || !r.token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CliError::Other("the controller sent a sign-in token that is not 64 hex characters".into()));
    }
    Ok(format!("https://{host}:{}/login?token={}", r.port, r.token))
}

/// [`connect`], and the URL of the controller that answered (the leader).
async fn connect_with_url(
    conn: &Connection,
) -> Result<(lifeboat_proto::v1::admin_client::AdminClient<tonic::transport::Channel>, String), CliError> {
    let target = conn.target()?;
    let ask = |url: String| {
        let target = &target;
        async move {
            let mut c = match conn.dial(target, &url).await {
                Ok(c) => c,
                Err(e) => return leader::Answer::Failed(e),
            };
            match c.who_am_i(lifeboat_proto::v1::WhoAmIRequest {}).await {
                Ok(_) => leader::Answer::Leader(c),
                Err(s) => match client::leader_hint(&s) {
                    Some(leader) => leader::Answer::Follower { leader, message: s.message().to_string() },
                    None => leader::Answer::Failed(first_call_refused(s)),
                },
            }
        }
    };
    leader::find(&target.urls, ask).await
}

/// Maps the failure of the first call on a fresh connection.
fn first_call_refused(s: tonic::Status) -> CliError {
    let closed = matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled) && {
        let mut text = s.message().to_ascii_lowercase();
        if let Some(src) = std::error::Error::source(&s) {
            text.push_str(&lifeboat_common::error_chain(src).to_ascii_lowercase());
        }
        ["connection closed", "connection reset", "broken pipe", "unexpected eof", "close_notify"]
            .iter()
            .any(|w| text.contains(w))
            && !text.contains("alert")
    };
    if closed {
        return CliError::Refused(format!(
            "certificate rejected: the controller closed the connection right after the TLS handshake without answering, \
             which is how it refuses a client certificate (expired or not yet valid, issued by another CA, or not a client \
             certificate; unless it was just stopping); check it with `openssl x509 -in CERT -noout -dates -issuer` and issue a new one with \
             `lifeboat certs issue --client NAME --role ROLE` ({})",
            s.message()
        ));
    }
    CliError::from_status(s)
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

/// Exit code of a bug: a panic caught by the hook (documented in docs/cli.md).
const EXIT_INTERNAL: i32 = 70;

/// The CLI's definition, with the checks of the connection flags (declared
/// in client.rs) added: a usage error (exit 2) names the flag and its form.
fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command()
        .mut_arg("timeout", |a| {
            a.value_parser(args::timeout)
                .help(format!("Seconds to wait for the controller (1 to {})", args::MAX_TIMEOUT_S))
        })
        .mut_arg("controller_url", |a| a.value_parser(args::url))
        .mut_arg("server_name", |a| a.value_parser(args::server_name))
}

/// Parses the command line; usage errors exit 2 (help and version 0).
fn parse() -> Cli {
    use clap::FromArgMatches;
    let parsed = command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m));
    match parsed {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // clap quotes the bad value as typed: escape what a terminal
            // would obey, and cut a huge value (the reason stays whole).
            use clap::error::{ContextKind, ErrorKind};
            let (arg, value) = (e.get(ContextKind::InvalidArg), e.get(ContextKind::InvalidValue));
            match (e.kind(), arg, value, std::error::Error::source(&e)) {
                (ErrorKind::ValueValidation, Some(arg), Some(value), Some(why)) => {
                    let value = value.to_string();
                    let shown = output::truncate(&output::clean(&value), 60).into_owned();
                    let why = output::clean_lines(&why.to_string()).into_owned();
                    output::warn(format_args!(
                        "error: invalid value '{shown}' for '{arg}': {why}\n\nFor more information, try '--help'."
                    ));
                }
                _ => {
                    for line in e.to_string().trim_end().lines() {
                        output::warn(format_args!("{}", output::truncate(&output::clean_lines(line), 400)));
                    }
                }
            }
            std::process::exit(e.exit_code());
        }
    }
}

fn main() -> ExitCode {
    // SIGPIPE stays ignored (Rust's default): the TLS connection writes with
    // writev, and a controller that closes it during the handshake must
    // give an error to report (exit 4), not a silent death by SIGPIPE (141).
    // A closed stdout (`| head`) is handled where output is written
    // (output::emit: exit 0, quietly).
    std::panic::set_hook(Box::new(|info| {
        let msg = output::clean_lines(&info.to_string()).into_owned();
        output::warn(format_args!("lifeboat: internal error (a bug in lifeboat; please report it): {msg}"));
        std::process::exit(EXIT_INTERNAL);
    }));
    let cli = parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            err!("lifeboat: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    output::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            err!("lifeboat: {}", output::clean_lines(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_in_link_names_the_controller_host_and_the_dashboard_port() {
        let r = lifeboat_proto::v1::DashboardLogin {
            token: "ab".repeat(32),
            expires_unix_ms: 1,
            port: 8443,
            name: "olga".into(),
            role: "operator".into(),
        };
        let url = dashboard_url("https://10.77.0.2:7443", &r).unwrap();
        assert_eq!(url, format!("https://10.77.0.2:8443/login?token={}", "ab".repeat(32)));
        let url = dashboard_url("https://[fd00::2]:7443", &r).unwrap();
        assert!(url.starts_with("https://[fd00::2]:8443/login?token="), "{url}");
        let bad = lifeboat_proto::v1::DashboardLogin { token: "<script>".into(), ..r.clone() };
        assert!(dashboard_url("https://c:7443", &bad).is_err());
        assert!(dashboard_url("not a url", &r).is_err());
    }

    #[test]
    fn a_connection_closed_on_the_first_call_is_a_certificate_refusal() {
        let closed = tonic::Status::cancelled("operation was canceled: transport error: connection closed");
        let e = first_call_refused(closed);
        assert_eq!(e.exit_code(), 4, "{e}");
        assert!(e.to_string().contains("certificate rejected") && e.to_string().contains("openssl x509"), "{e}");
        let reset = tonic::Status::unavailable("transport error: connection reset by peer");
        assert_eq!(first_call_refused(reset).exit_code(), 4);
        // A TLS alert is named as such by the usual mapping.
        let alert = tonic::Status::unavailable("transport error: received fatal alert: CertificateExpired");
        let e = first_call_refused(alert);
        assert_eq!(e.exit_code(), 4);
        assert!(e.to_string().contains("CertificateExpired"), "{e}");
        // Anything else keeps its own code: a role refusal, a timeout.
        assert_eq!(first_call_refused(tonic::Status::permission_denied("needs the viewer role")).exit_code(), 4);
        assert_eq!(first_call_refused(tonic::Status::unavailable("transport error: timed out")).exit_code(), 3);
        assert_eq!(first_call_refused(tonic::Status::internal("boom")).exit_code(), 1);
    }

    /// A fake controller's Admin service: a follower refuses every call
    /// naming `leader`; a leader answers WhoAmI and SetHostStatus. Every
    /// call is recorded by name.
    #[derive(Clone, Default)]
    struct FakeAdmin {
        leader: Option<String>,
        /// A leader that answers WhoAmI but refuses everything else as a
        /// follower (leadership lost between the two calls).
        lost_after_whoami: bool,
        calls: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    type JobStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<lifeboat_proto::v1::JobRecord, tonic::Status>> + Send>,
    >;

    impl FakeAdmin {
        fn gate(&self, name: &str) -> Result<(), tonic::Status> {
            self.calls.lock().unwrap().push(name.to_string());
            let leader = match &self.leader {
                Some(l) => l.clone(),
                None if self.lost_after_whoami && name != "who_am_i" => String::new(),
                None => return Ok(()),
            };
            let mut s = tonic::Status::unavailable(format!("not the leader; leader is {leader}"));
            s.metadata_mut().insert(lifeboat_proto::LEADER_METADATA, leader.parse().unwrap());
            Err(s)
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    use lifeboat_proto::v1 as pb;
    use tonic::{Request, Response, Status};
    type R<T> = Result<Response<T>, Status>;
    fn unimpl<T>() -> R<T> {
        Err(Status::unimplemented("fake"))
    }

    #[tonic::async_trait]
    impl pb::admin_server::Admin for FakeAdmin {
        type WatchJobStream = JobStream;
        async fn list_hosts(&self, _: Request<pb::ListHostsRequest>) -> R<pb::ListHostsResponse> {
            self.gate("list_hosts")?;
            unimpl()
        }
        async fn get_host(&self, _: Request<pb::GetHostRequest>) -> R<pb::HostRecord> {
            self.gate("get_host")?;
            unimpl()
        }
        async fn list_guests(&self, _: Request<pb::ListGuestsRequest>) -> R<pb::ListGuestsResponse> {
            self.gate("list_guests")?;
            unimpl()
        }
        async fn who_am_i(&self, _: Request<pb::WhoAmIRequest>) -> R<pb::WhoAmIResponse> {
            self.gate("who_am_i")?;
            Ok(Response::new(pb::WhoAmIResponse::default()))
        }
        async fn plan_migration(&self, _: Request<pb::MigrateRequest>) -> R<pb::MigrationPlan> {
            self.gate("plan_migration")?;
            unimpl()
        }
        async fn start_migration(&self, _: Request<pb::MigrateRequest>) -> R<pb::JobRecord> {
            self.gate("start_migration")?;
            unimpl()
        }
        async fn list_jobs(&self, _: Request<pb::ListJobsRequest>) -> R<pb::ListJobsResponse> {
            self.gate("list_jobs")?;
            unimpl()
        }
        async fn get_job(&self, _: Request<pb::GetJobRequest>) -> R<pb::JobRecord> {
            self.gate("get_job")?;
            unimpl()
        }
        async fn watch_job(&self, _: Request<pb::GetJobRequest>) -> R<JobStream> {
            self.gate("watch_job")?;
            unimpl()
        }
        async fn list_audit(&self, _: Request<pb::ListAuditRequest>) -> R<pb::ListAuditResponse> {
            self.gate("list_audit")?;
            unimpl()
        }
        async fn set_host_status(&self, r: Request<pb::SetHostStatusRequest>) -> R<pb::HostRecord> {
            self.gate("set_host_status")?;
            let _ = r.into_inner();
            Ok(Response::new(pb::HostRecord::default()))
        }
        async fn plan_cleanup(&self, _: Request<pb::CleanupRequest>) -> R<pb::CleanupPlan> {
            self.gate("plan_cleanup")?;
            unimpl()
        }
        async fn cleanup(&self, _: Request<pb::CleanupRequest>) -> R<pb::CleanupPlan> {
            self.gate("cleanup")?;
            unimpl()
        }
        async fn list_alarms(&self, _: Request<pb::ListAlarmsRequest>) -> R<pb::ListAlarmsResponse> {
            self.gate("list_alarms")?;
            unimpl()
        }
        async fn clear_alarms(&self, _: Request<pb::ClearAlarmsRequest>) -> R<pb::ClearAlarmsResponse> {
            self.gate("clear_alarms")?;
            unimpl()
        }
        async fn restore_guest(&self, _: Request<pb::RestoreGuestRequest>) -> R<pb::GuestRecord> {
            self.gate("restore_guest")?;
            unimpl()
        }
        async fn forget_guest(&self, _: Request<pb::ForgetGuestRequest>) -> R<pb::ForgetGuestResponse> {
            self.gate("forget_guest")?;
            unimpl()
        }
        async fn start_vm(&self, _: Request<pb::StartVmRequest>) -> R<pb::GuestRecord> {
            self.gate("start_vm")?;
            unimpl()
        }
        async fn create_dashboard_login(&self, _: Request<pb::CreateDashboardLoginRequest>) -> R<pb::DashboardLogin> {
            self.gate("create_dashboard_login")?;
            unimpl()
        }
        async fn end_dashboard_sessions(
            &self,
            _: Request<pb::EndDashboardSessionsRequest>,
        ) -> R<pb::EndDashboardSessionsResponse> {
            self.gate("end_dashboard_sessions")?;
            unimpl()
        }
    }

    /// Serves `fake` with a controller certificate of `dir`'s CA; returns its URL.
    async fn serve(dir: &std::path::Path, fake: FakeAdmin) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let files = lifeboat_common::tls::TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("controller.pem"),
            key: dir.join("controller.key"),
        };
        let tls = files.load().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tls.server_config())
                .unwrap()
                .add_service(pb::admin_server::AdminServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("https://{addr}")
    }

    fn pki_dir() -> tempfile::TempDir {
        lifeboat_common::tls::install_crypto_provider();
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path()).unwrap();
        pki::issue(d.path(), d.path(), &Leaf::Controller(vec![])).unwrap();
        pki::issue(d.path(), d.path(), &Leaf::Client("alice".into(), Role::Operator)).unwrap();
        d
    }

    fn set_status(dir: &std::path::Path, urls: &[&str]) -> Cli {
        use clap::FromArgMatches;
        let mut argv: Vec<String> = vec!["lifeboat".into()];
        for u in urls {
            argv.extend(["--controller-url".to_string(), u.to_string()]);
        }
        for (flag, file) in [("--ca", "ca.pem"), ("--cert", "client-alice.pem"), ("--key", "client-alice.key")] {
            argv.extend([flag.to_string(), dir.join(file).display().to_string()]);
        }
        argv.extend(
            ["--timeout", "5", "hosts", "set-status", "host-a", "maintenance", "--reason", "t"].map(String::from),
        );
        Cli::from_arg_matches(&command().try_get_matches_from(argv).unwrap()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mutation_through_a_follower_reaches_the_leader_exactly_once() {
        let d = pki_dir();
        let leader = FakeAdmin::default();
        let leader_url = serve(d.path(), leader.clone()).await;
        let follower = FakeAdmin { leader: Some(leader_url.clone()), ..Default::default() };
        let follower_url = serve(d.path(), follower.clone()).await;
        // Another follower after it in the list, knowing no leader: the hint skips it.
        let idle = FakeAdmin { leader: Some(String::new()), ..Default::default() };
        let idle_url = serve(d.path(), idle.clone()).await;
        // Comma-separated in one flag and repeated.
        run(set_status(d.path(), &[&format!("{follower_url},{idle_url}"), &leader_url])).await.unwrap();
        assert_eq!(follower.calls(), ["who_am_i"], "the follower saw only the read-only first call");
        assert!(idle.calls().is_empty(), "{:?}", idle.calls());
        assert_eq!(leader.calls(), ["who_am_i", "set_host_status"], "the mutation reached the leader once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mutation_refused_by_a_leader_that_lost_leadership_is_reported_not_sent_elsewhere() {
        let d = pki_dir();
        let lost = FakeAdmin { lost_after_whoami: true, ..Default::default() };
        let lost_url = serve(d.path(), lost.clone()).await;
        let other = FakeAdmin::default();
        let other_url = serve(d.path(), other.clone()).await;
        let e = run(set_status(d.path(), &[&lost_url, &other_url])).await.unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e}");
        assert!(e.to_string().contains("not the leader") && e.to_string().contains("nothing was changed"), "{e}");
        assert_eq!(lost.calls(), ["who_am_i", "set_host_status"]);
        assert!(other.calls().is_empty(), "the command was sent on to another controller: {:?}", other.calls());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_leader_is_an_error_naming_each_url_and_its_answer() {
        let d = pki_dir();
        let a = FakeAdmin { leader: Some(String::new()), ..Default::default() };
        let a_url = serve(d.path(), a.clone()).await;
        // A closed port: bound, then released.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let dead_url = format!("https://{dead}");
        let e = run(set_status(d.path(), &[&a_url, &dead_url])).await.unwrap_err();
        let m = e.to_string();
        assert_eq!(e.exit_code(), 3, "{m}");
        assert!(m.contains(&format!("{a_url}: not the leader, and it knows no leader")), "{m}");
        assert!(m.contains(&format!("{dead_url}: cannot reach the controller")), "{m}");
        assert_eq!(a.calls(), ["who_am_i"]);
    }

    #[test]
    fn the_controller_url_takes_commas_also_from_the_environment() {
        let c = command();
        let a = c.get_arguments().find(|a| a.get_id() == "controller_url").unwrap();
        assert_eq!(a.get_value_delimiter(), Some(','));
        assert_eq!(a.get_env().and_then(|e| e.to_str()), Some("LIFEBOAT_CONTROLLER"));
    }
}
