//! `lifeboat migrate --force`, `lifeboat jobs ...` and `lifeboat log`.

use std::io::IsTerminal;

use clap::Args;
use lifeboat_proto::v1::{
    CleanupAction, CleanupPlan, CleanupRequest, ClearAlarmsRequest, GetJobRequest, JobRecord, JobState,
    ListAlarmsRequest, ListAuditRequest, ListJobsRequest, MigrateRequest, MigrationPlan, MoveState,
    admin_client::AdminClient,
};
use tonic::transport::Channel;

use crate::Format;
use crate::client::CliError;
use crate::output::{clean, err, out, pad};
use crate::wire;

/// How a plan is reviewed and carried out (shared by `migrate` and `move`).
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Define the guests on their targets but leave them stopped.
    #[arg(long)]
    no_start: bool,
    /// Only print the plan (the default when neither --yes nor --plan-id is given).
    #[arg(long, conflicts_with_all = ["yes", "plan_id"])]
    plan: bool,
    /// Plan and carry it out at once.
    #[arg(long, conflicts_with = "plan_id")]
    yes: bool,
    /// Carry out the plan with this id, refusing if anything changed since.
    #[arg(long, value_name = "ID", value_parser = crate::args::id)]
    plan_id: Option<String>,
    /// Return after starting the job instead of following it.
    #[arg(long)]
    no_wait: bool,
}

/// Arguments of `lifeboat migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Required: recreate the guests of a failed host elsewhere (the only kind of migration).
    #[arg(long)]
    force: bool,
    /// The failed host.
    #[arg(long, value_name = "HOST", value_parser = crate::args::host)]
    from: String,
    /// Only to this host (may be NOT_ACCEPTING, to test it).
    #[arg(long, value_name = "HOST", value_parser = crate::args::host)]
    to: Option<String>,
    /// Only these guests (name or UUID; repeat).
    #[arg(long = "vm", value_name = "NAME", value_parser = crate::args::vm)]
    vms: Vec<String>,
    /// Power the failed host off through its BMC first, and wait until it reads Off.
    #[arg(long)]
    fence: bool,
    /// You verified the host is powered off (no BMC can answer); recorded in the audit log.
    #[arg(long, requires = "reason")]
    attest_powered_off: bool,
    /// Why you are sure (required with --attest-powered-off).
    #[arg(long, value_name = "TEXT", value_parser = crate::args::reason)]
    reason: Option<String>,
    /// Guests moved at once (default 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    parallel: Option<u32>,
    #[command(flatten)]
    exec: ExecArgs,
    #[arg(skip)]
    planned_move: bool,
}

/// Arguments of `lifeboat move`: a planned cold move off a running host.
#[derive(Args, Debug)]
pub struct MoveArgs {
    /// The guest to move (name or UUID; repeat for several).
    #[arg(long = "vm", value_name = "NAME", required = true, value_parser = crate::args::vm)]
    vms: Vec<String>,
    /// The host it is on now (connected).
    #[arg(long, value_name = "HOST", value_parser = crate::args::host)]
    from: String,
    /// The host to move it to (AVAILABLE, or NOT_ACCEPTING to test it).
    #[arg(long, value_name = "HOST", value_parser = crate::args::host)]
    to: String,
    #[command(flatten)]
    exec: ExecArgs,
}

impl From<MoveArgs> for MigrateArgs {
    fn from(m: MoveArgs) -> Self {
        MigrateArgs {
            force: true,
            from: m.from,
            to: Some(m.to),
            vms: m.vms,
            fence: false,
            attest_powered_off: false,
            reason: None,
            parallel: None,
            exec: m.exec,
            planned_move: true,
        }
    }
}

fn request(a: &MigrateArgs) -> MigrateRequest {
    MigrateRequest {
        source: a.from.clone(),
        target: a.to.clone().unwrap_or_default(),
        vms: a.vms.clone(),
        fence: a.fence,
        attest_powered_off: a.attest_powered_off,
        attest_reason: a.reason.clone().unwrap_or_default(),
        no_start: a.exec.no_start,
        parallel: a.parallel.unwrap_or(0),
        plan_id: a.exec.plan_id.clone().unwrap_or_default(),
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
        planned_move: a.planned_move,
        yes: false,
    }
}

fn json<T: serde::Serialize>(v: &T) {
    crate::output::print_json(v);
}

