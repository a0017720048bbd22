//! `Admin`: the operators' API behind the `lifeboat` CLI.

use std::sync::Arc;

use lifeboat_common::identity::{Identity, Role};
use std::pin::Pin;

use lifeboat_proto::v1::{
    Alarm, AuditEntry, CleanupPlan, CleanupRequest, ClearAlarmsRequest, ClearAlarmsResponse, ForgetGuestRequest,
    ForgetGuestResponse, GetHostRequest, GetJobRequest, GuestRecord, HostRecord, JobRecord, ListAlarmsRequest,
    ListAlarmsResponse, ListAuditRequest, ListAuditResponse, ListGuestsRequest, ListGuestsResponse, ListHostsRequest,
    ListHostsResponse, ListJobsRequest, ListJobsResponse, MigrateRequest, MigrationPlan, RestoreGuestRequest,
    SetHostStatusRequest, StartVmRequest, WhoAmIRequest, WhoAmIResponse, admin_server::Admin,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::domain::job::JobState;
use crate::error::ControllerError;
use crate::migrate::engine::Engine;
use crate::ports::AuditFilter;
use crate::registry::Registry;

/// The admin service.
pub struct AdminService {
    reg: Arc<Registry>,
    engine: Arc<Engine>,
    /// The dashboard's sign-in links and its port, when it is on.
    dashboard: Option<(Arc<crate::dashboard::auth::Auth>, u16)>,
}

impl AdminService {
    /// Wraps the registry and the migration engine.
    pub fn new(reg: Arc<Registry>, engine: Arc<Engine>) -> Self {
        AdminService { reg, engine, dashboard: None }
    }

    /// Mints dashboard sign-in links with `auth` (the dashboard on `port`).
    pub fn with_dashboard(mut self, auth: Arc<crate::dashboard::auth::Auth>, port: u16) -> Self {
        self.dashboard = Some((auth, port));
        self
    }
}

fn check_migrate(req: &MigrateRequest) -> Result<(), ControllerError> {
    if req.source.trim().is_empty() {
        return Err(ControllerError::InvalidArgument("--from HOST is required".into()));
    }
    Ok(())
}

/// Whether a job record is in a terminal state (a watch ends there). A
/// record whose state does not read is not over: the watch goes on until the
/// caller leaves (never a false "done").
fn over(rec: &JobRecord) -> bool {
    JobState::from_wire(rec.job_state).is_ok_and(JobState::is_terminal)
}

type JobStream = Pin<Box<dyn Stream<Item = Result<JobRecord, Status>> + Send>>;

/// Checks that the caller is a person/tool with at least `needed`.
pub fn authorize<T>(req: &Request<T>, needed: Role, action: &str) -> Result<(String, Role), ControllerError> {
    let who = super::peer_identity(req)?;
    let shown = who.to_string();
    authorize_identity(who, needed, action).inspect_err(|e| {
        crate::conn::request_denied("permission_denied", &shown, req.remote_addr(), &e.to_string());
    })
}

fn authorize_identity(who: Identity, needed: Role, action: &str) -> Result<(String, Role), ControllerError> {
    match who {
        Identity::Client { name, role } if role.allows(needed) => Ok((name, role)),
        Identity::Client { name, role } => Err(ControllerError::PermissionDenied(format!(
            "{action} needs the {needed} role; certificate '{name}' has role {role}"
        ))),
        other => Err(ControllerError::PermissionDenied(format!(
            "{action} needs a client certificate; this certificate is for {other}"
        ))),
    }
}

impl AdminService {
    /// Each host's memory reserved by moves under way, from the store.
    async fn fill_reserved(&self, hosts: &mut [HostRecord]) -> Result<(), ControllerError> {
        let reserved = self.engine.reserved_by_host().await?;
        for h in hosts {
            let id = h.info.as_ref().map(|i| i.host_id.as_str()).unwrap_or_default();
            h.reserved_memory_kib = reserved.get(id).copied().unwrap_or(0);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_dashboard_login(
        &self,
        req: Request<lifeboat_proto::v1::CreateDashboardLoginRequest>,
    ) -> Result<Response<lifeboat_proto::v1::DashboardLogin>, Status> {
        let (name, role) = authorize(&req, Role::Viewer, "a dashboard sign-in link")?;
        let Some((auth, port)) = &self.dashboard else {
            return Err(ControllerError::Refused(
                "the dashboard is off on this controller: set [dashboard] enabled = true in its configuration".into(),
            )
            .into());
        };
        // A session never outlives the certificate that asked for it.
        let until = super::peer_not_after_ms(&req).unwrap_or(i64::MAX);
        let (token, expires) = auth.mint_until(&name, role, until).map_err(|e| match e {
            crate::dashboard::auth::AuthError::Full { .. } => ControllerError::Refused(e.to_string()),
            _ => ControllerError::Internal(e.to_string()),
        })?;
        let row = crate::ports::AuditRow {
            seq: 0,
            at_ms: self.reg.now_ms(),
            actor: name.clone(),
            action: "dashboard.link".into(),
            host: String::new(),
            vm: String::new(),
            job: String::new(),
            detail: format!("one-time sign-in link for role {role}, valid until {expires} (unix ms)"),
        };
        // No link without its audit entry.
        if let Err(e) = self.reg.repos().audit(move |a| a.append(&row)).await {
            auth.forget_link(&token);
            return Err(ControllerError::from(e).into());
        }
        info!(operator = %name, %role, "dashboard sign-in link minted");
        Ok(Response::new(lifeboat_proto::v1::DashboardLogin {
            token,
            expires_unix_ms: expires,
            port: u32::from(*port),
            name,
            role: role.as_str().into(),
        }))
    }

    async fn end_dashboard_sessions(
        &self,
        req: Request<lifeboat_proto::v1::EndDashboardSessionsRequest>,
    ) -> Result<Response<lifeboat_proto::v1::EndDashboardSessionsResponse>, Status> {
        let (actor, _) = authorize(&req, Role::Admin, "ending dashboard sessions")?;
        let r = req.get_ref();
        let name = r.name.trim();
        let which = match (name.is_empty(), r.all) {
            (false, false) if name.len() <= 256 && !name.chars().any(char::is_control) => Some(name),
            (false, false) => {
                return Err(
                    ControllerError::InvalidArgument("name: at most 256 bytes, no control characters".into()).into()
                );
            }
            (true, true) => None,
            _ => {
                return Err(ControllerError::InvalidArgument(
                    "say whose sessions end: a name (--name), or --all for everybody's, not both".into(),
                )
                .into());
            }
        };
        let Some((auth, _)) = &self.dashboard else {
            return Err(ControllerError::Refused(
                "the dashboard is off on this controller: set [dashboard] enabled = true in its configuration".into(),
            )
            .into());
        };
        // Recorded before it is done: an audit write that fails ends nothing.
        let row = crate::ports::AuditRow {
            seq: 0,
            at_ms: self.reg.now_ms(),
            actor: actor.clone(),
            action: "dashboard.sessions_ended".into(),
            host: String::new(),
            vm: String::new(),
            job: String::new(),
            detail: format!(
                "every dashboard session and unused sign-in link of {} ends",
                which.map_or_else(|| "everybody".to_string(), |n| format!("{n:?}"))
            ),
        };
        self.reg.repos().audit(move |a| a.append(&row)).await.map_err(ControllerError::from)?;
        let (sessions, links) = auth.end_all(which);
        info!(operator = %actor, sessions, links, of = ?which, "dashboard sessions ended");
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(lifeboat_proto::v1::EndDashboardSessionsResponse {
            sessions: count(sessions),
            links: count(links),
        }))
    }

    async fn list_hosts(&self, req: Request<ListHostsRequest>) -> Result<Response<ListHostsResponse>, Status> {
        authorize(&req, Role::Viewer, "listing hosts")?;
        let reg = self.reg.clone();
        let mut hosts = tokio::task::spawn_blocking(move || {
            let mut hosts = reg.list_hosts();
            crate::waiting::annotate_hosts(&reg, &mut hosts);
            hosts
        })
        .await
        .map_err(|e| ControllerError::Internal(format!("listing hosts: {e}")))?;
        self.fill_reserved(&mut hosts).await?;
        Ok(Response::new(ListHostsResponse { hosts }))
    }

    async fn get_host(&self, req: Request<GetHostRequest>) -> Result<Response<HostRecord>, Status> {
        authorize(&req, Role::Viewer, "showing a host")?;
        let host = req.get_ref().host.trim();
        if host.is_empty() {
            return Err(ControllerError::InvalidArgument("no host given".into()).into());
        }
        let mut rec = [self.reg.get_host(host)?];
        crate::waiting::annotate_hosts(&self.reg, &mut rec);
        self.fill_reserved(&mut rec).await?;
        let [rec] = rec;
        Ok(Response::new(rec))
    }

    async fn list_guests(&self, req: Request<ListGuestsRequest>) -> Result<Response<ListGuestsResponse>, Status> {
        let (_, role) = authorize(&req, Role::Viewer, "listing guests")?;
        let r = req.get_ref();
        let host = r.host.trim();
        let filter = if host.is_empty() { None } else { Some(host) };
        let (host, vm, defs) = (filter.map(str::to_string), r.vm.trim().to_string(), r.with_definitions);
        let after = decode_page_token(&r.page_token)?;
        let limit = match r.page_size {
            0 => DEFAULT_GUEST_PAGE,
            n => (n as usize).min(MAX_GUEST_PAGE),
        };
        let reg = self.reg.clone();
        // Listing 200,000 guests is CPU work: off the async workers.
        let (guests, next) = tokio::task::spawn_blocking(move || {
            let mut page = reg.list_guests_page(
                host.as_deref(),
                (!vm.is_empty()).then_some(vm.as_str()),
                defs,
                after.as_ref(),
                limit,
            )?;
            crate::waiting::annotate_guests(&reg, &mut page.0);
            Ok::<_, ControllerError>(page)
        })
        .await
        .map_err(|e| ControllerError::Internal(format!("listing guests: {e}")))??;
        let mut guests = guests;
        if !role.allows(Role::Operator) {
            guests.iter_mut().for_each(strip_record_for_viewer);
        }
        let next_page_token = next.map(|c| serde_json::to_string(&c).expect("strings serialize")).unwrap_or_default();
        Ok(Response::new(ListGuestsResponse { guests, next_page_token }))
    }

    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> Result<Response<WhoAmIResponse>, Status> {
        let (name, role) = authorize(&req, Role::Viewer, "asking who you are")?;
        Ok(Response::new(WhoAmIResponse { name, role: role.as_str().into() }))
    }

    async fn plan_migration(&self, req: Request<MigrateRequest>) -> Result<Response<MigrationPlan>, Status> {
        authorize(&req, Role::Operator, "planning a forced migration")?;
        check_migrate(req.get_ref())?;
        Ok(Response::new(self.engine.plan(req.get_ref()).await?))
    }

    async fn start_migration(&self, req: Request<MigrateRequest>) -> Result<Response<JobRecord>, Status> {
        let (name, _) = authorize(&req, Role::Operator, "a forced migration")?;
        check_migrate(req.get_ref())?;
        info!(operator = %name, source = %req.get_ref().source, plan = %req.get_ref().plan_id, "forced migration requested");
        let r = self.engine.start(req.into_inner(), &name).await;
        if let Err(e) = &r {
            info!(operator = %name, "forced migration refused: {e}");
        }
        Ok(Response::new(r?))
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        authorize(&req, Role::Viewer, "listing jobs")?;
        let r = req.get_ref();
        let host = if r.host.is_empty() { None } else { Some(r.host.as_str()) };
        let limit = if r.limit == 0 { 50 } else { r.limit };
        Ok(Response::new(ListJobsResponse { jobs: self.engine.jobs(host, limit).await? }))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<JobRecord>, Status> {
        authorize(&req, Role::Viewer, "showing a job")?;
        Ok(Response::new(self.engine.job_record(&req.get_ref().id).await?))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(&self, req: Request<GetJobRequest>) -> Result<Response<JobStream>, Status> {
        authorize(&req, Role::Viewer, "watching a job")?;
        let busy = crate::conn::busy(&req);
        let id = req.get_ref().id.clone();
        let mut rx = self.engine.subscribe();
        let first = self.engine.job_record(&id).await?;
        let engine = self.engine.clone();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let _busy = busy;
            let mut done = over(&first);
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            while !done {
                let changed = tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv()).await;
                if let Ok(Ok(j)) = &changed
                    && j != &id
                {
                    continue;
                }
                let Ok(rec) = engine.job_record(&id).await else { return };
                done = over(&rec);
                if tx.send(Ok(rec)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    async fn set_host_status(&self, req: Request<SetHostStatusRequest>) -> Result<Response<HostRecord>, Status> {
        let (name, _) = authorize(&req, Role::Operator, "setting a host's status")?;
        let r = req.into_inner();
        if r.host.trim().is_empty() {
            return Err(ControllerError::InvalidArgument("no host given".into()).into());
        }
        crate::hostops::set_status(
            &self.reg,
            &self.engine,
            r.host.trim(),
            &r.status,
            &r.reason,
            r.attest_powered_off,
            &name,
        )
        .await?;
        let mut h = [self.reg.get_host(r.host.trim())?];
        crate::waiting::annotate_hosts(&self.reg, &mut h);
        let [h] = h;
        Ok(Response::new(h))
    }

    async fn plan_cleanup(&self, req: Request<CleanupRequest>) -> Result<Response<CleanupPlan>, Status> {
        authorize(&req, Role::Operator, "planning a cleanup")?;
        let r = req.get_ref();
        Ok(Response::new(crate::hostops::cleanup_plan(&self.reg, r.host.trim(), r.destroy_running).await?))
    }

    async fn cleanup(&self, req: Request<CleanupRequest>) -> Result<Response<CleanupPlan>, Status> {
        let (name, _) = authorize(&req, Role::Operator, "cleanup")?;
        let r = req.into_inner();
        info!(operator = %name, host = %r.host, "cleanup requested");
        Ok(Response::new(
            crate::hostops::cleanup(&self.reg, r.host.trim(), r.destroy_running, &r.plan_id, &name).await?,
        ))
    }

    async fn start_vm(&self, req: Request<StartVmRequest>) -> Result<Response<GuestRecord>, Status> {
        let (name, _) = authorize(&req, Role::Operator, "starting a guest")?;
        let r = req.into_inner();
        info!(operator = %name, vm = %r.vm, "guest start requested");
        Ok(Response::new(
            crate::guestops::start_vm(&self.reg, &r.vm, &r.reason, &name, self.engine.lease_ttl_ms()).await?,
        ))
    }

    async fn list_alarms(&self, req: Request<ListAlarmsRequest>) -> Result<Response<ListAlarmsResponse>, Status> {
        authorize(&req, Role::Viewer, "listing alarms")?;
        let all = req.get_ref().include_cleared;
        let rows = self.reg.repos().alarms(move |a| a.list(all)).await.map_err(ControllerError::from)?;
        let alarms = rows
            .into_iter()
            .map(|crate::ports::AlarmRow { id, at_ms: at, host, kind, detail, cleared_ms: cleared }| Alarm {
                id,
                at_unix_ms: at,
                host,
                kind,
                detail,
                cleared_unix_ms: cleared,
            })
            .collect();
        Ok(Response::new(ListAlarmsResponse { alarms }))
    }

    async fn clear_alarms(&self, req: Request<ClearAlarmsRequest>) -> Result<Response<ClearAlarmsResponse>, Status> {
        let (name, _) = authorize(&req, Role::Operator, "clearing alarms")?;
        let r = req.into_inner();
        let reg = self.reg.clone();
        let cleared =
            tokio::task::spawn_blocking(move || crate::alarms::clear(&reg, &r.host, &r.kind, &r.reason, &name))
                .await
                .map_err(|e| ControllerError::Internal(format!("clearing alarms: {e}")))??;
        Ok(Response::new(ClearAlarmsResponse { cleared }))
    }

    async fn restore_guest(&self, req: Request<RestoreGuestRequest>) -> Result<Response<GuestRecord>, Status> {
        let (name, _) = authorize(&req, Role::Operator, "restoring a guest")?;
        let r = req.into_inner();
        info!(operator = %name, vm = %r.vm, to = %r.to_host, start = r.start, "restore of a missing guest requested");
        Ok(Response::new(
            crate::guestops::restore(
                &self.reg,
                &r,
                &name,
                self.engine.lease_ttl_ms(),
                self.engine.memory_reserve_kib(),
            )
            .await?,
        ))
    }

    async fn forget_guest(&self, req: Request<ForgetGuestRequest>) -> Result<Response<ForgetGuestResponse>, Status> {
        let (name, _) = authorize(&req, Role::Operator, "forgetting a guest")?;
        let r = req.into_inner();
        info!(operator = %name, vm = %r.vm, "forgetting a missing guest requested");
        let reg = self.reg.clone();
        let out = tokio::task::spawn_blocking(move || crate::guestops::forget(&reg, &r, &name))
            .await
            .map_err(|e| ControllerError::Internal(format!("forgetting a guest: {e}")))??;
        Ok(Response::new(out))
    }

    async fn list_audit(&self, req: Request<ListAuditRequest>) -> Result<Response<ListAuditResponse>, Status> {
        authorize(&req, Role::Viewer, "reading the audit log")?;
        let r = req.get_ref();
        let opt = |s: &str| if s.is_empty() { None } else { Some(s.to_string()) };
        let f = AuditFilter {
            host: opt(&r.host),
            vm: opt(&r.vm),
            job: opt(&r.job),
            since_ms: if r.since_unix_ms > 0 { Some(r.since_unix_ms) } else { None },
            limit: if r.limit == 0 { None } else { Some(r.limit) },
        };
        let rows = self.reg.repos().audit(move |l| l.read(&f)).await.map_err(ControllerError::from)?;
        let entries = rows
            .into_iter()
            .map(|a| AuditEntry {
                seq: a.seq,
                at_unix_ms: a.at_ms,
                actor: a.actor,
                action: a.action,
                host: a.host,
                vm: a.vm,
                job: a.job,
                detail: a.detail,
            })
            .collect();
        Ok(Response::new(ListAuditResponse { entries }))
    }
}

/// Guests per `ListGuests` page when the request does not say.
pub const DEFAULT_GUEST_PAGE: usize = 1000;
/// Most guests per `ListGuests` page.
pub const MAX_GUEST_PAGE: usize = 5000;

/// A `ListGuests` page token back into where the page starts ("" = the start).
fn decode_page_token(token: &str) -> Result<Option<crate::registry::GuestCursor>, ControllerError> {
    if token.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(token).map(Some).map_err(|_| {
        ControllerError::InvalidArgument(
            "page_token is not one this controller gave out; list again without it to start from the beginning".into(),
        )
    })
}

/// Elements libvirt's secure flag (`VIR_DOMAIN_XML_SECURE`) adds to a
/// definition: `<cookies>` of network disks (HTTP session cookies).
const SECRET_ELEMENTS: &[&str] = &["cookies"];
/// Attributes it adds: `passwd` of `<graphics>` (VNC, SPICE, RDP).
const SECRET_ATTRIBUTES: &[&str] = &["passwd"];

/// A definition without what libvirt's secure flag adds (graphics
/// passwords, network-disk cookies), for the viewer role. The definition is
/// stored whole (a migration defines the guest from it); viewers see it
/// for diagnosis, not its secrets. XML that does not parse is withheld
/// whole (Err): unparsed text cannot be shown as stripped.
pub fn strip_definition_secrets(xml: &str) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("it does not parse ({e})"))?;
    let mut cut: Vec<std::ops::Range<usize>> = Vec::new();
    for n in doc.descendants().filter(|n| n.is_element()) {
        if SECRET_ELEMENTS.contains(&n.tag_name().name()) {
            cut.push(n.range());
            continue;
        }
        cut.extend(n.attributes().filter(|a| SECRET_ATTRIBUTES.contains(&a.name())).map(|a| a.range()));
    }
    cut.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(xml.len());
    let mut at = 0;
    for r in cut {
        // An attribute inside an element already cut is covered by it.
        if r.start < at {
            continue;
        }
        out.push_str(xml.get(at..r.start).ok_or("a range is not on a character boundary")?);
        at = r.end;
    }
    out.push_str(xml.get(at..).ok_or("a range is not on a character boundary")?);
    // What is shown must itself parse and hold none of the secrets.
    let check = roxmltree::Document::parse(&out).map_err(|e| format!("it does not parse once stripped ({e})"))?;
    let left = check.descendants().any(|n| {
        n.is_element()
            && (SECRET_ELEMENTS.contains(&n.tag_name().name())
                || n.attributes().any(|a| SECRET_ATTRIBUTES.contains(&a.name())))
    });
    if left {
        return Err("a secret is still in it once stripped".into());
    }
    Ok(out)
}

/// Removes the definition's secrets from a guest record for the viewer
/// role; a definition that cannot be stripped is withheld.
fn strip_record_for_viewer(rec: &mut GuestRecord) {
    let Some(g) = rec.guest.as_mut() else { return };
    g.definition_deflate.clear();
    if g.definition_xml.is_empty() {
        return;
    }
    match strip_definition_secrets(&g.definition_xml) {
        Ok(x) => g.definition_xml = x,
        Err(why) => {
            g.definition_xml.clear();
            if g.error.is_empty() {
                g.error = format!("definition withheld from the viewer role: {why}; an operator can read it");
            }
        }
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;

    #[test]
    fn a_watch_ends_on_a_terminal_state_only_and_never_on_one_that_does_not_read() {
        for s in JobState::ALL {
            let rec = JobRecord { job_state: s.to_wire() as i32, ..Default::default() };
            assert_eq!(over(&rec), s.is_terminal(), "{s:?}");
        }
        // The text alone decides nothing: an unset or unknown enum is not over.
        for n in [0, 99] {
            assert!(!over(&JobRecord { state: "SUCCEEDED".into(), job_state: n, ..Default::default() }));
        }
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    const DEF: &str = r#"<domain type='kvm'>
  <name>vm1</name>
  <devices>
    <disk type='network' device='disk'>
      <source protocol='https' name='/img.qcow2'>
        <host name='images.example' port='443'/>
        <cookies><cookie name='session'>s3cr3t-cookie</cookie></cookies>
      </source>
    </disk>
    <graphics type='vnc' port='-1' autoport='yes' passwd='vnc-pass' passwdValidTo='2030-01-01T00:00:00'/>
    <graphics type="spice" passwd="spice-pass"><listen type='address'/></graphics>
  </devices>
</domain>"#;

    #[test]
    fn viewers_get_definitions_without_passwords_or_cookies() {
        let out = strip_definition_secrets(DEF).unwrap();
        for secret in ["vnc-pass", "spice-pass", "s3cr3t-cookie", "passwd=", "<cookies"] {
            assert!(!out.contains(secret), "{secret} left in:\n{out}");
        }
        for kept in [
            "<name>vm1</name>",
            "passwdValidTo='2030-01-01T00:00:00'",
            "<host name='images.example'",
            "<listen type='address'/>",
        ] {
            assert!(out.contains(kept), "{kept} lost:\n{out}");
        }
        assert_eq!(
            strip_definition_secrets("<domain><name>x</name></domain>").unwrap(),
            "<domain><name>x</name></domain>"
        );
    }

    #[test]
    fn an_unparsable_definition_is_withheld_from_viewers() {
        assert!(strip_definition_secrets("<domain><graphics passwd='x'>").is_err());
        let mut rec = GuestRecord {
            guest: Some(lifeboat_proto::v1::Guest {
                definition_xml: "<domain passwd='x'".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        strip_record_for_viewer(&mut rec);
        let g = rec.guest.unwrap();
        assert!(g.definition_xml.is_empty() && g.error.contains("withheld"), "{g:?}");
    }
}
