//! `lifeboat migrate --force`, `lifeboat jobs ...` and `lifeboat log`.

use std::io::IsTerminal;

use clap::Args;
use lifeboat_proto::v1::{
    CleanupPlan, CleanupRequest, ClearAlarmsRequest, GetJobRequest, JobRecord, ListAlarmsRequest, ListAuditRequest, ListJobsRequest,
    MigrateRequest, MigrationPlan, admin_client::AdminClient,
};
use tonic::transport::Channel;

use crate::Format;
use crate::client::CliError;

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
    #[arg(long, value_name = "ID")]
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
    #[arg(long, value_name = "HOST")]
    from: String,
    /// Only to this host (may be NOT_ACCEPTING, to test it).
    #[arg(long, value_name = "HOST")]
    to: Option<String>,
    /// Only these guests (name or UUID; repeat).
    #[arg(long = "vm", value_name = "NAME")]
    vms: Vec<String>,
    /// Power the failed host off through its BMC first, and wait until it reads Off.
    #[arg(long)]
    fence: bool,
    /// You verified the host is powered off (no BMC can answer); recorded in the audit log.
    #[arg(long, requires = "reason")]
    attest_powered_off: bool,
    /// Why you are sure (required with --attest-powered-off).
    #[arg(long, value_name = "TEXT")]
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
    #[arg(long = "vm", value_name = "NAME", required = true)]
    vms: Vec<String>,
    /// The host it is on now (connected).
    #[arg(long, value_name = "HOST")]
    from: String,
    /// The host to move it to (AVAILABLE, or NOT_ACCEPTING to test it).
    #[arg(long, value_name = "HOST")]
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
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

/// The refusal message: every failed check with what to do.
fn refusal(p: &MigrationPlan) -> CliError {
    let mut lines = vec![format!("the plan cannot be carried out; nothing was changed ({})", p.summary)];
    for c in p.preconditions.iter().filter(|c| !c.ok) {
        lines.push(format!("  - {}: {}", c.name, c.detail));
        if !c.remedy.is_empty() {
            lines.push(format!("    what to do: {}", c.remedy));
        }
    }
    CliError::Refused6(lines.join("\n"))
}

fn print_plan(fmt: Format, p: &MigrationPlan) {
    if fmt == Format::Json {
        return json(p);
    }
    let kind = if p.power_evidence == "stopped-by-agent" { "Move" } else { "Forced migration" };
    println!("{kind} plan {} for host {}", p.plan_id, p.source);
    println!("\nPreconditions:");
    for c in &p.preconditions {
        println!("  [{}] {}: {}", if c.ok { " ok " } else { "FAIL" }, c.name, c.detail);
        if !c.ok && !c.remedy.is_empty() {
            println!("         what to do: {}", c.remedy);
        }
    }
    println!("\nGuests:");
    for g in &p.guests {
        let what = if g.movable {
            format!("-> {}{} ({})", g.target, if g.start { ", start" } else { ", leave stopped" }, g.reason)
        } else {
            format!("CANNOT MOVE: {}", g.reason)
        };
        println!("  {} ({}) {}", g.name, g.uuid, what);
        println!(
            "      last known: {}, autostart {}, managed save {}, {} MiB, priority {}",
            g.last_state,
            if g.last_autostart { "on" } else { "off" },
            if g.managed_save { "yes" } else { "no" },
            g.memory_kib / 1024,
            g.priority
        );
        println!("      disks: {}", if g.disks.is_empty() { "-".into() } else { g.disks.join(", ") });
        println!("      protection: {}", g.lock_protection);
        if !g.reserved_note.is_empty() {
            println!("      reserved by moves under way: {}", g.reserved_note);
        }
        for c in &g.checks {
            println!("      [{}] {}: {}", if c.ok { " ok " } else { "FAIL" }, c.name, c.detail);
        }
        if !g.cleanup.is_empty() {
            println!("      later: {}", g.cleanup);
        }
    }
    println!("\n{}", p.summary);
}

fn print_job(fmt: Format, j: &JobRecord) {
    if fmt == Format::Json {
        return json(j);
    }
    println!("Job {} ({}) from {}: {}", j.id, j.kind, j.source, j.state);
    println!("  operator {}, plan {}, power evidence {}, parallel {}", j.operator, j.plan_id, j.power_evidence, j.parallel);
    if !j.paused.is_empty() {
        println!("  PAUSED: {}", j.paused);
    }
    for m in &j.moves {
        let target = if m.target.is_empty() { "(none)" } else { m.target.as_str() };
        println!(
            "  {:<20} -> {:<12} {:<16} gen {}{}",
            m.name,
            target,
            m.state,
            m.generation,
            if m.error.is_empty() { String::new() } else { format!("  {}", m.error) }
        );
    }
    let left = left_behind(j);
    let moved = j.moves.iter().filter(|m| matches!(m.state.as_str(), "RUNNING" | "DEFINED_STOPPED")).count();
    if !left.is_empty() {
        let names: Vec<String> = left.iter().map(|m| format!("{} ({})", m.name, m.state)).collect();
        println!("  {moved} of {} guest(s) moved; left behind on {}: {}", j.moves.len(), j.source, names.join(", "));
    }
    if !j.error.is_empty() {
        println!("  error: {}", j.error);
    }
}