/// The refusal message: every failed check with what to do.
fn refusal(p: &MigrationPlan) -> CliError {
    let mut lines = vec![format!("the plan cannot be carried out; nothing was changed ({})", clean(&p.summary))];
    for c in p.preconditions.iter().filter(|c| !c.ok) {
        lines.push(format!("  - {}: {}", clean(&c.name), clean(&c.detail)));
        if !c.remedy.is_empty() {
            lines.push(format!("    what to do: {}", clean(&c.remedy)));
        }
    }
    CliError::Refused6(lines.join("\n"))
}

fn print_plan(fmt: Format, p: &MigrationPlan) {
    if fmt == Format::Json {
        return json(p);
    }
    let kind = if wire::is_planned_move(p) { "Move" } else { "Forced migration" };
    out!("{kind} plan {} for host {}", clean(&p.plan_id), clean(&p.source));
    out!("\nPreconditions:");
    for c in &p.preconditions {
        out!("  [{}] {}: {}", if c.ok { " ok " } else { "FAIL" }, clean(&c.name), clean(&c.detail));
        if !c.ok && !c.remedy.is_empty() {
            out!("         what to do: {}", clean(&c.remedy));
        }
    }
    out!("\nGuests:");
    for g in &p.guests {
        let what = if g.movable {
            format!(
                "-> {}{} ({})",
                clean(&g.target),
                if g.start { ", start" } else { ", leave stopped" },
                clean(&g.reason)
            )
        } else {
            format!("CANNOT MOVE: {}", g.reason)
        };
        out!("  {} ({}) {}", clean(&g.name), clean(&g.uuid), what);
        out!(
            "      last known: {}, autostart {}, managed save {}, {} MiB, priority {}",
            clean(&g.last_state),
            if g.last_autostart { "on" } else { "off" },
            if g.managed_save { "yes" } else { "no" },
            g.memory_kib / 1024,
            g.priority
        );
        out!("      disks: {}", if g.disks.is_empty() { "-".into() } else { clean(&g.disks.join(", ")).into_owned() });
        out!("      protection: {}", clean(&g.lock_protection));
        if !g.reserved_note.is_empty() {
            out!("      reserved by moves under way: {}", clean(&g.reserved_note));
        }
        for c in &g.checks {
            out!("      [{}] {}: {}", if c.ok { " ok " } else { "FAIL" }, clean(&c.name), clean(&c.detail));
        }
        if !g.cleanup.is_empty() {
            out!("      later: {}", clean(&g.cleanup));
        }
    }
    out!("\n{}", clean(&p.summary));
}

fn print_job(fmt: Format, j: &JobRecord) {
    if fmt == Format::Json {
        return json(j);
    }
    out!("Job {} ({}) from {}: {}", clean(&j.id), clean(&j.kind), clean(&j.source), clean(wire::job_state_shown(j)));
    out!(
        "  operator {}, plan {}, power evidence {}, parallel {}",
        clean(&j.operator),
        clean(&j.plan_id),
        clean(&j.power_evidence),
        j.parallel
    );
    if !j.paused.is_empty() {
        out!("  PAUSED: {}", clean(&j.paused));
    }
    for m in &j.moves {
        let target = if m.target.is_empty() { "(none)" } else { m.target.as_str() };
        out!(
            "  {} -> {} {} gen {}{}",
            pad(&crate::output::truncate(&clean(&m.name), crate::output::CELL_MAX), 20),
            pad(&clean(target), 12),
            pad(&clean(wire::move_state_shown(m)), 16),
            m.generation,
            if m.error.is_empty() { String::new() } else { format!("  {}", clean(&m.error)) }
        );
    }
    let left = left_behind(j);
    let moved = j.moves.iter().filter(|m| wire::moved(m)).count();
    if !left.is_empty() {
        let names: Vec<String> =
            left.iter().map(|m| format!("{} ({})", clean(&m.name), clean(wire::move_state_shown(m)))).collect();
        out!(
            "  {moved} of {} guest(s) moved; left behind on {}: {}",
            j.moves.len(),
            clean(&j.source),
            names.join(", ")
        );
    }
    if !j.error.is_empty() {
        out!("  error: {}", clean(&j.error));
    }
}

/// The guests a job left on its source: moves that failed, and guests the
/// plan could not move (NOT_MOVED).
fn left_behind(j: &JobRecord) -> Vec<&lifeboat_proto::v1::MoveRecord> {
    j.moves.iter().filter(|m| wire::left_behind(m)).collect()
}

