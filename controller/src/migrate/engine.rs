//! The forced-migration engine: gathers the planner's inputs, and carries
//! out durable jobs. Every step is written to the database before it is
//! done and is check-then-act (the agent answers "already" for a step that
//! already took effect), so a controller crash anywhere resumes on restart
//! without doing anything twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_proto::v1::{
    CheckPaths, CleanupGuest, DefineGuest, GrantLeases, JobRecord, Lease, MigrateRequest, MigrationPlan, MoveRecord,
    StartGuest, StopGuest, command::Kind,
};
use prost::Message;
use tokio::sync::{Semaphore, broadcast};
use tracing::{error, info, warn};

use super::plan::{self, Ownership, PlanInput, PowerReading};
use crate::domain::job::{
    AUDIT_MOVE_FAILED, GUESTS_NOT_MOVED, InvalidTransition, JOB_INVALID_TRANSITION, JobEffect, JobEvent, JobOutcome,
    JobState, MoveEffect, MoveEvent, MoveOutcome, MoveState, job_outcome, job_step, step,
};
use crate::domain::{JobKind, PowerEvidence};
use crate::error::ControllerError;
use crate::fence::{BmcConfig, FenceConfigError, FenceEvent, Fencer, PowerState};
use crate::ports::{AuditRow, JobRow, MoveRow, OwnerRow, RepoError, RepoResult, Repositories, WaitingRow};
use crate::registry::Registry;

/// Default number of guests moved at once.
pub const DEFAULT_PARALLEL: u32 = 4;

/// How long a step waits for a target's agent session to come back, and
/// retries on the new session a call whose session was lost.
const SESSION_WAIT: Duration = Duration::from_secs(60);

/// A job paused on a database write error retries after this long at
/// first, doubling up to [`PAUSE_RETRY_MAX`].
const PAUSE_RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two retries of a paused job.
const PAUSE_RETRY_MAX: Duration = Duration::from_secs(10);

/// When a job's pause began (wall clock ms, and a monotonic instant), and
/// the detail of the `job-paused` alarm it raised, if any.
type PauseBegan = (i64, std::time::Instant, Option<String>);

/// The engine.
pub struct Engine {
    reg: Arc<Registry>,
    fencers: BTreeMap<String, Arc<Fencer>>,
    grace_ms: u64,
    memory_reserve_kib: u64,
    lease_ttl_ms: i64,
    changes: broadcast::Sender<String>,
    call_timeout: Duration,
    /// Held from planning until the job and its reservations are written:
    /// a job's placement is decided against the reservations of every job
    /// created before it.
    placing: tokio::sync::Mutex<()>,
    /// Jobs paused on a database error: job id → why and since when. In
    /// memory: the database cannot be written while it is so.
    paused: std::sync::Mutex<BTreeMap<String, String>>,
    /// Paused jobs not yet seen to make progress: job id → when the pause
    /// began (wall clock ms, and a monotonic instant), and the detail of
    /// the `job-paused` alarm it raised, if any. The first job or move write
    /// that succeeds removes the entry, audits the resume and clears that alarm.
    pause_began: std::sync::Mutex<BTreeMap<String, PauseBegan>>,
    /// Jobs stopped by an invalid transition: job id → why. Their moves
    /// carry nothing further out; the entry goes when the job ends.
    stopped: std::sync::Mutex<BTreeMap<String, String>>,
    /// Replaces the next observed move event (tests force an invalid transition).
    #[cfg(test)]
    test_event: std::sync::Mutex<Option<MoveEvent>>,
}

fn audit(actor: &str, action: &str, host: &str, vm: &str, job: &str, detail: impl Into<String>) -> AuditRow {
    AuditRow {
        actor: actor.into(),
        action: action.into(),
        host: host.into(),
        vm: vm.into(),
        job: job.into(),
        detail: detail.into(),
        ..Default::default()
    }
}

impl Engine {
    /// Builds the engine with one fencer per configured BMC.
    pub fn new(
        reg: Arc<Registry>,
        bmc: &BTreeMap<String, BmcConfig>,
        grace_ms: u64,
        memory_reserve_kib: u64,
        lease_ttl_ms: i64,
    ) -> Result<Arc<Self>, FenceConfigError> {
        let mut fencers = BTreeMap::new();
        for (host, cfg) in bmc {
            fencers.insert(host.clone(), Arc::new(Fencer::new(host, cfg)?));
        }
        let (changes, _) = broadcast::channel(1024);
        Ok(Arc::new(Engine {
            reg,
            fencers,
            grace_ms,
            memory_reserve_kib,
            lease_ttl_ms,
            changes,
            call_timeout: Duration::from_secs(60),
            paused: Default::default(),
            pause_began: Default::default(),
            placing: tokio::sync::Mutex::new(()),
            stopped: Default::default(),
            #[cfg(test)]
            test_event: Default::default(),
        }))
    }