/// The guests a job left on its source: moves that failed, and guests the
/// plan could not move (NOT_MOVED).
fn left_behind(j: &JobRecord) -> Vec<&lifeboat_proto::v1::MoveRecord> {
    j.moves.iter().filter(|m| matches!(m.state.as_str(), "FAILED" | "NOT_MOVED")).collect()
}

fn terminal(state: &str) -> bool {
    matches!(state, "SUCCEEDED" | "PARTIAL" | "FAILED")
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
            if j.state != last_state {
                println!("job {}: {}", j.id, j.state);
                last_state = j.state.clone();
            }
            if j.paused != last_paused {
                match j.paused.as_str() {
                    "" => println!("job {}: resumed (the database can be written again)", j.id),
                    p => println!("job {}: PAUSED: {p}", j.id),
                }
                last_paused = j.paused.clone();
            }
            for m in &j.moves {
                if seen.get(&m.uuid) != Some(&m.state) {
                    seen.insert(m.uuid.clone(), m.state.clone());
                    let err = if m.error.is_empty() { String::new() } else { format!(": {}", m.error) };
                    if m.state == "NOT_MOVED" {
                        println!("  {}: NOT_MOVED (stays on {}){}", m.name, j.source, err);
                    } else {
                        println!("  {} -> {}: {}{}", m.name, m.target, m.state, err);
                    }
                }
            }
            if tty {
                let done = j.moves.iter().filter(|m| matches!(m.state.as_str(), "RUNNING" | "DEFINED_STOPPED")).count();
                let failed = j.moves.iter().filter(|m| m.state == "FAILED").count();
                let not_moved = j.moves.iter().filter(|m| m.state == "NOT_MOVED").count();
                eprintln!("  progress: {done}/{} done, {failed} failed, {not_moved} not moved", j.moves.len() - not_moved);
            }
        }
        let end = terminal(&j.state);
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
    match j.state.as_str() {
        "SUCCEEDED" => Ok(()),
        "PARTIAL" => Err(CliError::Other(format!("job {} finished PARTIAL: {}", j.id, j.error))),
        "FAILED" => Err(CliError::Other(format!("job {} FAILED: {}", j.id, j.error))),
        other => Err(CliError::Other(format!("job {} is {other}", j.id))),
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
                println!("\nNothing has been changed. To carry out this plan: add --plan-id {} (or --yes)", p.plan_id);
            }
            return if p.executable { Ok(()) } else { Err(refusal(&p)) };
        }
        if fmt == Format::Table {
            print_plan(fmt, &p);
            println!();
        }
        if !p.executable {
            return Err(refusal(&p));
        }
        req.yes = true;
    }
    let job = c.start_migration(req).await.map_err(CliError::from_status)?.into_inner();
    if fmt == Format::Table {
        let left = job.moves.iter().filter(|m| m.state == "NOT_MOVED").count();
        if left == 0 {
            println!("started job {} ({} guests)", job.id, job.moves.len());
        } else {
            println!("started job {} ({} guests to move, {left} left behind)", job.id, job.moves.len() - left);
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
        return Ok(json(&jobs));
    }
    println!("{:<18} {:<8} {:<10} {:<10} {:<8} {:<10} CREATED", "JOB", "KIND", "SOURCE", "STATE", "GUESTS", "OPERATOR");
    for j in jobs {
        println!(
            "{:<18} {:<8} {:<10} {:<10} {:<8} {:<10} {}",
            j.id,
            j.kind,
            j.source,
            if j.paused.is_empty() { j.state.clone() } else { format!("{}(PAUSED)", j.state) },
            j.moves.len(),
            j.operator,
            fmt_time(j.created_unix_ms)
        );
    }
    Ok(())
}

/// `lifeboat jobs show`.
pub async fn jobs_show(c: &mut AdminClient<Channel>, id: String, fmt: Format) -> Result<(), CliError> {
    let j = c.get_job(GetJobRequest { id }).await.map_err(CliError::from_status)?.into_inner();
    print_job(fmt, &j);
    // A finished job exits as `migrate` and `jobs watch` did; one still running is no failure.
    if terminal(&j.state) { job_exit(&j) } else { Ok(()) }
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

/// Parses `--since`: RFC 3339, or a duration ago like `30s`, `15m`, `2h`, `1d`.
pub fn parse_since(s: &str) -> Result<i64, CliError> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let (num, unit) = s.split_at(s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len());
    let n: i64 = num
        .parse()
        .map_err(|_| CliError::Usage(format!("--since '{s}': use RFC 3339 (2026-11-25T17:00:00Z) or a duration like 30s, 15m, 2h, 1d")))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(CliError::Usage(format!("--since '{s}': unknown unit '{unit}' (s, m, h, d)"))),
    };
    Ok(lifeboat_common::now_unix_ms() - secs * 1000)
}