/// Follows a job until it ends; prints each change. Returns the last record.
pub async fn watch(c: &mut AdminClient<Channel>, id: &str, fmt: Format) -> Result<JobRecord, CliError> {
    let mut stream = c.watch_job(GetJobRequest { id: id.into() }).await.map_err(CliError::from_status)?.into_inner();
    let tty = std::io::stdout().is_terminal() && fmt == Format::Table;
    let mut seen: std::collections::HashMap<String, String> = Default::default();
    let mut last_state = String::new();
    let mut last_paused = String::new();
    let mut last: Option<JobRecord> = None;
    while let Some(j) = stream.message().await.map_err(CliError::from_status)? {
        if fmt == Format::Table {
            if wire::job_state_shown(&j) != last_state {
                out!("job {}: {}", clean(&j.id), clean(wire::job_state_shown(&j)));
                last_state = wire::job_state_shown(&j).to_string();
            }
            if j.paused != last_paused {
                match j.paused.as_str() {
                    "" => out!("job {}: resumed (the database can be written again)", clean(&j.id)),
                    p => out!("job {}: PAUSED: {}", clean(&j.id), clean(p)),
                }
                last_paused = j.paused.clone();
            }
            for m in &j.moves {
                let shown = wire::move_state_shown(m);
                if seen.get(&m.uuid).map(String::as_str) != Some(shown) {
                    seen.insert(m.uuid.clone(), shown.to_string());
                    let err = if m.error.is_empty() { String::new() } else { format!(": {}", clean(&m.error)) };
                    if wire::move_state(m) == Some(MoveState::NotMoved) {
                        out!("  {}: NOT_MOVED (stays on {}){}", clean(&m.name), clean(&j.source), err);
                    } else {
                        out!("  {} -> {}: {}{}", clean(&m.name), clean(&m.target), clean(shown), err);
                    }
                }
            }
            if tty {
                let done = j.moves.iter().filter(|m| wire::moved(m)).count();
                let failed = j.moves.iter().filter(|m| wire::move_state(m) == Some(MoveState::Failed)).count();
                let not_moved = j.moves.iter().filter(|m| wire::move_state(m) == Some(MoveState::NotMoved)).count();
                err!(
                    "  progress: {done}/{} done, {failed} failed, {not_moved} not moved",
                    j.moves.len().saturating_sub(not_moved)
                );
            }
        }
        let end = wire::job_over(&j);
        last = Some(j);
        if end {
            break;
        }
    }
    last.ok_or_else(|| CliError::Other("the controller ended the watch without any job state".into()))
}

/// The exit status of a finished job: 0 only when every guest moved
/// (SUCCEEDED); 1 when guests were left behind (PARTIAL) or none moved
/// (FAILED). `migrate`, `move`, `jobs watch` and `jobs show` all use it.
fn job_exit(j: &JobRecord) -> Result<(), CliError> {
    match wire::job_state(j) {
        Some(JobState::Succeeded) => Ok(()),
        Some(JobState::Partial) => {
            Err(CliError::Other(format!("job {} finished PARTIAL: {}", clean(&j.id), clean(&j.error))))
        }
        Some(JobState::Failed) => Err(CliError::Other(format!("job {} FAILED: {}", clean(&j.id), clean(&j.error)))),
        _ => Err(CliError::Other(format!("job {} is {}", clean(&j.id), clean(wire::job_state_shown(j))))),
    }
}

/// `lifeboat migrate`.
pub async fn migrate(c: &mut AdminClient<Channel>, a: MigrateArgs, fmt: Format) -> Result<(), CliError> {
    if !a.force {
        return Err(CliError::Usage(
            "only forced migration of a failed host is supported: add --force (and read the plan first)".into(),
        ));
    }
    if a.to.as_deref() == Some(a.from.as_str()) {
        return Err(CliError::Usage(format!("--to {} is the failed host itself; name another host", a.from)));
    }
    let mut req = request(&a);
    if a.exec.plan_id.is_none() {
        let p = c.plan_migration(req.clone()).await.map_err(CliError::from_status)?.into_inner();
        if !a.exec.yes {
            print_plan(fmt, &p);
            if fmt == Format::Table && p.executable {
                out!(
                    "\nNothing has been changed. To carry out this plan: add --plan-id {} (or --yes)",
                    clean(&p.plan_id)
                );
            }
            return if p.executable { Ok(()) } else { Err(refusal(&p)) };
        }
        if fmt == Format::Table {
            print_plan(fmt, &p);
            out!();
        }
        if !p.executable {
            return Err(refusal(&p));
        }
        req.yes = true;
    }
    let job = c.start_migration(req).await.map_err(CliError::from_status)?.into_inner();
    if fmt == Format::Table {
        let left = job.moves.iter().filter(|m| wire::move_state(m) == Some(MoveState::NotMoved)).count();
        if left == 0 {
            out!("started job {} ({} guests)", clean(&job.id), job.moves.len());
        } else {
            out!(
                "started job {} ({} guests to move, {left} left behind)",
                clean(&job.id),
                job.moves.len().saturating_sub(left)
            );
        }
    }
    if a.exec.no_wait {
        if fmt == Format::Json {
            json(&job);
        }
        return Ok(());
    }
    let last = watch(c, &job.id, fmt).await?;
    print_job(fmt, &last);
    job_exit(&last)
}