    /// Job ids are sent here whenever a job or one of its moves changes.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    fn changed(&self, job: &str) {
        let _ = self.changes.send(job.to_string());
    }

    /// Runs `f` on the store thread; the worker awaits, never blocks.
    async fn repo<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Repositories) -> RepoResult<R> + Send + 'static,
    ) -> RepoResult<R> {
        self.reg.repos().call(f).await
    }

    async fn owners(&self) -> Result<BTreeMap<String, Ownership>, RepoError> {
        Ok(self
            .repo(|r| r.ownership().owners())
            .await?
            .into_iter()
            .map(|o| {
                (
                    o.uuid.clone(),
                    Ownership {
                        host: o.host,
                        generation: o.generation,
                        from_host: o.from_host,
                        complete: o.complete,
                        job: o.job,
                    },
                )
            })
            .collect())
    }

    async fn power_reading(&self, host: &str) -> PowerReading {
        match self.fencers.get(host) {
            None => PowerReading::NoBmc,
            Some(f) => {
                let mut log = Vec::new();
                PowerReading::Bmc(f.power_state(&mut log).await)
            }
        }
    }

    /// The memory held by every unfinished job's moves under way, from the store.
    async fn reservations(&self) -> Result<Vec<plan::Reservation>, RepoError> {
        Ok(self
            .repo({
                let now = self.reg.now_ms();
                move |r| r.jobs().reservations(now)
            })
            .await?
            .into_iter()
            .map(|r| plan::Reservation {
                job: r.job_id,
                uuid: r.uuid,
                name: r.name,
                target: r.target,
                memory_kib: r.memory_kib,
            })
            .collect())
    }

    /// Memory reserved on each host by moves under way (KiB), those whose
    /// guest already runs there excepted: what `hosts show` reports.
    pub async fn reserved_by_host(&self) -> Result<BTreeMap<String, u64>, RepoError> {
        let reservations = self.reservations().await?;
        let mut targets: Vec<String> = reservations.iter().map(|r| r.target.clone()).collect();
        targets.sort();
        targets.dedup();
        let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
        let hosts = self.reg.host_views_for(&refs);
        Ok(plan::held_by_reservations(&reservations, &hosts)
            .into_iter()
            .map(|(t, held)| (t, held.iter().fold(0u64, |a, r| a.saturating_add(r.memory_kib))))
            .collect())
    }

    /// Gathers everything and makes a plan. No side effects besides reading
    /// the source's BMC and asking candidate targets which paths they see.
    pub async fn plan(&self, req: &MigrateRequest) -> Result<MigrationPlan, ControllerError> {
        Ok(self.gather_and_plan(req).await?.0)
    }

    /// The plan and what it was made from (the source's guests with their
    /// definitions, the ownership records), so a job starts from exactly that.
    async fn gather_and_plan(&self, req: &MigrateRequest) -> Result<(MigrationPlan, PlanInput), ControllerError> {
        let t0 = std::time::Instant::now();
        let mut hosts = self.reg.host_views_for(&[req.source.as_str()]);
        let t_views = t0.elapsed();
        // The source's guests with their definitions, from the database.
        let source_guests: Vec<_> = if hosts.iter().any(|h| h.id == req.source) {
            let source = req.source.clone();
            self.repo(move |r| r.guests().of_host(&source)).await?
        } else {
            Vec::new()
        };
        let owners = self.owners().await?;
        let reservations = self.reservations().await?;
        // A job row that does not read still blocks its own source (fail
        // closed, alarm `job-corrupt`), but not every other host's evacuation.
        let (active, corrupt) = self.repo(|r| r.jobs().active_checked()).await?;
        let active_job = active
            .into_iter()
            .find(|j| j.source == req.source)
            .map(|j| j.id)
            .or_else(|| corrupt.into_iter().find(|b| b.host == req.source || b.host.is_empty()).map(|b| b.key));
        let power = if hosts.iter().any(|h| h.id == req.source) {
            self.power_reading(&req.source).await
        } else {
            PowerReading::NoBmc
        };
        let mut paths: Vec<String> = source_guests.iter().flat_map(plan::guest_paths).collect();
        paths.sort();
        paths.dedup();
        let t_read = t0.elapsed();
        let mut visibility = BTreeMap::new();
        let cands = plan::visibility_hosts(req, &hosts, source_guests.len(), self.memory_reserve_kib);
        // Reservation targets too: a reserved guest its target reports
        // running is counted there once, by the inventory.
        let mut with_guests = cands.clone();
        with_guests.extend(reservations.iter().map(|r| r.target.clone()).filter(|t| !cands.contains(t)));
        with_guests.sort();
        with_guests.dedup();
        self.reg.fill_guests(&mut hosts, &with_guests);
        let checks = cands.iter().map(|h| {
            let kind = Kind::CheckPaths(CheckPaths { paths: paths.clone() });
            async move { (h.clone(), self.reg.call(h, kind, Duration::from_secs(10)).await) }
        });
        for (h, r) in futures::future::join_all(checks).await {
            let m: BTreeMap<String, plan::PathSeen> = match r {
                Ok(r) if r.ok => r.paths.into_iter().map(|p| (p.path.clone(), p.into())).collect(),
                Ok(r) => paths
                    .iter()
                    .map(|p| (p.clone(), plan::PathSeen::failed(format!("path check failed: {}", r.error))))
                    .collect(),
                Err(e) => paths
                    .iter()
                    .map(|p| (p.clone(), plan::PathSeen::failed(format!("path check failed: {e}"))))
                    .collect(),
            };
            visibility.insert(h, m);
        }
        let t_checks = t0.elapsed();
        let source_uuids: Vec<String> = source_guests.iter().map(|g| g.uuid.clone()).collect();
        let input = PlanInput {
            req: req.clone(),
            hosts,
            source_guests,
            owners,
            power,
            active_job,
            grace_ms: self.grace_ms,
            visibility,
            memory_reserve_kib: self.memory_reserve_kib,
            source_alarms: self.reg.active_alarms().into_iter().filter(|a| a.0 == req.source).map(|a| a.1).collect(),
            held_elsewhere: self.reg.held_elsewhere(&req.source, &source_uuids),
            // A guest blocked by a quarantined database row is moved by nobody.
            in_other_job: source_uuids
                .iter()
                .filter_map(|u| {
                    self.reg
                        .job_of(u)
                        .or_else(|| {
                            self.reg.is_quarantined(u).then(|| {
                                "the quarantine of one of its database rows (alarm row-quarantined)".to_string()
                            })
                        })
                        .map(|j| (u.clone(), j))
                })
                .collect(),
            reservations,
            desired_running: source_uuids
                .iter()
                // The guest's desired state, whichever host reported it (an
                // unfinished move's target may have).
                .filter(|u| self.reg.desired_of(u).is_some_and(|(_, d)| d == "running"))
                .cloned()
                .collect(),
        };
        let p = plan::plan(&input);
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        tracing::debug!(
            source = %req.source,
            took_ms = ms(t0.elapsed()),
            views_ms = ms(t_views),
            read_ms = ms(t_read - t_views),
            checks_ms = ms(t_checks - t_read),
            hosts_checked = input.visibility.len(),
            "planned"
        );
        Ok((p, input))
    }

    /// Starts a job for a reviewed plan: refuses (changing nothing) unless
    /// the plan is still executable and its id matches.
    pub async fn start(self: &Arc<Self>, req: MigrateRequest, operator: &str) -> Result<JobRecord, ControllerError> {
        if let Some(why) = self.reg.restore_hold() {
            return Err(ControllerError::Refused(format!(
                "no job starts now ({why}); nothing was changed: try again when it has passed"
            )));
        }
        // Until the job is written (or refused): a concurrent start plans
        // against this job's reservations, never the same free memory.
        let _placing = self.placing.lock().await;
        let (p, input) = self.gather_and_plan(&req).await?;
        if !p.executable {
            let what = format!("{} of {}", if req.planned_move { "move" } else { "forced migration" }, req.source);
            return Err(crate::error::refusal(&what, &p.preconditions));
        }
        if req.plan_id.is_empty() && !req.yes {
            return Err(ControllerError::Refused(format!(
                "no plan id given; review the plan (`lifeboat migrate --force --from {} --plan`) and pass --plan-id {} (or --yes)",
                req.source, p.plan_id
            )));
        }
        if !req.yes && req.plan_id != p.plan_id {
            return Err(ControllerError::Refused(format!(
                "the plan changed since it was made (reviewed {}, now {}); nothing was changed. Review the new plan: {}",
                req.plan_id, p.plan_id, p.summary
            )));
        }
        let now = self.reg.now_ms();
        let id = format!("mig-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let owners = input.owners;
        let guests: BTreeMap<String, lifeboat_proto::v1::Guest> =
            input.source_guests.into_iter().map(|g| (g.uuid.clone(), g)).collect();
        let mut moves = Vec::new();
        for gp in p.guests.iter().filter(|g| g.movable) {
            let Some(g) = guests.get(&gp.uuid) else {
                return Err(ControllerError::Refused(format!("guest {} vanished while planning; plan again", gp.name)));
            };
            let generation = match owners.get(&gp.uuid) {
                Some(o) if o.host == gp.target && !o.complete => o.generation,
                Some(o) => o.generation + 1,
                None => 1,
            };
            moves.push(MoveRow {
                job_id: id.clone(),
                uuid: gp.uuid.clone(),
                name: gp.name.clone(),
                source: req.source.clone(),
                target: gp.target.clone(),
                generation,
                state: MoveState::Pending,
                start: gp.start,
                definition_xml: g.definition_xml.clone(),
                error: String::new(),
                priority: gp.priority,
                updated_ms: now,
                memory_kib: gp.memory_kib,
            });
        }
        // The guests the plan cannot move are recorded with the job, in the
        // same transaction, so its outcome and report name each one.
        let left_behind: Vec<MoveRow> = p
            .guests
            .iter()
            .filter(|g| !g.movable && !already_elsewhere(owners.get(&g.uuid), &req.source))
            .map(|gp| not_moved_row(&id, &req.source, gp, now))
            .collect();
        let parallel = if req.parallel == 0 { DEFAULT_PARALLEL } else { req.parallel.min(64) };
        let job = JobRow {
            id: id.clone(),
            kind: if req.planned_move { JobKind::Move } else { JobKind::Migrate },
            source: req.source.clone(),
            state: JobState::Created,
            operator: operator.into(),
            plan_id: p.plan_id.clone(),
            power_evidence: PowerEvidence::from_wire(p.evidence).map_err(|e| {
                ControllerError::Refused(format!("the plan's power evidence does not read ({e}); nothing was changed"))
            })?,
            request: req.encode_to_vec(),
            parallel,
            created_ms: now,
            updated_ms: now,
            error: String::new(),
        };
        let detail = format!(
            "command: {}; plan {}{}; {} guest(s): {}; power evidence: {}{}",
            if req.command_line.is_empty() { "(not given)" } else { &req.command_line },
            p.plan_id,
            if req.yes { " (--yes: planned and carried out at once)" } else { "" },
            moves.len(),
            moves.iter().map(|m| format!("{} -> {}", m.name, m.target)).collect::<Vec<_>>().join(", "),
            p.power_evidence,
            if left_behind.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} left behind: {}",
                    left_behind.len(),
                    left_behind.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                )
            }
        );
        let (carried, left) = (moves.len(), left_behind.len());
        moves.extend(left_behind);
        let a = audit(operator, "migrate.requested", &req.source, "", &id, detail);
        let (stored_job, stored_moves) = (job.clone(), moves.clone());
        self.repo(move |r| r.jobs().create(&stored_job, &stored_moves, &a)).await?;
        // Only the guests the job carries: those left behind stay the reconciler's.
        self.reg.set_in_job(
            &id,
            &moves[..carried].iter().map(|m| (m.uuid.clone(), m.source.clone(), m.target.clone())).collect::<Vec<_>>(),
        );
        info!(job = %id, source = %req.source, operator, guests = carried, left_behind = left, "forced migration job created");
        let me = self.clone();
        let jid = id.clone();
        tokio::spawn(async move { me.run(jid).await });
        self.job_record(&id).await
    }

    /// Resumes every unfinished job (at controller start), after the startup
    /// grace: agents first reconnect and report, so that "the source is
    /// talking again" and "the step already took effect" are judged on what
    /// the hosts say now. An attested job re-checks that the source is silent.
    pub async fn resume_all(self: &Arc<Self>) -> Result<usize, RepoError> {
        let (jobs, bad) = self.repo(|r| r.jobs().active_checked()).await?;
        for b in &bad {
            let detail = format!(
                "job {} is not resumed: its row does not read ({}); its guests stay held by it. \
                 Repair or end the row in the database, restart the controller, then clear this alarm",
                b.key, b.reason
            );
            warn!(job = %b.key, "{detail}");
            // The job is not resumed either way; a database that cannot take
            // the alarm must not also keep the controller from starting.
            if let Err(e) = self.reg.raise_alarm(&b.host, "job-corrupt", &detail).await {
                error!(job = %b.key, "raising the job-corrupt alarm failed: {e}");
            }
        }
        let grace = Duration::from_millis(u64::try_from(self.reg.startup_grace_ms()).unwrap_or(0));
        for j in &jobs {
            info!(job = %j.id, state = %j.state, grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX), "resuming unfinished job after the startup grace");
            let me = self.clone();
            let (id, source, state) = (j.id.clone(), j.source.clone(), j.state);
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                // A restored database also waits until the hosts reported.
                while me.reg.hold(me.reg.now_ms()).is_some() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let detail = format!(
                    "resumed in state {state} after a {} ms startup grace for agents to reconnect",
                    grace.as_millis()
                );
                let a = audit("controller", "job.resumed", &source, "", &id, detail);
                let _ = me.repo(move |r| r.audit().append(&a)).await;
                me.run(id).await
            });
        }
        Ok(jobs.len())
    }

    /// A job and its moves, for the API.
    pub async fn job_record(&self, id: &str) -> Result<JobRecord, ControllerError> {
        let jid = id.to_string();
        let (job, moves) = self.repo(move |r| Ok((r.jobs().get(&jid)?, r.jobs().all_moves(&jid)?))).await?;
        let job =
            job.ok_or_else(|| ControllerError::NotFound(format!("unknown job '{id}' (see `lifeboat jobs list`)")))?;
        Ok(self.with_paused(to_record(job, moves)))
    }

    /// Jobs, newest first.
    pub async fn jobs(&self, host: Option<&str>, limit: u32) -> Result<Vec<JobRecord>, ControllerError> {
        let host = host.map(str::to_string);
        // One store call: the jobs and their moves read together.
        let rows = self
            .repo(move |r| {
                let jobs = r.jobs().list(host.as_deref(), limit)?;
                let mut out = Vec::with_capacity(jobs.len());
                for j in jobs {
                    let moves = r.jobs().all_moves(&j.id)?;
                    out.push((j, moves));
                }
                Ok(out)
            })
            .await?;
        Ok(rows.into_iter().map(|(j, moves)| self.with_paused(to_record(j, moves))).collect())
    }

    async fn set_job(&self, job: &JobRow, to: JobState, error: &str, a: Option<AuditRow>) -> Result<(), RepoError> {
        let from: JobState = job.state;
        if !from.valid_transition(to) {
            warn!(job = %job.id, %from, %to, "refusing an invalid job transition");
            return Ok(());
        }
        let (id, error) = (job.id.clone(), error.to_string());
        self.repo(move |r| r.jobs().set_state(&id, to, &error, a.as_ref())).await?;
        self.progressed(&job.id, &job.source).await;
        self.changed(&job.id);
        Ok(())
    }

    /// A job record with its pause (if any) filled in.
    fn with_paused(&self, mut r: JobRecord) -> JobRecord {
        if let Some(p) = self.paused.lock().unwrap_or_else(|p| p.into_inner()).get(&r.id) {
            r.paused = p.clone();
        }
        r
    }

    /// Carries a job out. A database error pauses it rather than ending it:
    /// every step is check-then-act and is written before it is carried
    /// out, so the job retries (with backoff) from what the database holds,
    /// and resumes by itself once a write succeeds again.
    ///
    /// A job is unpaused (audited `job.unpaused`, backoff reset) only once
    /// one of its writes succeeds: a record that cannot be used keeps it
    /// paused with a growing backoff and one `job-paused` alarm, instead of
    /// an audit entry per retry.
    async fn run(self: Arc<Self>, id: String) {
        let mut wait = PAUSE_RETRY_FIRST;
        let jid = id.clone();
        let source = self.repo(move |r| r.jobs().get(&jid)).await.ok().flatten().map(|j| j.source).unwrap_or_default();
        loop {
            match self.clone().run_inner(&id).await {
                // Ended: its guests are the reconciler's again.
                Ok(()) => {
                    self.progressed(&id, &source).await;
                    self.reg.clear_in_job(&id);
                    self.stopped.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    return;
                }
                Err(e) => {
                    let began = {
                        let mut b = self.pause_began.lock().unwrap_or_else(|p| p.into_inner());
                        match b.get(&id) {
                            Some(&(ms, _, _)) => ms,
                            None => {
                                // New pause (first, or after progress): start the backoff over.
                                let now = self.reg.now_ms();
                                b.insert(id.clone(), (now, std::time::Instant::now(), None));
                                wait = PAUSE_RETRY_FIRST;
                                now
                            }
                        }
                    };
                    self.pause(&id, began, &e);
                    let alarmed = self
                        .pause_began
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&id)
                        .is_some_and(|b| b.2.is_some());
                    if !alarmed && !is_write_error(&e) {
                        let detail = format!(
                            "job {id} is paused: a database record it needs cannot be used ({e}); it retries by itself \
                             every {} s at most; see the controller's log and `lifeboat jobs show {id}`",
                            PAUSE_RETRY_MAX.as_secs()
                        );
                        if let Err(ae) = self.reg.raise_alarm(&source, JOB_PAUSED, &detail).await {
                            warn!(job = %id, "raising the job-paused alarm failed: {ae}");
                        }
                        if let Some(b) = self.pause_began.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
                            b.2 = Some(detail);
                        }
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(PAUSE_RETRY_MAX);
                }
            }
        }
    }

    /// A write of the job succeeded: if it was paused, it is no longer,
    /// and the resume is audited (tried; a failure is only logged).
    async fn progressed(&self, id: &str, source: &str) {
        let Some((since_ms, t0, alarm)) = self.pause_began.lock().unwrap_or_else(|p| p.into_inner()).remove(id) else {
            return;
        };
        if let Some(detail) = alarm
            && let Err(e) = self
                .reg
                .clear_alarm_by_cause(source, JOB_PAUSED, &detail, &format!("job {id} made progress again"))
                .await
        {
            warn!(job = %id, "clearing the job-paused alarm failed: {e}");
        }
        let detail = format!(
            "database writes succeed again after {} s; the job resumes where its records say it stopped",
            t0.elapsed().as_secs()
        );
        let row = AuditRow { at_ms: self.reg.now_ms(), ..audit("controller", "job.unpaused", source, "", id, detail) };
        if let Err(e) = self.repo(move |r| r.audit().append(&row)).await {
            warn!(job = %id, "auditing the resume failed: {e}");
        }
        info!(job = %id, paused_since_ms = since_ms, "job resumes: its writes succeed again");
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.changed(id);
    }

    /// Records (in memory) that a job is paused on a database error, and
    /// tells its watchers.
    fn pause(&self, id: &str, since_ms: i64, e: &RepoError) {
        let why = paused_text(e, since_ms);
        let mut p = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if p.get(id) != Some(&why) {
            warn!(job = %id, "{why}");
            p.insert(id.to_string(), why);
            drop(p);
            self.changed(id);
        }
    }

    /// Refuses (a write failure: the job pauses, nothing is carried out)
    /// when this controller no longer leads; checked before every step and
    /// before a BMC power-off.
    fn leading(&self) -> Result<(), RepoError> {
        if self.reg.leads() {
            Ok(())
        } else {
            Err(RepoError::Backend {
                write_failure: true,
                source: "this controller no longer leads (etcd leadership lapsed or lost): no step is taken".into(),
            })
        }
    }

    async fn run_inner(self: Arc<Self>, id: &str) -> Result<(), RepoError> {
        loop {
            self.leading()?;
            let jid = id.to_string();
            let Some(job) = self.repo(move |r| r.jobs().get(&jid)).await? else { return Ok(()) };
            let state: JobState = job.state;
            if state.is_terminal() {
                return Ok(());
            }
            let kind = job.kind;
            match state {
                JobState::Created => {
                    let Some((to, _)) = self.job_step(&job, kind, state, JobEvent::Begin).await? else { return Ok(()) };
                    self.set_job(&job, to, "", None).await?;
                }
                JobState::Fencing => match self.fence(&job).await? {
                    Ok(()) => {
                        let Some((to, _)) = self.job_step(&job, kind, state, JobEvent::SourceOff).await? else {
                            return Ok(());
                        };
                        self.set_job(&job, to, "", None).await?
                    }
                    Err(why) => {
                        let Some((to, effects)) = self.job_step(&job, kind, state, JobEvent::FencingFailed).await?
                        else {
                            return Ok(());
                        };
                        // A planned move may have stopped some guests before
                        // it failed: those that should run wait to start
                        // again on the source.
                        let waiting = if effects.contains(&JobEffect::WaitStoppedOnSource) {
                            self.stopped_by_failed_move(&job).await?
                        } else {
                            Vec::new()
                        };
                        let names: Vec<&str> = waiting.iter().map(|w| w.name.as_str()).collect();
                        let msg = if names.is_empty() {
                            format!("{why}; no guest was defined anywhere")
                        } else {
                            format!(
                                "{why}; no guest was defined anywhere; stopped before the failure and waiting to start again on {}: {} (`lifeboat vms list`)",
                                job.source,
                                names.join(", ")
                            )
                        };
                        warn!(job = %id, "{msg}");
                        self.end_job(
                            &job,
                            to,
                            &msg,
                            audit("controller", audit_action(&effects), &job.source, "", id, msg.clone()),
                            &waiting,
                            &[],
                        )
                        .await?;
                    }
                },
                JobState::Moving => {
                    let jid = id.to_string();
                    let moves = self.repo(move |r| r.jobs().moves(&jid)).await?;
                    // A stop survives a restart: it is read back from the move
                    // it was written on, so a resumed job's other moves carry
                    // nothing further out either.
                    if let Some(m) = moves.iter().find(|m| m.state == MoveState::Failed && is_stop_error(&m.error)) {
                        self.stopped.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_string()).or_insert_with(
                            || format!("job stopped after {} met an invalid transition ({})", m.name, m.error),
                        );
                    }
                    let sem = Arc::new(Semaphore::new(job.parallel.max(1) as usize));
                    let tasks = moves.into_iter().map(|m| {
                        let me = self.clone();
                        let sem = sem.clone();
                        let operator = job.operator.clone();
                        let planned = job.kind == JobKind::Move;
                        async move {
                            let _permit = sem.acquire().await;
                            me.run_move(m, &operator, planned).await
                        }
                    });
                    for r in futures::future::join_all(tasks).await {
                        r?;
                    }
                    // Every row, the guests left behind at creation included.
                    let jid = id.to_string();
                    let moves = self.repo(move |r| r.jobs().all_moves(&jid)).await?;
                    let waiting = self.waiting_rows(&moves);
                    let outcomes: Vec<MoveOutcome<'_>> = moves
                        .iter()
                        .map(|m| MoveOutcome {
                            name: &m.name,
                            state: m.state,
                            error: &m.error,
                            target: &m.target,
                            waits: waiting.iter().any(|w| w.uuid == m.uuid),
                            unfinished: waiting
                                .iter()
                                .find(|w| w.uuid == m.uuid)
                                .and_then(crate::waiting::unfinished_target),
                        })
                        .collect();
                    let talking = job.kind == JobKind::Migrate && self.reg.is_reachable(&job.source);
                    let JobOutcome { state: ends, error: msg, detail, alarm } =
                        job_outcome(id, &job.source, job.kind == JobKind::Move, talking, &outcomes);
                    let Some((to, effects)) = self.job_step(&job, kind, state, JobEvent::ending(ends)).await? else {
                        return Ok(());
                    };
                    // Raised before the job ends: a crash in between resumes
                    // here, and the same alarm is not raised twice.
                    if let Some(a) = alarm.as_ref().filter(|_| effects.contains(&JobEffect::RaiseNotMovedAlarm)) {
                        self.reg.raise_alarm(&job.source, GUESTS_NOT_MOVED, a).await?;
                    }
                    if effects.contains(&JobEffect::ObserveRecovery)
                        && let Some(silent) = self.reg.host_view(&job.source).and_then(|h| h.silent_ms)
                    {
                        crate::telemetry::get().recovery_seconds.observe(silent as f64 / 1000.0);
                    }
                    info!(job = %id, "{detail}");
                    let moved: Vec<String> =
                        moves.iter().filter(|m| m.state.is_success()).map(|m| m.uuid.clone()).collect();
                    let a = audit("controller", audit_action(&effects), &job.source, "", id, detail);
                    self.end_job(&job, to, &msg, a, &waiting, &moved).await?;
                }
                JobState::Succeeded | JobState::Partial | JobState::Failed => return Ok(()),
            }
        }
    }

    /// The job's next state and effects for `event`, or `None` when the
    /// transition is invalid: then the job is stopped, never retried. The
    /// `job-invalid-transition` alarm is raised on its source and the job is
    /// written FAILED (every state a job steps from may end FAILED).
    async fn job_step(
        &self,
        job: &JobRow,
        kind: JobKind,
        state: JobState,
        event: JobEvent,
    ) -> Result<Option<(JobState, Vec<JobEffect>)>, RepoError> {
        let invalid = match job_step(kind, state, event) {
            Ok(r) => return Ok(Some(r)),
            Err(invalid) => invalid,
        };
        let detail = format!(
            "job {} stopped: it met {} in state {}, which a job does not allow; nothing further is carried out \
             (see `lifeboat jobs show {}` and the controller's log)",
            job.id, invalid.event, invalid.from, job.id
        );
        warn!(job = %job.id, from = invalid.from, event = invalid.event, "{detail}");
        self.reg.raise_alarm(&job.source, JOB_INVALID_TRANSITION, &detail).await?;
        if state.valid_transition(JobState::Failed) {
            let a = audit("controller", "job.failed", &job.source, "", &job.id, detail);
            Box::pin(self.set_job(job, JobState::Failed, &format!("stopped: {invalid}"), Some(a))).await?;
        }
        Ok(None)
    }

    /// The guests a finished job leaves waiting on its source. A source
    /// that talks and reports a guest running there (a planned move's guest
    /// not moved, untouched) has nothing to wait for; a silent source's
    /// last report proves nothing.
    fn waiting_rows(&self, moves: &[MoveRow]) -> Vec<WaitingRow> {
        let rows = crate::waiting::rows_for_job(
            moves,
            |u| self.reg.desired_of(u),
            |u| self.reg.owner_row(u),
            self.reg.now_ms(),
        );
        let uuids: Vec<String> = rows.iter().map(|w| w.uuid.clone()).collect();
        if uuids.is_empty() {
            return rows;
        }
        let holders = self.reg.holders(&uuids);
        rows.into_iter()
            .filter(|w| !(self.reg.is_reachable(&w.host) && holders.get(&w.uuid).is_some_and(|h| h.contains(&w.host))))
            .collect()
    }

    /// A planned move failed while stopping guests on its source: the moves
    /// that were to start a guest now reported shut off there (the stop got
    /// that far) leave it waiting there. Their moves stay PENDING.
    async fn stopped_by_failed_move(&self, job: &JobRow) -> Result<Vec<WaitingRow>, RepoError> {
        let jid = job.id.clone();
        let moves = self.repo(move |r| r.jobs().moves(&jid)).await?;
        let on_source = self.reg.list_guests(Some(&job.source), None, false).unwrap_or_default();
        let stopped = |uuid: &str| {
            on_source
                .iter()
                .filter_map(|r| r.guest.as_ref())
                .any(|g| g.uuid == uuid && !lifeboat_proto::holds_disk(g.state))
        };
        let failed: Vec<MoveRow> = moves
            .into_iter()
            .filter(|m| m.start && stopped(&m.uuid))
            .map(|m| MoveRow {
                state: MoveState::Failed,
                error: format!("stopped for planned move job {} that failed", job.id),
                ..m
            })
            .collect();
        Ok(self.waiting_rows(&failed))
    }

    /// Ends a job: the waiting guests' alarms first (a crash in between
    /// resumes the job, and raises nothing twice), then the job's state and
    /// its waiting guests in one transaction, then the alarms of the guests
    /// it moved, which no longer wait.
    async fn end_job(
        &self,
        job: &JobRow,
        to: JobState,
        error: &str,
        a: AuditRow,
        waiting: &[WaitingRow],
        moved: &[String],
    ) -> Result<(), RepoError> {
        let from: JobState = job.state;
        if !from.valid_transition(to) {
            warn!(job = %job.id, %from, %to, "refusing an invalid job transition");
            return Ok(());
        }
        let before = self.repo(|r| r.jobs().waiting()).await?;
        crate::waiting::raise(&self.reg, waiting, &before).await?;
        let (id, error, w, m) = (job.id.clone(), error.to_string(), waiting.to_vec(), moved.to_vec());
        self.repo(move |r| r.jobs().end_with_waiting(&id, to, &error, Some(&a), &w, &m)).await?;
        crate::waiting::clear_moved(&self.reg, &before, moved, &job.id).await?;
        for w in waiting {
            self.reg.touch(&w.host);
        }
        self.changed(&job.id);
        Ok(())
    }

    /// How long a start lease granted now lasts.
    pub fn lease_ttl_ms(&self) -> i64 {
        self.lease_ttl_ms
    }

    async fn audit_bmc(&self, job: &JobRow, events: &[FenceEvent]) -> Result<(), RepoError> {
        for e in events {
            let mut a = audit(
                "controller",
                "bmc.exchange",
                &job.source,
                "",
                &job.id,
                format!("request: {} | answer: {}", e.request, e.answer),
            );
            a.at_ms = e.at_ms;
            self.repo(move |r| r.audit().append(&a)).await?;
        }
        Ok(())
    }

    /// A planned move: the source's leases of the moving guests are revoked
    /// first (every other lease it holds is renewed as the reconciler would,
    /// stale copies owned elsewhere included in nothing), then its agent
    /// stops each guest and confirms it shut off. The guests were marked as
    /// in this job when it was created, so the reconciler neither renews
    /// their leases nor starts them meanwhile. Check-then-act: a stopped
    /// guest stays stopped, and a repeated revocation changes nothing.
    async fn stop_on_source(&self, job: &JobRow) -> Result<Result<(), String>, RepoError> {
        let jid = job.id.clone();
        let moves = self.repo(move |r| r.jobs().moves(&jid)).await?;
        for m in &moves {
            self.refuse_if_quarantined(m)?;
        }
        let keep: Vec<Lease> = self
            .reg
            .lease_set(&job.source)
            .into_iter()
            .map(|(uuid, name, generation)| Lease { uuid, name, generation })
            .collect();
        let now = self.reg.now_ms();
        let grant =
            GrantLeases { leases: keep, expires_unix_ms: now + self.lease_ttl_ms, merge: false, issued_unix_ms: now };
        match self.reg.call(&job.source, Kind::GrantLeases(grant), self.call_timeout).await {
            Ok(r) if r.ok => {}
            Ok(r) => {
                return Ok(Err(format!(
                    "revoking the moved guests' leases on {} failed: {}; nothing was stopped",
                    job.source, r.error
                )));
            }
            Err(e) => {
                return Ok(Err(format!(
                    "revoking the moved guests' leases on {} failed: {e}; nothing was stopped",
                    job.source
                )));
            }
        }
        for m in &moves {
            if let Some(why) = self.moved_on(m) {
                return Ok(Err(format!("{why}; nothing was stopped")));
            }
            match self.stop_confirmed(&job.source, m, &job.id).await {
                Ok(outcome) => {
                    let a = audit(
                        "controller",
                        "guest.stopped_for_move",
                        &job.source,
                        &m.name,
                        &job.id,
                        format!("{} stopped on {} ({outcome})", m.name, job.source),
                    );
                    self.repo(move |r| r.audit().append(&a)).await?;
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(()))
    }

    /// Refuses a step of a move whose guest has a database row in quarantine
    /// (its ownership is unknown, never generation 0 or "no owner"): a record
    /// the job cannot use, so the job pauses (`job-paused` alarm) and carries
    /// nothing out until the row is repaired and the controller restarted.
    fn refuse_if_quarantined(&self, m: &MoveRow) -> Result<(), RepoError> {
        if !self.reg.is_quarantined(&m.uuid) {
            return Ok(());
        }
        Err(RepoError::Corrupt(format!(
            "corrupt record in quarantine: {} ({})'s ownership record is quarantined (alarm row-quarantined): no lease, \
             start, define or stop for it until the row is repaired and the controller restarted; see docs/security.md",
            m.name, m.uuid
        )))
    }

    /// Why a move is history, if it is: the guest's ownership has moved past
    /// this move's generation since the job recorded it (a restored database
    /// resuming an old job), so acting on it would undo a later placement.
    fn moved_on(&self, m: &MoveRow) -> Option<String> {
        let now = self.reg.owner_generation(&m.uuid);
        (now > m.generation).then(|| {
            format!("{} is at ownership generation {now} now, newer than this move's {}: the job is older than its placement", m.name, m.generation)
        })
    }

    /// Asks the source's agent to stop a guest (check-then-act: "already"
    /// when it is shut off) and checks the answer says shut off.
    async fn stop_confirmed(&self, source: &str, m: &MoveRow, job: &str) -> Result<String, String> {
        let cmd = StopGuest { uuid: m.uuid.clone(), reason: format!("planned move to {} (job {job})", m.target) };
        match self.reg.call(source, Kind::StopGuest(cmd), self.call_timeout).await {
            Ok(r) if r.ok => match r.guest {
                Some(g) if lifeboat_proto::holds_disk(g.state) => {
                    Err(format!("{} on {source} still holds its disks after the stop (state {})", m.name, g.state))
                }
                _ => Ok(r.outcome),
            },
            Ok(r) => Err(format!("stopping {} on {source} failed: {}", m.name, r.error)),
            Err(e) => Err(format!("stopping {} on {source} failed: {e}", m.name)),
        }
    }

    /// Proves the source is off. Check-then-act: reads first, powers off
    /// only if it does not read Off.
    async fn fence(&self, job: &JobRow) -> Result<Result<(), String>, RepoError> {
        if job.kind == JobKind::Move {
            return self.stop_on_source(job).await;
        }
        if self.reg.is_reachable(&job.source) {
            return Ok(Err(format!("{} is talking to the controller again: a host that talks is alive", job.source)));
        }
        // A stored request that does not decode refuses: never a default.
        let req = match MigrateRequest::decode(&job.request[..]) {
            Ok(r) => r,
            Err(e) => {
                return Ok(Err(format!(
                    "job {}'s stored request does not decode ({e}); {} was not fenced: check the database \
                     (see `lifeboat jobs show {}`) and plan again",
                    job.id, job.source, job.id
                )));
            }
        };
        if job.power_evidence == PowerEvidence::Attestation {
            let a = audit(
                &job.operator,
                "power.attested",
                &job.source,
                "",
                &job.id,
                format!("operator {} attests {} is powered off: {}", job.operator, job.source, req.attest_reason),
            );
            self.repo(move |r| r.audit().append(&a)).await?;
            self.declare_offline(job).await?;
            return Ok(Ok(()));
        }
        let Some(f) = self.fencers.get(&job.source) else {
            return Ok(Err(format!("no BMC configured for {} any more", job.source)));
        };
        let mut log = Vec::new();
        let t = crate::telemetry::get();
        let name = |st: &PowerState| match st {
            PowerState::Off => "off",
            PowerState::On => "on",
            PowerState::Unknown(_) => "unknown",
        };
        let mut st = f.power_state(&mut log).await;
        t.fence("read", name(&st));
        if st != PowerState::Off && job.power_evidence == PowerEvidence::BmcFence {
            self.audit_bmc(job, &log).await?;
            log.clear();
            let a = audit(
                "controller",
                "bmc.power_off",
                &job.source,
                "",
                &job.id,
                format!("ForceOff requested; waiting up to {:?} for Off", f.off_timeout()),
            );
            self.repo(move |r| r.audit().append(&a)).await?;
            self.leading()?;
            let started = std::time::Instant::now();
            st = f.power_off(&mut log).await;
            t.fence_seconds.observe(started.elapsed().as_secs_f64());
            t.fence("power_off", name(&st));
        }
        self.audit_bmc(job, &log).await?;
        match st {
            PowerState::Off => {
                let a = audit(
                    "controller",
                    "power.confirmed_off",
                    &job.source,
                    "",
                    &job.id,
                    format!("{}'s BMC reads Off", job.source),
                );
                self.repo(move |r| r.audit().append(&a)).await?;
                self.declare_offline(job).await?;
                Ok(Ok(()))
            }
            PowerState::On => Ok(Err(format!("{}'s BMC still reads On: power-off not confirmed", job.source))),
            PowerState::Unknown(why) => {
                Ok(Err(format!("{}'s power state is UNKNOWN ({why}): power-off not confirmed", job.source)))
            }
        }
    }

    /// The source is proven off: record its boot id (to recognise a host
    /// that never powered off when it returns) and declare it OFFLINE.
    async fn declare_offline(&self, job: &JobRow) -> Result<(), RepoError> {
        self.reg.mark_fenced(&job.source).await?;
        if self.reg.status_of(&job.source) != Some(crate::domain::host::HostStatus::Offline) {
            let reason = format!("declared dead by forced migration job {}", job.id);
            if let Err(e) =
                self.reg.set_status(&job.source, crate::domain::host::HostStatus::Offline, &reason, "controller").await
            {
                warn!(host = %job.source, "setting OFFLINE failed: {e}");
            }
        }
        Ok(())
    }

    /// Sends a step to the target's agent. A session lost before the answer
    /// came (the agent was killed, or reconnected) fails the call at once;
    /// the step is sent again on the next session, until [`SESSION_WAIT`]
    /// has passed: every step is idempotent on the agent ("already").
    /// With `guard` (a start: the move and whether it is planned), the
    /// start's checks run again before every resend (see [`Engine::start_refusal`]).
    async fn call_target(
        &self,
        host: &str,
        kind: Kind,
        guard: Option<(&MoveRow, bool)>,
    ) -> Result<lifeboat_proto::v1::CommandResult, ControllerError> {
        let deadline = tokio::time::Instant::now() + SESSION_WAIT;
        let mut last = String::from("no agent session");
        let mut sent = false;
        loop {
            if self.reg.has_session(host) {
                // The world may have changed while the session was down: a
                // resent start meets the same checks as the first one.
                if sent
                    && let Some((m, planned)) = guard
                    && let Some(why) = self.start_refusal(m, planned).await
                {
                    return Err(ControllerError::Refused(format!(
                        "not sending the start again on {host}'s new session: {why}"
                    )));
                }
                sent = true;
                match self.reg.call(host, kind.clone(), self.call_timeout).await {
                    Err(ControllerError::AgentUnavailable(e)) => {
                        warn!(host, "{e}; the step is sent again on the agent's next session");
                        last = e;
                    }
                    r => return r,
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ControllerError::AgentUnavailable(format!(
                    "target {host} gave no answer on any agent session for {SESSION_WAIT:?} (last: {last})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Why a move must not (re)send its start now, if so: the checks the
    /// Starting step makes before its first start. The move's ownership has
    /// moved on; a planned move's source no longer confirms the guest shut
    /// off; a forced move's source talks to the controller again.
    async fn start_refusal(&self, m: &MoveRow, planned: bool) -> Option<String> {
        if let Some(why) = self.moved_on(m) {
            return Some(why);
        }
        if planned {
            return self.stop_confirmed(&m.source, m, &m.job_id).await.err();
        }
        self.reg.is_reachable(&m.source).then(|| format!("{} is talking to the controller again", m.source))
    }

    /// Whether the target reports the guest as this move left it after
    /// `step` (defined, or running), owned by the target at the move's
    /// generation: a step whose answer was lost may have taken effect.
    fn target_reports(&self, m: &MoveRow, running: bool) -> Option<lifeboat_proto::v1::Guest> {
        self.reg.reported_guest(&m.target, &m.uuid).filter(|g| {
            g.owner_host == m.target
                && g.owner_generation == m.generation
                && (!running || g.state == lifeboat_proto::v1::GuestState::Running as i32)
        })
    }

    async fn set_move(
        &self,
        m: &mut MoveRow,
        to: MoveState,
        error: &str,
        owner: Option<OwnerRow>,
        a: Option<AuditRow>,
    ) -> Result<(), RepoError> {
        let from: MoveState = m.state;
        if !from.valid_transition(to) {
            warn!(job = %m.job_id, guest = %m.name, %from, %to, "refusing an invalid move transition");
            return Ok(());
        }
        let (job, uuid, error, stored) = (m.job_id.clone(), m.uuid.clone(), error.to_string(), owner.clone());
        self.repo(move |r| r.jobs().set_move(&job, &uuid, to, &error, stored.as_ref(), a.as_ref())).await?;
        self.progressed(&m.job_id, &m.source).await;
        if owner.is_some() {
            self.reg.refresh_owners().await?;
        }
        m.state = to;
        self.changed(&m.job_id);
        Ok(())
    }

    /// Grants the target the guest's start lease (merged: revokes nothing),
    /// then starts it: the target's start guard refuses a managed guest
    /// without a lease.
    async fn lease_then_start(
        &self,
        m: &MoveRow,
        planned: bool,
    ) -> Result<lifeboat_proto::v1::CommandResult, ControllerError> {
        let grant = crate::domain::policy::merged_lease_at(
            &m.uuid,
            &m.name,
            m.generation,
            self.lease_ttl_ms,
            self.reg.now_ms(),
        );
        let r = self.call_target(&m.target, Kind::GrantLeases(grant), Some((m, planned))).await?;
        if !r.ok {
            return Ok(r);
        }
        self.call_target(&m.target, Kind::StartGuest(StartGuest { uuid: m.uuid.clone() }), Some((m, planned))).await
    }

    fn owner(&self, m: &MoveRow, complete: bool) -> OwnerRow {
        OwnerRow {
            uuid: m.uuid.clone(),
            host: m.target.clone(),
            generation: m.generation,
            from_host: m.source.clone(),
            job: m.job_id.clone(),
            complete,
        }
    }

    /// Carries a move out: the action its state owes is carried out and
    /// observed, [`step`] decides the next state and effects, the new state
    /// and its record effects are written in one transaction, and only then is
    /// the next action carried out. A transition the move's state machine
    /// does not allow stops the job (see [`Engine::stop_on_invalid`]).
    async fn run_move(&self, mut m: MoveRow, operator: &str, planned: bool) -> Result<(), RepoError> {
        let _ = operator;
        let kind = if planned { JobKind::Move } else { JobKind::Migrate };
        let mut owed = m.state.owed(kind);
        while let Some(action) = owed {
            let state: MoveState = m.state;
            self.refuse_if_quarantined(&m)?;
            self.leading()?;
            if action == MoveEffect::UndefineOnSource {
                return self.undefine_on_source(&m).await;
            }
            let (event, text) = match self.stopped_job(&m.job_id) {
                Some(why) => (MoveEvent::JobStopped, format!("not carried on: {why}")),
                None => self.observe(&m, action, planned).await,
            };
            #[cfg(test)]
            let event = self.test_event.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or(event);
            match step(kind, state, event) {
                Ok((to, effects)) => {
                    self.apply_move(&mut m, to, &effects, &text).await?;
                    owed = effects.into_iter().rfind(|e| e.is_action());
                }
                Err(invalid) => return self.stop_on_invalid(&mut m, invalid).await,
            }
        }
        Ok(())
    }

    /// Carries out a move's action (checks included) and says what came of it,
    /// with the text that explains it (audit detail, or the move's error).
    async fn observe(&self, m: &MoveRow, action: MoveEffect, planned: bool) -> (MoveEvent, String) {
        match action {
            MoveEffect::CheckSource => {
                if !planned && self.reg.is_reachable(&m.source) {
                    let msg =
                        format!("{} is talking to the controller again; not defining {} elsewhere", m.source, m.name);
                    return (MoveEvent::SourceTalks, msg);
                }
                let detail =
                    format!("{} ({}) {} -> {}, generation {}", m.name, m.uuid, m.source, m.target, m.generation);
                (MoveEvent::SourceSilent, detail)
            }
            MoveEffect::SendDefine => {
                let kind = Kind::DefineGuest(DefineGuest {
                    definition_xml: m.definition_xml.clone(),
                    owner_host: m.target.clone(),
                    generation: m.generation,
                });
                match self.call_target(&m.target, kind, None).await {
                    Ok(r) if r.ok => {
                        let detail = format!(
                            "defined {} ({}) on {} ({}), autostart off, owner generation {}",
                            m.name, m.uuid, m.target, r.outcome, m.generation
                        );
                        (MoveEvent::Defined, detail)
                    }
                    Ok(r) => (MoveEvent::DefineFailed, format!("define on {} failed: {}", m.target, r.error)),
                    Err(e) if self.target_reports(m, false).is_some() => {
                        let detail = format!(
                            "defined {} ({}) on {}: the answer was lost ({e}) but {} reports it defined at owner generation {}",
                            m.name, m.uuid, m.target, m.target, m.generation
                        );
                        (MoveEvent::Defined, detail)
                    }
                    Err(e) => (MoveEvent::DefineFailed, format!("define on {} failed: {e}", m.target)),
                }
            }
            MoveEffect::ChooseStart if m.start => (MoveEvent::StartWanted, String::new()),
            MoveEffect::ChooseStart => {
                (MoveEvent::NoStartWanted, format!("{} left defined and stopped on {}", m.name, m.target))
            }
            MoveEffect::SendStart => self.checked_start(m, planned).await,
            // Record effects and the source's undefine are never observed here.
            MoveEffect::RecordOwner
            | MoveEffect::CompleteOwner
            | MoveEffect::RecordError
            | MoveEffect::Audit(_)
            | MoveEffect::UndefineOnSource => {
                (MoveEvent::JobStopped, format!("not carried on: {action:?} is no action a move carries out"))
            }
        }
    }

    /// The start: its checks first (ownership moved on; already running on
    /// the target; a planned move's source still confirms the guest shut off;
    /// a forced move's source is still silent), then the lease and the start.
    async fn checked_start(&self, m: &MoveRow, planned: bool) -> (MoveEvent, String) {
        if let Some(why) = self.moved_on(m) {
            return (MoveEvent::StartRefused, format!("not starting {} on {}: {why}", m.name, m.target));
        }
        // A job resumed after its start took effect (the RUNNING write
        // failed, or the controller stopped) finds it running there at this
        // move's generation: that is this move's copy.
        if self.target_reports(m, true).is_some() {
            let detail = format!(
                "{} ({}) running on {}: {} reports it running at owner generation {} (started before this job resumed)",
                m.name, m.uuid, m.target, m.target, m.generation
            );
            return (MoveEvent::Started, detail);
        }
        if planned && let Err(e) = self.stop_confirmed(&m.source, m, &m.job_id).await {
            // The source is read again right before the start: a copy
            // started there since the stop must not meet a second one.
            return (MoveEvent::StartRefused, format!("not starting {} on {}: {e}", m.name, m.target));
        }
        if !planned && self.reg.is_reachable(&m.source) {
            let msg =
                format!("{} is talking to the controller again; not starting {} on {}", m.source, m.name, m.target);
            return (MoveEvent::SourceTalks, msg);
        }
        match self.lease_then_start(m, planned).await {
            Ok(r) if r.ok => {
                (MoveEvent::Started, format!("{} ({}) running on {} ({})", m.name, m.uuid, m.target, r.outcome))
            }
            // Before a start is called failed, the target is read again: a
            // start whose answer was lost (or that failed after qemu came up)
            // may have taken effect.
            Ok(r) if self.target_reports(m, true).is_some() => {
                let detail = format!(
                    "{} ({}) running on {}: the start answered '{}' but {} reports it running at owner generation {}",
                    m.name, m.uuid, m.target, r.error, m.target, m.generation
                );
                (MoveEvent::Started, detail)
            }
            Err(e) if self.target_reports(m, true).is_some() => {
                let detail = format!(
                    "{} ({}) running on {}: the start's answer was lost ({e}) but {} reports it running at owner generation {}",
                    m.name, m.uuid, m.target, m.target, m.generation
                );
                (MoveEvent::Started, detail)
            }
            Ok(r) => (MoveEvent::StartFailed, format!("start on {} failed: {}", m.target, r.error)),
            Err(e) => (MoveEvent::StartFailed, format!("start on {} failed: {e}", m.target)),
        }
    }

    /// Writes a move's new state with its record effects (owner, error,
    /// audit) in one transaction, before any action of the step is carried out.
    async fn apply_move(
        &self,
        m: &mut MoveRow,
        to: MoveState,
        effects: &[MoveEffect],
        text: &str,
    ) -> Result<(), RepoError> {
        let mut owner = None;
        let mut error = "";
        let mut a = None;
        for e in effects {
            match *e {
                MoveEffect::RecordOwner => owner = Some(self.owner(m, false)),
                MoveEffect::CompleteOwner => owner = Some(self.owner(m, true)),
                MoveEffect::RecordError => error = text,
                MoveEffect::Audit(action) => a = Some(audit("controller", action, &m.target, &m.name, &m.job_id, text)),
                MoveEffect::CheckSource
                | MoveEffect::SendDefine
                | MoveEffect::ChooseStart
                | MoveEffect::SendStart
                | MoveEffect::UndefineOnSource => {}
            }
        }
        self.set_move(m, to, error, owner, a).await
    }

    /// A planned move ended well: its source is alive, so the now stale
    /// definition there is removed right away (storage untouched).
    async fn undefine_on_source(&self, m: &MoveRow) -> Result<(), RepoError> {
        let cmd = CleanupGuest { uuid: m.uuid.clone(), name: m.name.clone(), destroy_running: false };
        let detail = match self.reg.call(&m.source, Kind::CleanupGuest(cmd), self.call_timeout).await {
            Ok(r) if r.ok => {
                format!("undefined {} on {} ({}); storage untouched", m.name, m.source, r.outcome)
            }
            Ok(r) => format!(
                "undefining {} on {} failed: {}; run `lifeboat cleanup {} --yes`",
                m.name, m.source, r.error, m.source
            ),
            Err(e) => {
                format!("undefining {} on {} failed: {e}; run `lifeboat cleanup {} --yes`", m.name, m.source, m.source)
            }
        };
        let ok = detail.starts_with("undefined");
        let row = audit(
            "controller",
            if ok { "cleanup.removed" } else { "cleanup.failed" },
            &m.source,
            &m.name,
            &m.job_id,
            detail.clone(),
        );
        if ok {
            let (job, uuid) = (m.job_id.clone(), m.uuid.clone());
            self.repo(move |r| r.jobs().mark_cleaned(&job, &uuid, &row)).await?;
        } else {
            self.repo(move |r| r.audit().append(&row)).await?;
        }
        Ok(())
    }

    /// Why a job was stopped, if it was: its other moves carry nothing further out.
    fn stopped_job(&self, job: &str) -> Option<String> {
        self.stopped.lock().unwrap_or_else(|p| p.into_inner()).get(job).cloned()
    }

    /// A move met an event its state does not allow: a bug or a record
    /// nobody expected, never something to retry. The job is stopped: the
    /// `job-invalid-transition` alarm is raised on the source (before the
    /// write, like every alarm of a job: raising it again changes nothing),
    /// the move is written FAILED with the transition as its error, and the
    /// job's other moves carry nothing further out. The job then ends as
    /// its moves say: FAILED, or PARTIAL when some guests had already moved
    /// (those moves happened; calling the job FAILED would hide them).
    async fn stop_on_invalid(&self, m: &mut MoveRow, invalid: InvalidTransition) -> Result<(), RepoError> {
        let detail = format!(
            "job {} stopped: guest {} ({}) met {} in state {}, which its move does not allow; nothing further is \
             carried out for the job (see `lifeboat jobs show {}` and the controller's log)",
            m.job_id, m.name, m.uuid, invalid.event, invalid.from, m.job_id
        );
        warn!(job = %m.job_id, guest = %m.name, from = invalid.from, event = invalid.event, "{detail}");
        self.reg.raise_alarm(&m.source, JOB_INVALID_TRANSITION, &detail).await?;
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(m.job_id.clone())
            .or_insert_with(|| format!("job stopped after {} met an invalid transition ({invalid})", m.name));
        let from: MoveState = m.state;
        if from.valid_transition(MoveState::Failed) {
            let msg = format!("{STOP_ERROR_PREFIX}{invalid}");
            let a = audit("controller", AUDIT_MOVE_FAILED, &m.target, &m.name, &m.job_id, detail);
            self.set_move(m, MoveState::Failed, &msg, None, Some(a)).await?;
        }
        Ok(())
    }
}

/// How the error of the move an invalid transition stopped begins.
const STOP_ERROR_PREFIX: &str = "stopped: ";

/// Whether a move's stored error is the one [`Engine::stop_on_invalid`]
/// writes (the stop of its whole job).
fn is_stop_error(error: &str) -> bool {
    error.strip_prefix(STOP_ERROR_PREFIX).is_some_and(|rest| rest.starts_with("invalid transition: "))
}

/// The audit action a step's effects name (every job end names one).
fn audit_action(effects: &[JobEffect]) -> &'static str {
    effects
        .iter()
        .find_map(|e| match e {
            JobEffect::Audit(a) => Some(*a),
            _ => None,
        })
        .unwrap_or("job.ended")
}

/// Alarm kind: a job is paused on a database record it cannot use.
pub const JOB_PAUSED: &str = "job-paused";

/// Whether a store error is SQLite refusing or failing a statement (full
/// disk, read-only, I/O, locked): it passes when the database can be
/// written again. Anything else is a record that cannot be used.
fn is_write_error(e: &RepoError) -> bool {
    e.is_write_failure()
}

/// What `jobs show` says of a job paused on a database error.
fn paused_text(e: &RepoError, since_ms: i64) -> String {
    let since = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{since_ms} ms since the epoch"));
    match e {
        e if is_write_error(e) => format!(
            "paused since {since}: the controller's database cannot be written ({e}); the job retries by itself and \
             resumes when writes succeed (free space on the database's filesystem: see docs/operations.md, \"Disk full\")"
        ),
        // A record that cannot be used is no disk problem: say so, and keep retrying (refusing, never guessing).
        _ => format!(
            "paused since {since}: a database record the job needs cannot be used ({e}); the job retries by itself; \
             see the controller's log and docs/operations.md, \"Disk full\""
        ),
    }
}

fn to_record(j: JobRow, moves: Vec<MoveRow>) -> JobRecord {
    JobRecord {
        id: j.id,
        kind: j.kind.as_str().into(),
        source: j.source,
        state: j.state.as_str().into(),
        operator: j.operator,
        plan_id: j.plan_id,
        created_unix_ms: j.created_ms,
        updated_unix_ms: j.updated_ms,
        error: j.error,
        power_evidence: j.power_evidence.as_str().into(),
        parallel: j.parallel,
        paused: String::new(),
        job_state: j.state.to_wire() as i32,
        job_kind: j.kind.to_wire() as i32,
        evidence: j.power_evidence.to_wire() as i32,
        moves: moves
            .into_iter()
            .map(|m| MoveRecord {
                uuid: m.uuid,
                name: m.name,
                source: m.source,
                target: m.target,
                generation: m.generation,
                state: m.state.as_str().into(),
                error: m.error,
                updated_unix_ms: m.updated_ms,
                start: m.start,
                move_state: m.state.to_wire() as i32,
            })
            .collect(),
    }
}

/// Whether a guest the plan does not move already belongs elsewhere (moved
/// by an earlier job): such a guest is not left behind. The planner's rule
/// for "already moved": owned by another host, and either that move
/// completed or it did not come from this source.
fn already_elsewhere(owner: Option<&Ownership>, source: &str) -> bool {
    owner.is_some_and(|o| o.host != source && (o.complete || o.from_host != source))
}

/// Most failed checks quoted in a left-behind guest's reason.
const REASON_CHECKS: usize = 8;

/// The row recording a guest the plan cannot move: NOT_MOVED from the
/// start, with the plan's reason and its failed checks; no definition (it
/// is never defined anywhere) and no generation (no ownership changes).
fn not_moved_row(job: &str, source: &str, gp: &lifeboat_proto::v1::GuestPlan, now: i64) -> MoveRow {
    let failed: Vec<String> = gp.checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    let mut error = if gp.reason.is_empty() { "the plan could not move it".to_string() } else { gp.reason.clone() };
    if !failed.is_empty() {
        let more = failed.len().saturating_sub(REASON_CHECKS);
        error = format!(
            "{error}; failed checks: {}",
            failed.into_iter().take(REASON_CHECKS).collect::<Vec<_>>().join("; ")
        );
        if more > 0 {
            error.push_str(&format!("; and {more} more"));
        }
    }
    MoveRow {
        job_id: job.into(),
        uuid: gp.uuid.clone(),
        name: gp.name.clone(),
        source: source.into(),
        target: gp.target.clone(),
        generation: 0,
        state: MoveState::NotMoved,
        start: gp.start,
        definition_xml: String::new(),
        error,
        priority: gp.priority,
        updated_ms: now,
        // It reserves nothing; an agent's overflowing figure must not stop
        // the job that records it from being written.
        memory_kib: gp.memory_kib.min(i64::MAX.unsigned_abs()),
    }
}

impl Engine {
    /// Memory kept free on every host (KiB), from the configuration: what
    /// operators' own starts (`vms restore --start`) leave free too.
    pub fn memory_reserve_kib(&self) -> u64 {
        self.memory_reserve_kib
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_proto::v1::{Check, GuestPlan};

    fn new_engine() -> (Arc<Registry>, Arc<Engine>) {
        let repos = crate::store::sqlite::SqliteRepos::start_in_memory().unwrap();
        let reg = Arc::new(Registry::load(repos, crate::domain::host::Timing::default()).unwrap());
        let engine = Engine::new(reg.clone(), &BTreeMap::new(), 0, 0, 60_000).unwrap();
        (reg, engine)
    }

    /// [`new_engine`] over a database file, which a test edits by hand with
    /// its own connection (a corrupt value, a repaired row).
    fn new_engine_on_file() -> (tempfile::TempDir, rusqlite::Connection, Arc<Registry>, Arc<Engine>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let repos = crate::store::sqlite::SqliteRepos::start(&path).unwrap();
        let reg = Arc::new(Registry::load(repos, crate::domain::host::Timing::default()).unwrap());
        let engine = Engine::new(reg.clone(), &BTreeMap::new(), 0, 0, 60_000).unwrap();
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.busy_timeout(Duration::from_secs(10)).unwrap();
        (dir, raw, reg, engine)
    }

    fn job_row(id: &str, kind: &str, source: &str) -> JobRow {
        JobRow {
            id: id.into(),
            kind: kind.parse().unwrap(),
            source: source.into(),
            state: JobState::Created,
            operator: "olga".into(),
            plan_id: "p".into(),
            power_evidence: PowerEvidence::Attestation,
            request: MigrateRequest { source: source.into(), attest_reason: "unplugged".into(), ..Default::default() }
                .encode_to_vec(),
            parallel: 1,
            created_ms: 1,
            updated_ms: 1,
            error: String::new(),
        }
    }

    async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        for _ in 0..200 {
            if let Some(t) = f() {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn a_job_pauses_on_a_database_write_error_shows_why_and_resumes_by_itself() {
        let (reg, engine) = new_engine();
        reg.repos()
            .call_blocking(|r| {
                r.jobs().create(
                    &job_row("mig-p", "migrate", "host-a"),
                    &[],
                    &audit("olga", "migrate.requested", "host-a", "", "mig-p", ""),
                )
            })
            .unwrap();
        // SQLite refuses every write, as on a full disk.
        reg.repos().call_blocking(move |r| r.maintenance().set_read_only(true)).unwrap();
        let mut changes = engine.subscribe();
        tokio::spawn(engine.clone().run("mig-p".into()));
        let paused = until("the pause", || {
            Some(futures::executor::block_on(engine.job_record("mig-p")).unwrap().paused).filter(|p| !p.is_empty())
        })
        .await;
        assert!(paused.starts_with("paused since 20"), "{paused}");
        assert!(paused.contains("cannot be written") && paused.contains("readonly"), "{paused}");
        assert_eq!(changes.try_recv().unwrap(), "mig-p", "watchers are told of the pause");
        let r = futures::executor::block_on(engine.job_record("mig-p")).unwrap();
        assert_eq!(r.state.as_str(), "CREATED", "nothing moved while paused");
        assert_eq!(
            futures::executor::block_on(engine.jobs(None, 10)).unwrap()[0].paused,
            paused,
            "the list shows it too"
        );
        // A second retry keeps the first time it paused.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(futures::executor::block_on(engine.job_record("mig-p")).unwrap().paused, paused);

        reg.repos().call_blocking(move |r| r.maintenance().set_read_only(false)).unwrap();
        let r = until("the job's end", || {
            Some(futures::executor::block_on(engine.job_record("mig-p")).unwrap())
                .filter(|r| r.state.parse::<JobState>().is_ok_and(|s| s.is_terminal()))
        })
        .await;
        assert_eq!(r.paused, "", "no longer paused");
        let log = reg
            .repos()
            .call_blocking(|r| {
                r.audit().read(&crate::ports::AuditFilter {
                    job: Some("mig-p".into()),
                    limit: Some(100),
                    ..Default::default()
                })
            })
            .unwrap();
        let unpaused: Vec<_> = log.iter().filter(|a| a.action == "job.unpaused").collect();
        assert_eq!(unpaused.len(), 1, "{log:?}");
        assert!(unpaused[0].detail.contains("database writes succeed again"), "{}", unpaused[0].detail);
        assert_eq!(unpaused[0].host, "host-a", "found with `lifeboat log --host`");
        assert!(log.iter().any(|a| a.action == "power.attested"), "the job carried on from where it stopped: {log:?}");
    }

    #[tokio::test]
    async fn a_controller_that_no_longer_leads_takes_no_job_step() {
        let (reg, engine) = new_engine();
        reg.repos()
            .call_blocking(|r| {
                r.jobs().create(
                    &job_row("mig-l", "migrate", "host-a"),
                    &[],
                    &audit("olga", "migrate.requested", "host-a", "", "mig-l", ""),
                )
            })
            .unwrap();
        let l = Arc::new(crate::ha::Leadership::new(
            b"k".to_vec(),
            5,
            Duration::from_secs(60),
            tokio::time::Instant::now(),
        ));
        reg.set_leadership(l.clone());
        l.lose("lease expired");
        tokio::spawn(engine.clone().run("mig-l".into()));
        let paused = until("the pause", || {
            Some(futures::executor::block_on(engine.job_record("mig-l")).unwrap().paused).filter(|p| !p.is_empty())
        })
        .await;
        assert!(paused.contains("no longer leads"), "{paused}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = futures::executor::block_on(engine.job_record("mig-l")).unwrap();
        assert_eq!(r.state.as_str(), "CREATED", "no step taken");
        let log = reg
            .repos()
            .call_blocking(|r| {
                r.audit().read(&crate::ports::AuditFilter {
                    job: Some("mig-l".into()),
                    limit: Some(100),
                    ..Default::default()
                })
            })
            .unwrap();
        assert!(!log.iter().any(|a| a.action == "power.attested"), "{log:?}");
    }

    #[tokio::test]
    async fn a_job_paused_on_a_record_it_cannot_use_backs_off_alarms_once_and_writes_no_resume_per_retry() {
        let (_dir, raw, reg, engine) = new_engine_on_file();
        let mut row = job_row("mig-c", "migrate", "host-a");
        row.state = JobState::Moving;
        reg.repos()
            .call_blocking(move |r| {
                r.jobs().create(&row, &[starting_move("mig-c")], &audit("olga", "x", "host-a", "", "mig-c", ""))
            })
            .unwrap();
        raw.execute("UPDATE moves SET memory_kib = -5 WHERE job_id = 'mig-c'", []).unwrap();
        tokio::spawn(engine.clone().run("mig-c".into()));
        // `jobs show` cannot read the job either; the pause is kept for it.
        let paused = until("the pause", || engine.paused.lock().unwrap().get("mig-c").cloned()).await;
        assert!(paused.contains("cannot be used"), "{paused}");
        // Retries at 0.5, 1.5, 3.5 s: three of them, no resume among them.
        tokio::time::sleep(Duration::from_millis(4000)).await;
        let log = reg
            .repos()
            .call_blocking(move |r| {
                r.audit().read(&crate::ports::AuditFilter { limit: Some(1000), ..Default::default() })
            })
            .unwrap();
        let unpaused = log.iter().filter(|a| a.action == "job.unpaused").count();
        assert_eq!(unpaused, 0, "nothing resumed: {log:?}");
        let alarms: Vec<_> = log.iter().filter(|a| a.action == "alarm.job-paused").collect();
        assert_eq!(alarms.len(), 1, "one alarm: {log:?}");
        assert_eq!(alarms[0].host, "host-a");
        assert!(
            alarms[0].detail.contains("mig-c") && alarms[0].detail.contains("out of range"),
            "{}",
            alarms[0].detail
        );
        assert_eq!(
            reg.repos().call_blocking(move |r| r.jobs().get("mig-c")).unwrap().unwrap().state.as_str(),
            "MOVING"
        );
        assert!(engine.paused.lock().unwrap().contains_key("mig-c"), "still paused");

        // The row is repaired (here: the move had failed): the job ends, the
        // resume is audited once and the alarm is cleared by its cause.
        raw.execute(
            "UPDATE moves SET memory_kib = 1, state = 'FAILED', error = 'start failed' WHERE job_id = 'mig-c'",
            [],
        )
        .unwrap();
        until("the job's end", || {
            reg.repos().call_blocking(move |r| r.jobs().get("mig-c")).unwrap().filter(|j| j.state != JobState::Moving)
        })
        .await;
        // The pause is dropped from memory last (after the alarm and the
        // audit entry), and may come just after the job's end is written.
        until("the pause to end", || (!engine.paused.lock().unwrap().contains_key("mig-c")).then_some(())).await;
        let log = reg
            .repos()
            .call_blocking(move |r| {
                r.audit().read(&crate::ports::AuditFilter { limit: Some(1000), ..Default::default() })
            })
            .unwrap();
        assert_eq!(log.iter().filter(|a| a.action == "job.unpaused").count(), 1, "{log:?}");
        assert!(!reg.active_alarms().iter().any(|a| a.1 == JOB_PAUSED), "{:?}", reg.active_alarms());
    }

    /// A fake target agent: answers each command with `answer`, or (when it
    /// returns `None`) drops the session unanswered, as a killed agent's does.
    async fn fake_agent(
        reg: Arc<Registry>,
        host: &str,
        guests: Vec<lifeboat_proto::v1::Guest>,
        mut answer: impl FnMut(&Kind) -> Option<lifeboat_proto::v1::CommandResult> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        use lifeboat_proto::v1::{Inventory, controller_message};
        let host = host.to_string();
        tokio::spawn(async move {
            loop {
                let (tx, mut rx) = tokio::sync::mpsc::channel(16);
                let sid = reg.open_session(&host, "boot", tx).unwrap();
                let info = lifeboat_proto::v1::HostInfo { host_id: host.clone(), ..Default::default() };
                reg.apply_inventory(&host, sid, Inventory { host: Some(info), guests: guests.clone(), more: false })
                    .unwrap();
                let Some(heard) = reg.heard_cell(&host, sid) else { return };
                heard.store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
                loop {
                    let Some(m) = rx.recv().await else { return };
                    let Some(controller_message::Msg::Command(c)) = m.msg else { continue };
                    let kind = c.kind.unwrap();
                    match answer(&kind) {
                        Some(mut r) => {
                            r.id = c.id;
                            reg.complete(r);
                        }
                        None => {
                            reg.close_session(&host, sid);
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            break;
                        }
                    }
                }
            }
        })
    }

    /// Writes a forced-migration job of host-a carrying the one move `m`.
    fn record_job(reg: &Registry, id: &str, m: &MoveRow) {
        let (row, m) = (job_row(id, "migrate", "host-a"), m.clone());
        let a = audit("olga", "x", "", "", id, "");
        reg.repos().call_blocking(move |r| r.jobs().create(&row, std::slice::from_ref(&m), &a)).unwrap();
    }

    fn starting_move(job: &str) -> MoveRow {
        MoveRow {
            job_id: job.into(),
            uuid: "11111111-0000-4000-8000-000000000001".into(),
            name: "vm-1".into(),
            source: "host-a".into(),
            target: "host-b".into(),
            generation: 3,
            state: MoveState::Starting,
            start: true,
            definition_xml: String::new(),
            error: String::new(),
            priority: 0,
            updated_ms: 1,
            memory_kib: 32 * 1024,
        }
    }

    fn running_there(m: &MoveRow) -> lifeboat_proto::v1::Guest {
        lifeboat_proto::v1::Guest {
            uuid: m.uuid.clone(),
            name: m.name.clone(),
            state: lifeboat_proto::v1::GuestState::Running as i32,
            owner_host: m.target.clone(),
            owner_generation: m.generation,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_start_whose_session_was_lost_is_sent_again_on_the_next_session_and_is_running() {
        let (reg, engine) = new_engine();
        let m = starting_move("mig-s");
        record_job(&reg, "mig-s", &m);
        let g = running_there(&m);
        let mut starts = 0;
        let answered = g.clone();
        let _agent = fake_agent(reg.clone(), "host-b", vec![g.clone()], move |k| match k {
            Kind::GrantLeases(_) => {
                Some(lifeboat_proto::v1::CommandResult { ok: true, outcome: "done".into(), ..Default::default() })
            }
            Kind::StartGuest(_) => {
                starts += 1;
                // The first start's answer is lost with its session.
                (starts > 1).then(|| lifeboat_proto::v1::CommandResult {
                    ok: true,
                    outcome: "already".into(),
                    guest: Some(answered.clone()),
                    ..Default::default()
                })
            }
            _ => None,
        })
        .await;
        until("the target's session", || reg.has_session("host-b").then_some(())).await;
        let t0 = std::time::Instant::now();
        engine.run_move(m, "olga", false).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(t0.elapsed() < Duration::from_secs(5), "no stall: {:?}", t0.elapsed());
        let row = reg.repos().call_blocking(move |r| r.jobs().moves("mig-s")).unwrap().remove(0);
        assert_eq!((row.state.as_str(), row.error.as_str()), ("RUNNING", ""));
    }

    #[tokio::test]
    async fn a_start_that_reads_failed_while_the_target_reports_it_running_at_this_generation_is_running() {
        let (reg, engine) = new_engine();
        let m = starting_move("mig-r");
        record_job(&reg, "mig-r", &m);
        let ok = |_: &Kind| {
            Some(lifeboat_proto::v1::CommandResult { ok: true, outcome: "done".into(), ..Default::default() })
        };
        let refuse = move |k: &Kind| match k {
            Kind::StartGuest(_) => Some(lifeboat_proto::v1::CommandResult {
                ok: false,
                error: "verifying vm-1 failed: timeout".into(),
                ..Default::default()
            }),
            k => ok(k),
        };
        let _agent = fake_agent(reg.clone(), "host-b", vec![running_there(&m)], refuse).await;
        until("the target's session", || reg.has_session("host-b").then_some(())).await;
        engine.run_move(m.clone(), "olga", false).await.unwrap();
        let row = reg.repos().call_blocking(move |r| r.jobs().moves("mig-r")).unwrap().remove(0);
        assert_eq!(row.state.as_str(), "RUNNING", "{}", row.error);
        let log = reg
            .repos()
            .call_blocking(|r| {
                r.audit().read(&crate::ports::AuditFilter {
                    job: Some("mig-r".into()),
                    limit: Some(100),
                    ..Default::default()
                })
            })
            .unwrap();
        assert!(
            log.iter()
                .any(|a| a.action == "guest.running" && a.detail.contains("reports it running at owner generation 3")),
            "{log:?}"
        );

        // Another generation running there is not this move's start: FAILED.
        let (reg, engine) = new_engine();
        let m = starting_move("mig-f");
        record_job(&reg, "mig-f", &m);
        let other = lifeboat_proto::v1::Guest { owner_generation: 2, ..running_there(&m) };
        let _agent = fake_agent(reg.clone(), "host-b", vec![other], refuse).await;
        until("the target's session", || reg.has_session("host-b").then_some(())).await;
        engine.run_move(m, "olga", false).await.unwrap();
        let row = reg.repos().call_blocking(move |r| r.jobs().moves("mig-f")).unwrap().remove(0);
        assert_eq!(row.state.as_str(), "FAILED");
        assert!(row.error.contains("verifying vm-1 failed"), "{}", row.error);
    }

    #[tokio::test]
    async fn a_forced_move_whose_start_fails_after_its_owner_was_recorded_waits_for_a_planned_move_and_says_so() {
        let (reg, engine) = new_engine();
        let m = starting_move("mig-u");
        let mut row = job_row("mig-u", "migrate", "host-a");
        row.state = JobState::Moving;
        let m_stored = m.clone();
        reg.repos()
            .call_blocking(move |r| {
                r.jobs().create(&row, std::slice::from_ref(&m_stored), &audit("olga", "x", "", "", "mig-u", ""))
            })
            .unwrap();
        // The move recorded host-b as the new owner before it defined the guest there.
        let owner = OwnerRow { complete: false, ..engine.owner(&m, false) };
        reg.repos()
            .call_blocking(move |r| {
                r.ownership()
                    .set_owner(&owner, &audit("controller", "guest.owner_recorded", "host-b", "vm-1", "mig-u", ""))
            })
            .unwrap();
        reg.refresh_owners().await.unwrap();
        let shut =
            lifeboat_proto::v1::Guest { state: lifeboat_proto::v1::GuestState::Shutoff as i32, ..running_there(&m) };
        let _agent = fake_agent(reg.clone(), "host-b", vec![shut], |k| match k {
            Kind::StartGuest(_) => {
                Some(lifeboat_proto::v1::CommandResult { ok: false, error: "boom".into(), ..Default::default() })
            }
            _ => Some(lifeboat_proto::v1::CommandResult { ok: true, outcome: "done".into(), ..Default::default() }),
        })
        .await;
        until("the target's session", || reg.has_session("host-b").then_some(())).await;
        tokio::spawn(engine.clone().run("mig-u".into()));
        let r = until("the job's end", || {
            Some(futures::executor::block_on(engine.job_record("mig-u")).unwrap())
                .filter(|r| r.state.parse::<JobState>().is_ok_and(|s| s.is_terminal()))
        })
        .await;
        assert_eq!(r.state.as_str(), "FAILED", "{r:?}");
        assert!(r.error.contains("unfinished move to host-b"), "{}", r.error);
        assert!(r.error.contains("`lifeboat move --vm vm-1 --from host-a --to host-b --yes`"), "{}", r.error);
        let o = reg.owner_row(&m.uuid).unwrap();
        assert_eq!((o.host.as_str(), o.complete), ("host-b", false), "the owner stays as recorded: nobody's");
        let waiting = reg.repos().call_blocking(move |r| r.jobs().waiting()).unwrap();
        assert_eq!(waiting.len(), 1, "listed as waiting");
        assert!(
            waiting[0].host == "host-a" && waiting[0].reason.starts_with("unfinished move to host-b (job mig-u): "),
            "{waiting:?}"
        );
        let alarms = reg.repos().call_blocking(move |r| r.alarms().list(false)).unwrap();
        let crate::ports::AlarmRow { detail, .. } =
            alarms.iter().find(|a| a.kind == crate::waiting::GUESTS_WAITING).expect("guests-waiting alarm");
        assert!(
            detail.contains("NOT started by itself")
                && detail.contains("lifeboat move --vm vm-1 --from host-a --to host-b --yes"),
            "{detail}"
        );
        // The reconciler's judgement: never started, never ended while unfinished.
        assert_eq!(crate::waiting::judge(&waiting[0], Some(&o)), crate::waiting::WaitJudgement::Unfinished);
    }

    /// Opens a session for `host` that reports `guests` and is heard now,
    /// as a host that comes back does; the session lives until the test ends.
    fn comes_back(reg: &Registry, host: &str, guests: Vec<lifeboat_proto::v1::Guest>) {
        use lifeboat_proto::v1::Inventory;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        std::mem::forget(rx);
        let sid = reg.open_session(host, "boot-2", tx).unwrap();
        let info = lifeboat_proto::v1::HostInfo { host_id: host.to_string(), ..Default::default() };
        reg.apply_inventory(host, sid, Inventory { host: Some(info), guests, more: false }).unwrap();
        reg.heard_cell(host, sid).unwrap().store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    #[tokio::test]
    async fn a_start_is_not_sent_again_when_the_forced_moves_source_came_back_meanwhile() {
        let (reg, engine) = new_engine();
        let m = starting_move("mig-back");
        record_job(&reg, "mig-back", &m);
        let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (n, r2) = (starts.clone(), reg.clone());
        let source_copy =
            lifeboat_proto::v1::Guest { owner_host: "host-a".into(), owner_generation: 2, ..running_there(&m) };
        let _agent = fake_agent(reg.clone(), "host-b", vec![], move |k| match k {
            Kind::GrantLeases(_) => {
                Some(lifeboat_proto::v1::CommandResult { ok: true, outcome: "done".into(), ..Default::default() })
            }
            Kind::StartGuest(_) => {
                // While the target's agent is down, the source powers on
                // and reports its own copy running.
                if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    comes_back(&r2, "host-a", vec![source_copy.clone()]);
                    return None;
                }
                Some(lifeboat_proto::v1::CommandResult { ok: true, outcome: "started".into(), ..Default::default() })
            }
            _ => None,
        })
        .await;
        until("the target's session", || reg.has_session("host-b").then_some(())).await;
        engine.run_move(m, "olga", false).await.unwrap();
        let row = reg.repos().call_blocking(move |r| r.jobs().moves("mig-back")).unwrap().remove(0);
        assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 1, "the start was not sent again");
        assert_eq!(row.state.as_str(), "FAILED");
        assert!(row.error.contains("host-a is talking to the controller again"), "{}", row.error);
    }

    #[tokio::test]
    async fn a_job_resumed_in_starting_finds_its_guest_running_on_the_target_and_calls_it_running() {
        let (reg, engine) = new_engine();
        let m = starting_move("mig-resumed");
        record_job(&reg, "mig-resumed", &m);
        // The start took effect before the pause; the source is back (stopped copy).
        let _agent = fake_agent(reg.clone(), "host-b", vec![running_there(&m)], |_| None).await;
        until("the target's session", || reg.has_session("host-b").then_some(())).await;
        let stopped = lifeboat_proto::v1::Guest {
            owner_host: "host-a".into(),
            owner_generation: 2,
            state: lifeboat_proto::v1::GuestState::Shutoff as i32,
            ..running_there(&m)
        };
        comes_back(&reg, "host-a", vec![stopped]);
        assert!(reg.is_reachable("host-a"));
        engine.run_move(m, "olga", false).await.unwrap();
        let row = reg.repos().call_blocking(move |r| r.jobs().moves("mig-resumed")).unwrap().remove(0);
        assert_eq!((row.state.as_str(), row.error.as_str()), ("RUNNING", ""));
        let owner = reg
            .repos()
            .call_blocking(move |r| r.ownership().owners())
            .unwrap()
            .into_iter()
            .find(|o| o.uuid == row.uuid)
            .unwrap();
        assert_eq!((owner.host.as_str(), owner.generation, owner.complete), ("host-b", 3, true));
    }

    #[tokio::test]
    async fn a_resumed_move_of_a_guest_whose_owner_row_is_quarantined_pauses_and_sends_no_lease_start_define_or_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifeboat.db");
        let m = starting_move("mig-q");
        {
            let reg = Registry::load(
                crate::store::sqlite::SqliteRepos::start(&path).unwrap(),
                crate::domain::host::Timing::default(),
            )
            .unwrap();
            let mut row = job_row("mig-q", "migrate", "host-a");
            row.state = JobState::Moving;
            let stored = m.clone();
            reg.repos()
                .call_blocking(move |r| {
                    r.jobs().create(&row, std::slice::from_ref(&stored), &audit("olga", "x", "", "", "mig-q", ""))
                })
                .unwrap();
        }
        // Its owner row (moved on since: generation 4) cannot be read at the restart.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute("INSERT INTO owners (uuid, host, generation, from_host, job, complete) VALUES (?1, 'host-c', -4, 'host-b', 'mig-later', 1)", [&m.uuid])
            .unwrap();
        let reg = Arc::new(
            Registry::load(
                crate::store::sqlite::SqliteRepos::start(&path).unwrap(),
                crate::domain::host::Timing::default(),
            )
            .unwrap(),
        );
        assert!(reg.is_quarantined(&m.uuid));
        let engine = Engine::new(reg.clone(), &BTreeMap::new(), 0, 0, 60_000).unwrap();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sent.clone();
        let _agent = fake_agent(reg.clone(), "host-b", vec![], move |k| {
            seen.lock().unwrap().push(format!("{k:?}").chars().take(12).collect::<String>());
            Some(lifeboat_proto::v1::CommandResult { ok: true, outcome: "done".into(), ..Default::default() })
        })
        .await;
        until("the target's session", || reg.has_session("host-b").then_some(())).await;
        for state in [MoveState::Starting, MoveState::Defining, MoveState::Pending] {
            let e = engine.run_move(MoveRow { state, ..m.clone() }, "olga", false).await.unwrap_err().to_string();
            assert!(e.contains("quarantine") && e.contains("row-quarantined"), "{e}");
        }
        let e = engine
            .fence(&JobRow { kind: JobKind::Move, ..job_row("mig-q", "move", "host-a") })
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("quarantine"), "{e}");
        assert!(sent.lock().unwrap().is_empty(), "nothing sent: {:?}", sent.lock().unwrap());
        let row = reg.repos().call_blocking(move |r| r.jobs().moves("mig-q")).unwrap().remove(0);
        assert_eq!(
            (row.state.as_str(), row.error.as_str()),
            ("STARTING", ""),
            "the step was neither carried out nor failed"
        );
        assert!(reg.owner_row(&m.uuid).is_none(), "no owner row written over the quarantined one");
        // The job pauses (as on any record it cannot use), with its alarm.
        tokio::spawn(engine.clone().run("mig-q".into()));
        let paused = until("the pause", || engine.paused.lock().unwrap().get("mig-q").cloned()).await;
        assert!(paused.contains("quarantine"), "{paused}");
        until("the job-paused alarm", || reg.active_alarms().into_iter().find(|a| a.1 == JOB_PAUSED)).await;
        assert!(sent.lock().unwrap().is_empty(), "nothing sent: {:?}", sent.lock().unwrap());
    }

    /// A job in MOVING with `moves`, carried out once a define is answered ok
    /// and the observed event is forced to `Started` (invalid in DEFINING).
    async fn run_with_invalid_transition(id: &str, moves: &[MoveRow]) -> (Arc<Registry>, Arc<Engine>, usize) {
        let (reg, engine) = new_engine();
        let mut row = job_row(id, "migrate", "host-a");
        row.state = JobState::Moving;
        let (stored, a) = (moves.to_vec(), audit("olga", "x", "", "", id, ""));
        reg.repos().call_blocking(move |r| r.jobs().create(&row, &stored, &a)).unwrap();
        let defines = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (n, sent) = (defines.clone(), Arc::new(std::sync::Mutex::new(Vec::<String>::new())));
        let seen = sent.clone();
        let _agent = fake_agent(reg.clone(), "host-b", vec![], move |k| {
            seen.lock().unwrap().push(format!("{k:?}").chars().take(12).collect());
            if matches!(k, Kind::DefineGuest(_)) {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Some(lifeboat_proto::v1::CommandResult { ok: true, outcome: "done".into(), ..Default::default() })
        })
        .await;
        until("the target's session", || reg.has_session("host-b").then_some(())).await;
        *engine.test_event.lock().unwrap() = Some(MoveEvent::Started);
        tokio::spawn(engine.clone().run(id.into()));
        until("the job's end", || {
            Some(futures::executor::block_on(engine.job_record(id)).unwrap())
                .filter(|r| r.state.parse::<JobState>().is_ok_and(|s| s.is_terminal()))
        })
        .await;
        // Time for a retry, were there one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sent.lock().unwrap().len(), 1, "one agent call, never sent again: {:?}", sent.lock().unwrap());
        (reg, engine, defines.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn move_in(job: &str, name: &str, uuid_end: u8, state: MoveState, priority: i32) -> MoveRow {
        MoveRow {
            name: name.into(),
            uuid: format!("11111111-0000-4000-8000-0000000000{uuid_end:02}"),
            state,
            priority,
            ..starting_move(job)
        }
    }

    #[tokio::test]
    async fn an_invalid_move_transition_stops_the_job_failed_with_an_alarm_and_sends_nothing_again() {
        let moves =
            [move_in("mig-x", "vm-1", 1, MoveState::Defining, 10), move_in("mig-x", "vm-2", 2, MoveState::Pending, 0)];
        let (reg, engine, defines) = run_with_invalid_transition("mig-x", &moves).await;
        assert_eq!(defines, 1, "the define was sent once, and vm-2's never");
        let r = futures::executor::block_on(engine.job_record("mig-x")).unwrap();
        assert_eq!(r.state, "FAILED", "{r:?}");
        let by_name = |n: &str| r.moves.iter().find(|m| m.name == n).unwrap().clone();
        let (m1, m2) = (by_name("vm-1"), by_name("vm-2"));
        assert_eq!(m1.state, "FAILED");
        assert!(m1.error.contains("invalid transition: Started in state DEFINING"), "{}", m1.error);
        assert_eq!(m2.state, "FAILED");
        assert!(m2.error.starts_with("not carried on: job stopped after vm-1"), "{}", m2.error);
        let alarms = reg.active_alarms();
        let (host, _, detail) = alarms
            .iter()
            .map(|a| (a.0.as_str(), a.1.as_str(), a.2.as_str()))
            .find(|a| a.1 == JOB_INVALID_TRANSITION)
            .expect("job-invalid-transition alarm");
        assert_eq!(host, "host-a");
        assert!(
            detail.contains("job mig-x")
                && detail.contains("vm-1")
                && detail.contains("Started")
                && detail.contains("DEFINING"),
            "{detail}"
        );
        assert!(engine.stopped_job("mig-x").is_none(), "forgotten once the job ended");
    }

    #[tokio::test]
    async fn a_stop_written_before_a_restart_still_stops_the_resumed_job() {
        let (reg, engine) = new_engine();
        let mut row = job_row("mig-r", "migrate", "host-a");
        row.state = JobState::Moving;
        let mut stopped = move_in("mig-r", "vm-1", 1, MoveState::Failed, 10);
        stopped.error = "stopped: invalid transition: Started in state DEFINING".into();
        let moves = vec![stopped, move_in("mig-r", "vm-2", 2, MoveState::Pending, 0)];
        let a = audit("olga", "x", "", "", "mig-r", "");
        reg.repos().call_blocking(move |r| r.jobs().create(&row, &moves, &a)).unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = calls.clone();
        let _agent = fake_agent(reg.clone(), "host-b", vec![], move |_| {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Some(lifeboat_proto::v1::CommandResult { ok: true, outcome: "done".into(), ..Default::default() })
        })
        .await;
        until("the target's session", || reg.has_session("host-b").then_some(())).await;
        // A fresh engine: what it knows of the stop comes from the database.
        tokio::spawn(engine.clone().run("mig-r".into()));
        let r = until("the job's end", || {
            Some(futures::executor::block_on(engine.job_record("mig-r")).unwrap())
                .filter(|r| r.state.parse::<JobState>().is_ok_and(|s| s.is_terminal()))
        })
        .await;
        assert_eq!(r.state, "FAILED", "{r:?}");
        let vm2 = r.moves.iter().find(|m| m.name == "vm-2").unwrap();
        assert_eq!(vm2.state, "FAILED");
        assert!(vm2.error.starts_with("not carried on: job stopped after vm-1"), "{}", vm2.error);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0, "no agent call for a stopped job");
        assert!(!is_stop_error("stopped: for planned move") && is_stop_error("stopped: invalid transition: X"));
    }

    #[tokio::test]
    async fn an_invalid_move_transition_after_a_guest_moved_ends_the_job_partial() {
        let moves =
            [move_in("mig-y", "vm-0", 3, MoveState::Running, 20), move_in("mig-y", "vm-1", 1, MoveState::Defining, 10)];
        let (reg, engine, defines) = run_with_invalid_transition("mig-y", &moves).await;
        assert_eq!(defines, 1);
        let r = futures::executor::block_on(engine.job_record("mig-y")).unwrap();
        assert_eq!(r.state, "PARTIAL", "vm-0 moved before the job stopped: {r:?}");
        assert!(r.error.contains("vm-1 (move failed: stopped: invalid transition"), "{}", r.error);
        assert!(reg.active_alarms().iter().any(|a| a.1 == JOB_INVALID_TRANSITION));
    }

    #[tokio::test]
    async fn an_invalid_job_transition_writes_the_job_failed_with_an_alarm_and_takes_no_step() {
        let (reg, engine) = new_engine();
        let row = job_row("mig-j", "migrate", "host-a");
        let stored = row.clone();
        reg.repos()
            .call_blocking(move |r| r.jobs().create(&stored, &[], &audit("olga", "x", "", "", "mig-j", "")))
            .unwrap();
        let got = engine.job_step(&row, JobKind::Migrate, JobState::Created, JobEvent::AllMoved).await.unwrap();
        assert_eq!(got, None, "no step taken");
        let r = futures::executor::block_on(engine.job_record("mig-j")).unwrap();
        assert_eq!(r.state, "FAILED");
        assert!(r.error.contains("invalid transition: AllMoved in state CREATED"), "{}", r.error);
        let alarm = reg.active_alarms().into_iter().find(|a| a.1 == JOB_INVALID_TRANSITION).expect("alarm");
        assert!(alarm.2.contains("job mig-j") && alarm.2.contains("CREATED"), "{alarm:?}");
        // A valid one steps and writes nothing itself.
        let row = JobRow { id: "mig-k".into(), ..row };
        let row_stored = row.clone();
        reg.repos()
            .call_blocking(move |r| r.jobs().create(&row_stored, &[], &audit("olga", "x", "", "", "mig-k", "")))
            .unwrap();
        let got = engine.job_step(&row, JobKind::Migrate, JobState::Created, JobEvent::Begin).await.unwrap();
        assert_eq!(got, Some((JobState::Fencing, vec![JobEffect::Fence])));
        assert_eq!(futures::executor::block_on(engine.job_record("mig-k")).unwrap().state, "CREATED");
    }

    #[test]
    fn a_guest_left_behind_carries_the_plans_reason_and_failed_checks() {
        let check = |name: &str, ok: bool, detail: &str| Check {
            name: name.into(),
            ok,
            detail: detail.into(),
            remedy: String::new(),
            id: 0,
        };
        let gp = GuestPlan {
            uuid: "u".into(),
            name: "vm-local".into(),
            reason: "local storage: no other host sees /l.img".into(),
            checks: vec![
                check("disks visible from host-b", false, "host-b cannot see /l.img (No such file)"),
                check("memory on host-b", true, "needs 1 MiB"),
            ],
            priority: 3,
            start: true,
            ..Default::default()
        };
        let r = not_moved_row("mig-1", "host-a", &gp, 7);
        assert_eq!(r.state.as_str(), "NOT_MOVED");
        assert_eq!(
            r.error,
            "local storage: no other host sees /l.img; failed checks: disks visible from host-b: host-b cannot see /l.img (No such file)"
        );
        assert_eq!((r.generation, r.definition_xml.as_str(), r.priority, r.source.as_str()), (0, "", 3, "host-a"));

        let many =
            GuestPlan { checks: (0..12).map(|i| check(&format!("c{i}"), false, "no")).collect(), ..Default::default() };
        let r = not_moved_row("mig-1", "host-a", &many, 7);
        assert!(
            r.error.starts_with("the plan could not move it; failed checks: c0: no")
                && r.error.ends_with("c7: no; and 4 more"),
            "{}",
            r.error
        );

        // A guest reporting u64::MAX memory fits nowhere; its row is still written.
        let huge = GuestPlan { uuid: "uh".into(), name: "vm-huge".into(), memory_kib: u64::MAX, ..Default::default() };
        let r = not_moved_row("mig-h", "host-a", &huge, 7);
        let mut store = crate::store::Store::open_in_memory().unwrap();
        let mut job = job_row("mig-h", "migrate", "host-a");
        job.state = JobState::Moving;
        store.create_job(&job, std::slice::from_ref(&r), &audit("olga", "x", "host-a", "", "mig-h", "")).unwrap();
        assert_eq!(store.job_moves("mig-h").unwrap()[0].state.as_str(), "NOT_MOVED");
    }

    #[test]
    fn only_a_guest_owned_elsewhere_counts_as_already_moved() {
        let own = |host: &str, from: &str, complete: bool| Ownership {
            host: host.into(),
            generation: 2,
            from_host: from.into(),
            complete,
            job: "j".into(),
        };
        assert!(!already_elsewhere(None, "a"));
        assert!(!already_elsewhere(Some(&own("a", "", true)), "a"), "owned by the source itself");
        assert!(already_elsewhere(Some(&own("b", "a", true)), "a"), "moved away and done");
        assert!(already_elsewhere(Some(&own("b", "c", false)), "a"), "moved from another host");
        assert!(
            !already_elsewhere(Some(&own("b", "a", false)), "a"),
            "an unfinished move off this source is still ours"
        );
    }

    #[tokio::test]
    async fn a_job_row_that_does_not_read_is_not_resumed_and_raises_job_corrupt_the_others_resume() {
        let (_dir, raw, reg, engine) = new_engine_on_file();
        let a = AuditRow::default();
        let a2 = a.clone();
        reg.repos().call_blocking(move |r| r.jobs().create(&job_row("mig-bad", "migrate", "host-a"), &[], &a)).unwrap();
        reg.repos().call_blocking(move |r| r.jobs().create(&job_row("mig-ok", "migrate", "host-b"), &[], &a2)).unwrap();
        raw.execute("UPDATE jobs SET power_evidence = 'maybe' WHERE id = 'mig-bad'", []).unwrap();
        assert_eq!(engine.resume_all().await.unwrap(), 1, "the good job resumes, the corrupt one does not");
        let alarms: Vec<_> = reg.active_alarms().into_iter().filter(|a| a.1 == "job-corrupt").collect();
        assert_eq!(alarms.len(), 1, "{alarms:?}");
        assert_eq!(alarms[0].0, "host-a");
        assert!(alarms[0].2.contains("mig-bad") && alarms[0].2.contains("power_evidence"), "{alarms:?}");
        // Read per step, the row refuses (the job pauses; never a guess).
        let e = reg.repos().call_blocking(move |r| r.jobs().get("mig-bad")).unwrap_err();
        assert!(e.is_corrupt() && e.to_string().contains("power_evidence"), "{e}");
    }

    #[tokio::test]
    async fn a_corrupt_job_row_blocks_plans_for_its_own_source_only() {
        use crate::domain::checks::{CheckId, failed};
        let (_dir, raw, reg, engine) = new_engine_on_file();
        let a = AuditRow::default();
        reg.repos().call_blocking(move |r| r.jobs().create(&job_row("mig-bad", "migrate", "host-a"), &[], &a)).unwrap();
        raw.execute("UPDATE jobs SET kind = 'evacuate' WHERE id = 'mig-bad'", []).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        for h in ["host-a", "host-b"] {
            reg.open_session(h, "boot", tx.clone()).unwrap();
        }
        let req =
            |s: &str| MigrateRequest { source: s.into(), attest_reason: "unplugged".into(), ..Default::default() };
        let own = engine.plan(&req("host-a")).await.unwrap();
        assert!(failed(&own.preconditions, CheckId::OneOperationPerHost), "{:?}", own.preconditions);
        let c = own.preconditions.iter().find(|c| CheckId::of(c) == Ok(CheckId::OneOperationPerHost)).unwrap();
        assert!(c.detail.contains("mig-bad"), "{c:?}");
        let other = engine.plan(&req("host-b")).await.unwrap();
        assert!(!failed(&other.preconditions, CheckId::OneOperationPerHost), "{:?}", other.preconditions);
    }
}