/// `lifeboat log`.
pub async fn log(
    c: &mut AdminClient<Channel>,
    host: Option<String>,
    vm: Option<String>,
    job: Option<String>,
    since: Option<String>,
    fmt: Format,
) -> Result<(), CliError> {
    let since_unix_ms = match since {
        Some(s) => parse_since(&s)?,
        None => 0,
    };
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
        return Ok(json(&r.entries));
    }
    for e in r.entries {
        let mut ctx = Vec::new();
        if !e.host.is_empty() {
            ctx.push(format!("host={}", e.host));
        }
        if !e.vm.is_empty() {
            ctx.push(format!("vm={}", e.vm));
        }
        if !e.job.is_empty() {
            ctx.push(format!("job={}", e.job));
        }
        println!("{} {:<10} {:<20} {} {}", fmt_time(e.at_unix_ms), e.actor, e.action, ctx.join(" "), e.detail);
    }
    Ok(())
}

fn print_cleanup(fmt: Format, p: &CleanupPlan) {
    if fmt == Format::Json {
        return json(p);
    }
    println!("Cleanup {} of host {}", p.plan_id, p.host);
    for c in &p.preconditions {
        println!("  [{}] {}: {}", if c.ok { " ok " } else { "FAIL" }, c.name, c.detail);
        if !c.ok && !c.remedy.is_empty() {
            println!("         what to do: {}", c.remedy);
        }
    }
    for i in &p.items {
        println!("  {} ({}) moved to {} by {}: {} — {}", i.name, i.uuid, i.moved_to, i.job, i.action, i.detail);
    }
    println!("{}", p.summary);
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
            println!("Nothing has been changed. To carry it out: add --yes (or --plan-id {})", p.plan_id);
        }
        return if p.executable || p.preconditions.iter().all(|c| c.ok) {
            Ok(())
        } else {
            Err(CliError::Refused6("the cleanup cannot be carried out; nothing was changed".into()))
        };
    }
    let p = c.cleanup(req).await.map_err(CliError::from_status)?.into_inner();
    print_cleanup(fmt, &p);
    if p.items.iter().any(|i| i.action == "failed") {
        return Err(CliError::Other("some stale definitions could not be removed; see above".into()));
    }
    Ok(())
}

/// `lifeboat alarms`.
pub async fn alarms(c: &mut AdminClient<Channel>, all: bool, fmt: Format) -> Result<(), CliError> {
    let r = c.list_alarms(ListAlarmsRequest { include_cleared: all }).await.map_err(CliError::from_status)?.into_inner();
    if fmt == Format::Json {
        return Ok(json(&r.alarms));
    }
    if r.alarms.is_empty() {
        println!("no active alarms");
    }
    for a in r.alarms {
        let cleared = if a.cleared_unix_ms > 0 { format!(" (cleared {})", fmt_time(a.cleared_unix_ms)) } else { String::new() };
        println!("{} ALARM {} on {}: {}{}", fmt_time(a.at_unix_ms), a.kind, a.host, a.detail, cleared);
    }
    Ok(())
}

/// `lifeboat alarms clear`.
pub async fn alarms_clear(c: &mut AdminClient<Channel>, host: String, kind: String, reason: String, fmt: Format) -> Result<(), CliError> {
    let r = c
        .clear_alarms(ClearAlarmsRequest { host, kind, reason })
        .await
        .map_err(CliError::from_status)?
        .into_inner();
    if fmt == Format::Json {
        return Ok(json(&r.cleared));
    }
    for a in &r.cleared {
        println!("cleared: {} ALARM {} on {}: {}", fmt_time(a.at_unix_ms), a.kind, a.host, a.detail);
    }
    println!("{} alarm(s) cleared", r.cleared.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str, moves: &[(&str, &str)]) -> JobRecord {
        JobRecord {
            id: "mig-1".into(),
            state: state.into(),
            source: "host-a".into(),
            error: "left behind".into(),
            moves: moves
                .iter()
                .map(|(n, s)| lifeboat_proto::v1::MoveRecord { name: n.to_string(), state: s.to_string(), ..Default::default() })
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
    fn since_accepts_durations_and_rfc3339() {
        let now = lifeboat_common::now_unix_ms();
        let t = parse_since("15m").unwrap();
        assert!((now - t - 900_000).abs() < 5_000);
        assert_eq!(parse_since("1970-01-01T00:00:01Z").unwrap(), 1000);
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("5w").is_err());
    }
}