/// `lifeboat jobs list`.
pub async fn jobs_list(c: &mut AdminClient<Channel>, host: Option<String>, fmt: Format) -> Result<(), CliError> {
    let jobs = c
        .list_jobs(ListJobsRequest { host: host.unwrap_or_default(), limit: 100 })
        .await
        .map_err(CliError::from_status)?
        .into_inner()
        .jobs;
    if fmt == Format::Json {
        json(&jobs);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.kind.clone(),
                j.source.clone(),
                if j.paused.is_empty() {
                    wire::job_state_shown(j).to_string()
                } else {
                    format!("{}(PAUSED)", clean(wire::job_state_shown(j)))
                },
                j.moves.len().to_string(),
                j.operator.clone(),
                fmt_time(j.created_unix_ms),
            ]
        })
        .collect();
    for l in crate::output::render_table(&["JOB", "KIND", "SOURCE", "STATE", "GUESTS", "OPERATOR", "CREATED"], &rows) {
        out!("{l}");
    }
    Ok(())
}

/// `lifeboat jobs show`.
pub async fn jobs_show(c: &mut AdminClient<Channel>, id: String, fmt: Format) -> Result<(), CliError> {
    let j = c.get_job(GetJobRequest { id }).await.map_err(CliError::from_status)?.into_inner();
    print_job(fmt, &j);
    // A finished job exits as `migrate` and `jobs watch` did; one still running is no failure.
    if wire::job_over(&j) { job_exit(&j) } else { Ok(()) }
}

/// `lifeboat jobs watch`.
pub async fn jobs_watch(c: &mut AdminClient<Channel>, id: String, fmt: Format) -> Result<(), CliError> {
    let last = watch(c, &id, fmt).await?;
    print_job(fmt, &last);
    job_exit(&last)
}

/// Formats a timestamp as RFC 3339 UTC.
pub fn fmt_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// The longest `--since` duration: ten years.
pub const SINCE_MAX_SECS: i64 = 3650 * 86_400;

const SINCE_FORMS: &str = "use RFC 3339 (2026-11-25T17:00:00Z) or a positive duration ago: \
     digits then s, m, h or d (30s, 15m, 2h, 1d), at most 3650d";

/// Parses `--since`: RFC 3339 (not before 1970, not in the future), or a
/// positive duration ago like `30s`, `15m`, `2h`, `1d` of at most ten years.
/// Returns Unix milliseconds; every bad form is a message naming the
/// accepted ones (a usage error, exit 2).
pub fn parse_since(s: &str) -> Result<i64, String> {
    let now = lifeboat_common::now_unix_ms();
    let shown = crate::output::truncate(&crate::output::clean(s), 40).into_owned();
    if s.len() > 64 {
        return Err(format!("'{shown}' is too long: {SINCE_FORMS}"));
    }
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        let ms = i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| format!("'{shown}' is out of range: {SINCE_FORMS}"))?;
        if ms < 0 {
            return Err(format!("'{shown}' is before 1970: {SINCE_FORMS}"));
        }
        if ms > now.saturating_add(86_400_000) {
            return Err(format!("'{shown}' is in the future, nothing would match: {SINCE_FORMS}"));
        }
        return Ok(ms);
    }
    let (num, unit) = s.split_at(s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len());
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{shown}' is not a time: {SINCE_FORMS}"));
    }
    let unit_secs: i64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("'{shown}': unknown unit '{}': {SINCE_FORMS}", crate::output::clean(unit))),
    };
    let too_far = || format!("'{shown}' is more than ten years: {SINCE_FORMS}");
    let n: i64 = num.parse().map_err(|_| too_far())?;
    if n == 0 {
        return Err(format!("'{shown}' is zero: {SINCE_FORMS}"));
    }
    let secs = n.checked_mul(unit_secs).filter(|v| *v <= SINCE_MAX_SECS).ok_or_else(too_far)?;
    // secs <= ten years, so neither product nor difference can overflow.
    Ok(now.saturating_sub(secs.saturating_mul(1000)))
}

/// `lifeboat log`.
pub async fn log(
    c: &mut AdminClient<Channel>,
    host: Option<String>,
    vm: Option<String>,
    job: Option<String>,
    since: Option<i64>,
    fmt: Format,
) -> Result<(), CliError> {
    let since_unix_ms = since.unwrap_or(0);
    let r = c
        .list_audit(ListAuditRequest {
            host: host.unwrap_or_default(),
            vm: vm.unwrap_or_default(),
            job: job.unwrap_or_default(),
            since_unix_ms,
            limit: 0,
        })
        .await
        .map_err(CliError::from_status)?
        .into_inner();
    if fmt == Format::Json {
        json(&r.entries);
        return Ok(());
    }
    for e in r.entries {
        let mut ctx = Vec::new();
        if !e.host.is_empty() {
            ctx.push(format!("host={}", clean(&e.host)));
        }
        if !e.vm.is_empty() {
            ctx.push(format!("vm={}", clean(&e.vm)));
        }
        if !e.job.is_empty() {
            ctx.push(format!("job={}", clean(&e.job)));
        }
        out!(
            "{} {} {} {} {}",
            fmt_time(e.at_unix_ms),
            pad(&clean(&e.actor), 10),
            pad(&clean(&e.action), 20),
            ctx.join(" "),
            clean(&e.detail)
        );
    }
    Ok(())
}

fn print_cleanup(fmt: Format, p: &CleanupPlan) {
    if fmt == Format::Json {
        return json(p);
    }
    out!("Cleanup {} of host {}", clean(&p.plan_id), clean(&p.host));
    for c in &p.preconditions {
        out!("  [{}] {}: {}", if c.ok { " ok " } else { "FAIL" }, clean(&c.name), clean(&c.detail));
        if !c.ok && !c.remedy.is_empty() {
            out!("         what to do: {}", clean(&c.remedy));
        }
    }
    for i in &p.items {
        out!(
            "  {} ({}) moved to {} by {}: {} — {}",
            clean(&i.name),
            clean(&i.uuid),
            clean(&i.moved_to),
            clean(&i.job),
            clean(wire::cleanup_action_shown(i)),
            clean(&i.detail)
        );
    }
    out!("{}", clean(&p.summary));
}

/// `lifeboat cleanup`.
pub async fn cleanup(
    c: &mut AdminClient<Channel>,
    host: String,
    plan_only: bool,
    destroy_running: bool,
    plan_id: Option<String>,
    fmt: Format,
) -> Result<(), CliError> {
    let req = CleanupRequest { host, destroy_running, plan_id: plan_id.unwrap_or_default() };
    if plan_only {
        let p = c.plan_cleanup(req).await.map_err(CliError::from_status)?.into_inner();
        print_cleanup(fmt, &p);
        if fmt == Format::Table && p.executable {
            out!("Nothing has been changed. To carry it out: add --yes (or --plan-id {})", clean(&p.plan_id));
        }
        return if p.executable || p.preconditions.iter().all(|c| c.ok) {
            Ok(())
        } else {
            Err(CliError::Refused6("the cleanup cannot be carried out; nothing was changed".into()))
        };
    }
    let p = c.cleanup(req).await.map_err(CliError::from_status)?.into_inner();
    print_cleanup(fmt, &p);
    if p.items.iter().any(|i| wire::cleanup_action(i) == Some(CleanupAction::Failed)) {
        return Err(CliError::Other("some stale definitions could not be removed; see above".into()));
    }
    if p.items.iter().any(|i| wire::cleanup_action(i).is_none()) {
        return Err(CliError::Other(
            "the controller reported a cleanup action this lifeboat does not know (shown as unknown above); \
             check with `lifeboat cleanup HOST` (plan only) using a matching lifeboat"
                .into(),
        ));
    }
    Ok(())
}

/// `lifeboat alarms`.
pub async fn alarms(c: &mut AdminClient<Channel>, all: bool, fmt: Format) -> Result<(), CliError> {
    let r =
        c.list_alarms(ListAlarmsRequest { include_cleared: all }).await.map_err(CliError::from_status)?.into_inner();
    if fmt == Format::Json {
        json(&r.alarms);
        return Ok(());
    }
    if r.alarms.is_empty() {
        out!("no active alarms");
    }
    for a in r.alarms {
        let cleared =
            if a.cleared_unix_ms > 0 { format!(" (cleared {})", fmt_time(a.cleared_unix_ms)) } else { String::new() };
        out!(
            "{} ALARM {} on {}: {}{}",
            fmt_time(a.at_unix_ms),
            clean(&a.kind),
            clean(&a.host),
            clean(&a.detail),
            cleared
        );
    }
    Ok(())
}

/// `lifeboat alarms clear`.
pub async fn alarms_clear(
    c: &mut AdminClient<Channel>,
    host: String,
    kind: String,
    reason: String,
    fmt: Format,
) -> Result<(), CliError> {
    let r =
        c.clear_alarms(ClearAlarmsRequest { host, kind, reason }).await.map_err(CliError::from_status)?.into_inner();
    if fmt == Format::Json {
        json(&r.cleared);
        return Ok(());
    }
    for a in &r.cleared {
        out!(
            "cleared: {} ALARM {} on {}: {}",
            fmt_time(a.at_unix_ms),
            clean(&a.kind),
            clean(&a.host),
            clean(&a.detail)
        );
    }
    out!("{} alarm(s) cleared", r.cleared.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job as the controller sends it: each state as its name and its enum.
    fn job(state: &str, moves: &[(&str, &str)]) -> JobRecord {
        JobRecord {
            id: "mig-1".into(),
            state: state.into(),
            job_state: JobState::from_str_name(&format!("JOB_STATE_{state}")).map_or(0, |s| s as i32),
            source: "host-a".into(),
            error: "left behind".into(),
            moves: moves
                .iter()
                .map(|(n, s)| lifeboat_proto::v1::MoveRecord {
                    name: n.to_string(),
                    state: s.to_string(),
                    move_state: MoveState::from_str_name(&format!("MOVE_STATE_{s}")).map_or(0, |s| s as i32),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_job_that_moved_every_guest_exits_zero() {
        assert!(job_exit(&job("SUCCEEDED", &[("vm-1", "RUNNING")])).is_ok());
        let partial = job("PARTIAL", &[("vm-1", "RUNNING"), ("vm-local", "NOT_MOVED")]);
        let e = job_exit(&partial).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("PARTIAL") && e.to_string().contains("left behind"), "{e}");
        assert_eq!(job_exit(&job("FAILED", &[("vm-1", "FAILED")])).unwrap_err().exit_code(), 1);
        let names: Vec<&str> = left_behind(&partial).iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["vm-local"]);
    }

    #[test]
    fn a_state_number_this_cli_does_not_know_shows_unknown_and_never_passes() {
        let mut j = job("SUCCEEDED", &[("vm-1", "RUNNING")]);
        j.job_state = 42;
        j.moves[0].move_state = 42;
        assert!(!wire::job_over(&j));
        let e = job_exit(&j).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.to_string(), "job mig-1 is unknown");
        assert!(left_behind(&j).is_empty());
        assert_eq!(wire::move_state_shown(&j.moves[0]), "unknown");
        // Nothing panics printing it.
        print_job(Format::Table, &j);
    }

    #[test]
    fn since_accepts_durations_and_rfc3339() {
        let now = lifeboat_common::now_unix_ms();
        let t = parse_since("15m").unwrap();
        assert!((now - t - 900_000).abs() < 5_000);
        assert_eq!(parse_since("1970-01-01T00:00:01Z").unwrap(), 1000);
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("5w").is_err());
        for bad in [
            "-5d",
            "+5d",
            "0d",
            "999999999999999d",
            "99999999999999999999999s",
            "3651d",
            "",
            "d",
            "5",
            "1969-12-31T23:59:59Z",
            "2999-01-01T00:00:00Z",
            "5d\u{1b}",
        ] {
            let e = parse_since(bad).expect_err(bad);
            assert!(e.contains("RFC 3339") && !e.contains('\u{1b}'), "{bad}: {e}");
        }
        assert!(parse_since("3650d").is_ok());
        assert!((now - parse_since("87600h").unwrap() - SINCE_MAX_SECS * 1000).abs() < 5_000);
    }
}
