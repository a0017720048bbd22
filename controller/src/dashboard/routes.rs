//! The dashboard's routes and handlers: sign-in, pages, the live stream and
//! actions. Reads run on blocking threads (the registry's lock is taken per
//! chunk of hosts); actions call the functions the gRPC handlers call.

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, Form, Path, Query, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use lifeboat_common::identity::Role;
use maud::Markup;
use serde::Deserialize;

use super::guard::{self, SignedIn};
use super::{AppState, Ctl, views};
use crate::domain::host::{HostStatus, Liveness};
use crate::error::ControllerError;
use crate::ports::{AuditFilter, AuditRow};
use crate::registry::{GuestFilter, HostFilter};
use lifeboat_proto::v1::GuestRecord;

/// Largest request body (forms are a few fields).
pub const BODY_LIMIT: usize = 16 * 1024;
/// Rows per page of hosts and guests.
pub const PAGE: usize = 100;
/// Guests on a host's page.
pub const HOST_GUESTS: usize = 200;
/// Action-log rows on a host's page.
pub const HOST_LOG: u32 = 200;
/// Jobs on a host's page.
pub const HOST_JOBS: u32 = 10;
/// Longest query value read (filters, cursors).
const MAX_QUERY_VALUE: usize = 256;

/// The dashboard's router.
pub fn router(app: AppState) -> Router {
    let pages = Router::new()
        .route("/", get(|| async { Redirect::to("/hosts") }))
        .route("/hosts", get(hosts))
        .route("/hosts/{id}", get(host))
        .route("/guests", get(guests))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/live", get(super::live::live))
        .route("/targets", get(super::actions::targets));
    let any_post = Router::new().route("/logout", post(logout)).route_layer(from_fn(guard::post_guard_any));
    let actions = Router::new()
        .route("/hosts/{id}/status", post(set_status))
        .route("/hosts/{id}/status/plan", post(plan_status))
        .route("/alarms/ack", post(ack_alarm))
        .route("/hosts/{id}/migrate/plan", post(super::actions::plan_migrate))
        .route("/hosts/{id}/migrate", post(super::actions::start_migrate))
        .route("/guests/move/plan", post(super::actions::plan_move))
        .route("/guests/move", post(super::actions::start_move))
        .route("/hosts/{id}/cleanup/plan", post(super::actions::plan_cleanup))
        .route("/hosts/{id}/cleanup", post(super::actions::cleanup))
        .route_layer(from_fn(guard::post_guard_operator));
    let signed = pages.merge(any_post).merge(actions).route_layer(from_fn_with_state(app.clone(), guard::session));
    let served = Router::new()
        .route("/login", get(login_page).post(login))
        .route("/signed-out", get(|| async { Html(views::signed_out().into_string()) }))
        .merge(signed)
        .layer(from_fn_with_state(app.clone(), guard::leader_only));
    Router::new()
        .route("/assets/{name}", get(asset))
        .merge(served)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(from_fn(guard::security_headers))
        .with_state(app)
}

pub(super) fn html(m: Markup) -> Response {
    Html(m.into_string()).into_response()
}

pub(super) fn fail(code: StatusCode, msg: &str) -> Response {
    (code, Html(views::refusal(msg).into_string())).into_response()
}

pub(super) fn err(e: &ControllerError) -> Response {
    fail(StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.to_string())
}

/// An action's form as axum parsed it (or why it could not).
pub(super) type FormResult<T> = Result<Form<T>, axum::extract::rejection::FormRejection>;

/// The leading controller and the action's parsed form, or the answer
/// that says why not: the no-leader page, or axum's own 400/413/415.
pub(super) fn leading_with<T>(app: &AppState, f: FormResult<T>) -> Result<(std::sync::Arc<Ctl>, T), Box<Response>> {
    let ctl = app.leading().ok_or_else(|| Box::new(no_ctl()))?;
    let Form(f) = f.map_err(|rejection| Box::new(rejection.into_response()))?;
    Ok((ctl, f))
}

pub(super) fn no_ctl() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, [("refresh", "2")], Html(views::no_leader().into_string())).into_response()
}

async fn asset(Path(name): Path<String>) -> Response {
    let (ctype, body) = match name.as_str() {
        "app.js" => ("text/javascript; charset=utf-8", views::APP_JS),
        "app.css" => ("text/css; charset=utf-8", views::APP_CSS),
        "favicon.svg" => ("image/svg+xml", views::FAVICON),
        _ => return (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    };
    ([(header::CONTENT_TYPE, ctype), (header::CACHE_CONTROL, "public, max-age=3600")], body).into_response()
}

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(default)]
    token: String,
}

async fn login_page(
    State(app): State<AppState>,
    q: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    // The token is looked at, not used: a link preview that runs no script
    // cannot use it up (the form's POST does).
    let token = q.map(|q| q.0.token).unwrap_or_default();
    if !app.auth.pending(&token) {
        return (StatusCode::GONE, Html(views::link_gone().into_string())).into_response();
    }
    html(views::login(&token))
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn audit(ctl: &Ctl, actor: &str, action: &str, host: &str, detail: String) {
    if let Err(e) = try_audit(ctl, actor, action, host, detail).await {
        tracing::warn!("dashboard: cannot write the audit entry: {e}");
    }
}

/// [`audit`], saying whether the entry was written.
async fn try_audit(ctl: &Ctl, actor: &str, action: &str, host: &str, detail: String) -> Result<(), ControllerError> {
    let row = AuditRow {
        seq: 0,
        at_ms: ctl.reg.now_ms(),
        actor: actor.into(),
        action: action.into(),
        host: host.into(),
        vm: String::new(),
        job: String::new(),
        detail,
    };
    ctl.reg.repos().audit(move |a| a.append(&row)).await.map_err(ControllerError::from)
}

async fn login(
    State(app): State<AppState>,
    peer: Option<Extension<axum::extract::ConnectInfo<super::listener::Peer>>>,
    req: axum::extract::Request,
) -> Response {
    if let Err(why) = guard::origin_check(&req) {
        crate::conn::request_denied("dashboard_post", "none", peer.as_ref().map(|p| p.0.0.0), why);
        return (StatusCode::FORBIDDEN, format!("refused, nothing was changed: {why}\n")).into_response();
    }
    let Some(ctl) = app.leading() else { return no_ctl() };
    let f = match <Form<LoginForm> as axum::extract::FromRequest<()>>::from_request(req, &()).await {
        Ok(Form(f)) => f,
        // Too large (413) or not a form (400 or 415): axum's own answer.
        Err(rejection) => return rejection.into_response(),
    };
    let (id, s) = match app.auth.open_session(&f.token) {
        Ok(v) => v,
        Err(e @ super::auth::AuthError::Full { .. }) => return fail(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        Err(e @ super::auth::AuthError::CertificateExpired { .. }) => {
            return (StatusCode::GONE, Html(views::link_refused(&e.to_string()).into_string())).into_response();
        }
        Err(_) => return (StatusCode::GONE, Html(views::link_gone().into_string())).into_response(),
    };
    let from = peer.as_ref().map(|p| p.0.0.0.ip().to_string()).unwrap_or_else(|| "unknown".into());
    let detail = format!("role {} from {from}, until {} (unix ms)", s.role, s.expires_ms);
    // No session without its audit entry.
    if let Err(e) = try_audit(&ctl, &s.name, "dashboard.login", "", detail).await {
        app.auth.end(&id);
        tracing::warn!("dashboard: sign-in of {} not done, the audit entry cannot be written: {e}", s.name);
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "not signed in: the audit log cannot be written ({e}); the link is used up: run \
                 `lifeboat dashboard login` again once the controller's store works"
            ),
        );
    }
    let cookie = super::auth::set_cookie(&id, app.auth.seconds_left(&s));
    let mut res = (StatusCode::SEE_OTHER, [(header::LOCATION, "/hosts")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

async fn logout(State(app): State<AppState>, Extension(s): Extension<SignedIn>) -> Response {
    app.auth.end(&s.id);
    if let Some(ctl) = app.leading() {
        audit(&ctl, &s.session.name, "dashboard.logout", "", String::new()).await;
    }
    let mut res = (StatusCode::OK, [("x-lifeboat-location", "/signed-out")], "signed out\n").into_response();
    if let Ok(v) = HeaderValue::from_str(&super::auth::clear_cookie()) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn bounded(v: &Option<String>) -> Option<String> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(|s| s.chars().take(MAX_QUERY_VALUE).collect())
}

/// The query of `/hosts` (and its live view).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HostsQuery {
    status: Option<String>,
    liveness: Option<String>,
    alarms: Option<String>,
    q: Option<String>,
    after: Option<String>,
}

/// The `#live` part of `/hosts`.
pub fn hosts_fragment(ctl: &Ctl, q: &HostsQuery) -> Result<Markup, ControllerError> {
    let status = match bounded(&q.status) {
        Some(s) => Some(HostStatus::from_name(&s).map_err(|e| ControllerError::InvalidArgument(e.to_string()))?),
        None => None,
    };
    let liveness = match bounded(&q.liveness).map(|s| s.to_uppercase()).as_deref() {
        None => None,
        Some("REACHABLE") => Some(Liveness::Reachable),
        Some("UNREACHABLE") => Some(Liveness::Unreachable),
        Some(other) => {
            return Err(ControllerError::InvalidArgument(format!("liveness {other:?}: use reachable or unreachable")));
        }
    };
    let f = HostFilter { status, liveness, alarms_only: bounded(&q.alarms).is_some(), name: bounded(&q.q) };
    let after = bounded(&q.after);
    let page = ctl.reg.hosts_page(&f, after.as_deref(), PAGE);
    let next = page.next.as_deref().map(|n| {
        let mut link = String::from("/hosts?");
        for (k, v) in [("status", &q.status), ("liveness", &q.liveness), ("alarms", &q.alarms), ("q", &q.q)] {
            if let Some(v) = bounded(v) {
                link.push_str(&format!("{k}={}&", enc(&v)));
            }
        }
        link.push_str(&format!("after={}", enc(n)));
        link
    });
    Ok(views::hosts_table(&page.rows, page.matching, next.as_deref()))
}

/// The query of `/guests`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GuestsQuery {
    host: Option<String>,
    state: Option<String>,
    owner: Option<String>,
    q: Option<String>,
    after_host: Option<String>,
    after_name: Option<String>,
    after_uuid: Option<String>,
}

fn state_number(name: &str) -> Option<i32> {
    (0..=32).find(|n| lifeboat_proto::state_name(*n) == name)
}

/// The rows of `/guests` and its next-page link.
pub fn guests_rows(ctl: &Ctl, q: &GuestsQuery) -> Result<(Vec<GuestRecord>, Option<String>), ControllerError> {
    let state = match bounded(&q.state) {
        Some(s) => Some(state_number(&s.to_lowercase()).ok_or_else(|| {
            ControllerError::InvalidArgument(format!("state {s:?}: use running, shutoff, paused, ..."))
        })?),
        None => None,
    };
    let f = GuestFilter { host: bounded(&q.host), state, owner: bounded(&q.owner), name: bounded(&q.q) };
    let after = match (&q.after_host, &q.after_name, &q.after_uuid) {
        (Some(h), Some(n), Some(u)) => Some((h.clone(), n.clone(), u.clone())),
        _ => None,
    };
    let (rows, next) = ctl.reg.guests_page(&f, after.as_ref(), PAGE)?;
    let next = next.map(|(h, n, u)| {
        let mut link = String::from("/guests?");
        for (k, v) in [("host", &q.host), ("state", &q.state), ("owner", &q.owner), ("q", &q.q)] {
            if let Some(v) = bounded(v) {
                link.push_str(&format!("{k}={}&", enc(&v)));
            }
        }
        link.push_str(&format!("after_host={}&after_name={}&after_uuid={}", enc(&h), enc(&n), enc(&u)));
        link
    });
    Ok((rows, next))
}

/// The `#live` part of `/guests`.
pub fn guests_fragment(ctl: &Ctl, q: &GuestsQuery, role: Role) -> Result<Markup, ControllerError> {
    let (rows, next) = guests_rows(ctl, q)?;
    Ok(views::guests_table_for(&rows, next.as_deref(), role))
}

/// The query of `/hosts/<id>`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HostQuery {
    since: Option<String>,
}

/// Reads `since` (RFC 3339 or unix ms).
pub fn parse_since(s: &str) -> Result<i64, ControllerError> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
        .map_err(|e| ControllerError::InvalidArgument(format!("since {s:?}: {e}; use RFC 3339 or unix ms")))
}

/// The `#live` part of `/hosts/<id>`.
pub async fn host_fragment(ctl: &Ctl, id: &str, q: &HostQuery, role: Role) -> Result<Markup, ControllerError> {
    let since_ms = bounded(&q.since).map(|s| parse_since(&s)).transpose()?;
    let reg = ctl.reg.clone();
    let idc = id.to_string();
    let (mut h, guests, next) = tokio::task::spawn_blocking(move || {
        let mut h = [reg.get_host(&idc)?];
        crate::waiting::annotate_hosts(&reg, &mut h);
        let [h] = h;
        let hid = h.info.as_ref().map(|i| i.host_id.clone()).unwrap_or(idc);
        let f = GuestFilter { host: Some(hid), ..Default::default() };
        let (g, next) = reg.guests_page(&f, None, HOST_GUESTS)?;
        Ok::<_, ControllerError>((h, g, next))
    })
    .await
    .map_err(|e| ControllerError::Internal(e.to_string()))??;
    let hid = h.info.as_ref().map(|i| i.host_id.clone()).unwrap_or_default();
    if let Some(r) = ctl.engine.reserved_by_host().await?.get(&hid) {
        h.reserved_memory_kib = *r;
    }
    let jobs = ctl.engine.jobs(Some(&hid), HOST_JOBS).await?;
    let filter = AuditFilter { host: Some(hid.clone()), since_ms, limit: Some(HOST_LOG), ..Default::default() };
    let mut log = ctl.reg.repos().audit(move |a| a.read(&filter)).await?;
    log.reverse();
    let more = next.map(|_| format!("/guests?host={}", enc(&hid)));
    let since = bounded(&q.since).unwrap_or_default();
    Ok(views::host_detail(&h, &guests, more.as_deref(), &jobs, &log, &since, role))
}

/// The summary and alarms fragments (every page).
pub fn chrome(ctl: &Ctl) -> (Markup, Markup) {
    (views::summary(&ctl.reg.host_counts()), views::alarms(&ctl.reg.active_alarms()))
}

fn live_url(view: &str, raw: Option<&str>) -> String {
    match raw.filter(|r| !r.is_empty()) {
        Some(r) => format!("/live?view={view}&{}", r.chars().take(2048).collect::<String>()),
        None => format!("/live?view={view}"),
    }
}

async fn hosts(
    State(app): State<AppState>,
    Extension(s): Extension<SignedIn>,
    RawQuery(raw): RawQuery,
    q: Result<Query<HostsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(ctl) = app.leading() else { return no_ctl() };
    let q = q.map(|q| q.0).unwrap_or_default();
    let r = tokio::task::spawn_blocking(move || {
        let (summary, alarms) = chrome(&ctl);
        hosts_fragment(&ctl, &q).map(|m| (summary, alarms, m))
    })
    .await;
    match r {
        Ok(Ok((summary, alarms, main))) => html(views::page(
            "Hosts",
            &s.session,
            &live_url("hosts", raw.as_deref()),
            summary,
            alarms,
            main,
            maud::html! {},
        )),
        Ok(Err(e)) => err(&e),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn guests(
    State(app): State<AppState>,
    Extension(s): Extension<SignedIn>,
    RawQuery(raw): RawQuery,
    q: Result<Query<GuestsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(ctl) = app.leading() else { return no_ctl() };
    let q = q.map(|q| q.0).unwrap_or_default();
    let role = s.session.role;
    let r = tokio::task::spawn_blocking(move || {
        let (summary, alarms) = chrome(&ctl);
        guests_fragment(&ctl, &q, role).map(|m| (summary, alarms, m))
    })
    .await;
    match r {
        Ok(Ok((summary, alarms, main))) => html(views::page(
            "Guests",
            &s.session,
            &live_url("guests", raw.as_deref()),
            summary,
            alarms,
            main,
            if role.allows(Role::Operator) {
                views::move_dialog()
            } else {
                maud::html! {}
            },
        )),
        Ok(Err(e)) => err(&e),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn host(
    State(app): State<AppState>,
    Extension(s): Extension<SignedIn>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    q: Result<Query<HostQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(ctl) = app.leading() else { return no_ctl() };
    let q = q.map(|q| q.0).unwrap_or_default();
    let main = match host_fragment(&ctl, &id, &q, s.session.role).await {
        Ok(m) => m,
        Err(e) => return err(&e),
    };
    let (summary, alarms) = chrome(&ctl);
    let mut live = format!("/live?view=host&id={}", enc(&id));
    if let Some(r) = raw.filter(|r| !r.is_empty()) {
        live.push('&');
        live.push_str(&r.chars().take(2048).collect::<String>());
    }
    let dialogs = if s.session.role.allows(Role::Operator) {
        let hid = ctl.reg.get_host(&id).ok().and_then(|h| h.info).map(|i| i.host_id).unwrap_or_else(|| id.clone());
        let mut kinds: Vec<String> =
            ctl.reg.active_alarms().into_iter().filter(|(h, _, _)| *h == hid).map(|(_, k, _)| k).collect();
        kinds.sort();
        kinds.dedup();
        maud::html! {
            (views::status_dialog(&hid)) @if !kinds.is_empty() { (views::ack_dialog(&hid, &kinds)) }
            (views::migrate_dialog(&hid)) (views::cleanup_dialog(&hid)) (views::move_dialog())
        }
    } else {
        maud::html! {}
    };
    html(views::page(&id, &s.session, &live, summary, alarms, main, dialogs))
}

#[derive(Deserialize)]
struct StatusForm {
    #[serde(default)]
    status: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    attest_powered_off: Option<String>,
}

async fn set_status(
    State(app): State<AppState>,
    Extension(s): Extension<SignedIn>,
    Path(id): Path<String>,
    f: FormResult<StatusForm>,
) -> Response {
    let (ctl, f) = match leading_with(&app, f) {
        Ok(v) => v,
        Err(answer) => return *answer,
    };
    if f.reason.trim().is_empty() {
        return fail(StatusCode::BAD_REQUEST, "a reason is required (it is recorded in the audit log)");
    }
    let attest = f.attest_powered_off.as_deref().is_some_and(|v| v == "true" || v == "on");
    let name = &s.session.name;
    tracing::info!(operator = %name, host = %id, status = %f.status, "dashboard: host status change requested");
    if let Err(e) =
        crate::hostops::set_status(&ctl.reg, &ctl.engine, id.trim(), f.status.trim(), f.reason.trim(), attest, name)
            .await
    {
        return err(&e);
    }
    match ctl.reg.get_host(id.trim()) {
        Ok(h) => ([("x-lifeboat-done", "1")], html(views::status_done(&h))).into_response(),
        Err(e) => err(&e),
    }
}

/// The checks a status change would meet, read the way `hostops::set_status`
/// reads them (OFFLINE: the forced-migration plan's silence and power checks;
/// AVAILABLE and NOT_ACCEPTING: stale definitions, and a return from OFFLINE
/// needs the host reachable). Changes nothing; the change itself is checked again.
async fn status_checks(
    ctl: &Ctl,
    id: &str,
    to: HostStatus,
    reason: &str,
    attest: bool,
) -> Result<Vec<lifeboat_proto::v1::Check>, ControllerError> {
    use crate::domain::checks::CheckId;
    let rec = ctl.reg.get_host(id)?;
    let hid = rec.info.as_ref().map(|i| i.host_id.clone()).unwrap_or_else(|| id.to_string());
    let check = |name: &str, ok: bool, detail: String, remedy: &str| lifeboat_proto::v1::Check {
        name: name.into(),
        ok,
        detail,
        remedy: remedy.into(),
        ..Default::default()
    };
    Ok(match to {
        HostStatus::Offline => {
            let req = lifeboat_proto::v1::MigrateRequest {
                source: hid,
                attest_powered_off: attest,
                attest_reason: reason.to_string(),
                ..Default::default()
            };
            let p = ctl.engine.plan(&req).await?;
            p.preconditions
                .into_iter()
                .filter(|c| matches!(CheckId::of(c), Ok(CheckId::SourceSilent | CheckId::SourcePoweredOff)))
                .collect()
        }
        HostStatus::Available | HostStatus::NotAccepting => {
            let mut v = vec![check(
                "no stale definitions",
                rec.stale_definitions == 0,
                format!("{} definition(s) of guests moved away from it", rec.stale_definitions),
                &format!("run `lifeboat cleanup {hid} --yes` first"),
            )];
            if rec.status == HostStatus::Offline.as_str() {
                v.push(check(
                    "back from OFFLINE",
                    rec.liveness == "REACHABLE",
                    format!("the host is {}", rec.liveness.to_lowercase()),
                    "power it on and wait until it is reachable",
                ));
            }
            v
        }
        HostStatus::Maintenance => vec![],
    })
}

async fn plan_status(State(app): State<AppState>, Path(id): Path<String>, f: FormResult<StatusForm>) -> Response {
    let (ctl, f) = match leading_with(&app, f) {
        Ok(v) => v,
        Err(answer) => return *answer,
    };
    let to = match HostStatus::from_name(f.status.trim()) {
        Ok(s) => s,
        Err(e) => return fail(StatusCode::BAD_REQUEST, &format!("{e}; choose one of the four statuses")),
    };
    let attest = f.attest_powered_off.as_deref().is_some_and(|v| v == "true" || v == "on");
    match status_checks(&ctl, id.trim(), to, f.reason.trim(), attest).await {
        Ok(checks) => html(views::status_plan(id.trim(), to.as_str(), &checks)),
        Err(e) => err(&e),
    }
}

/// Jobs on the jobs page.
pub const JOBS: u32 = 25;

/// The `#live` part of `/jobs`.
pub async fn jobs_fragment(ctl: &Ctl) -> Result<Markup, ControllerError> {
    Ok(views::jobs_table(&ctl.engine.jobs(None, JOBS).await?))
}

/// The `#live` part of `/jobs/<id>`.
pub async fn job_fragment(ctl: &Ctl, id: &str) -> Result<Markup, ControllerError> {
    let j = ctl.engine.job_record(id).await?;
    let arrived: Vec<String> = j
        .moves
        .iter()
        .map(|m| {
            if m.target.is_empty() {
                return String::new();
            }
            ctl.reg
                .reported_guest(&m.target, &m.uuid)
                .map(|g| lifeboat_proto::state_name(g.state).to_string())
                .unwrap_or_default()
        })
        .collect();
    Ok(views::job_detail(&j, &arrived))
}

async fn jobs(State(app): State<AppState>, Extension(s): Extension<SignedIn>) -> Response {
    let Some(ctl) = app.leading() else { return no_ctl() };
    let main = match jobs_fragment(&ctl).await {
        Ok(m) => m,
        Err(e) => return err(&e),
    };
    let (summary, alarms) = chrome(&ctl);
    html(views::page("Jobs", &s.session, "/live?view=jobs", summary, alarms, main, maud::html! {}))
}

async fn job(State(app): State<AppState>, Extension(s): Extension<SignedIn>, Path(id): Path<String>) -> Response {
    let Some(ctl) = app.leading() else { return no_ctl() };
    let main = match job_fragment(&ctl, &id).await {
        Ok(m) => m,
        Err(e) => return err(&e),
    };
    let (summary, alarms) = chrome(&ctl);
    let live = format!("/live?view=job&id={}", enc(&id));
    html(views::page(&format!("Job {id}"), &s.session, &live, summary, alarms, main, maud::html! {}))
}

#[derive(Deserialize)]
struct AckForm {
    #[serde(default)]
    host: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    reason: String,
}

async fn ack_alarm(State(app): State<AppState>, Extension(s): Extension<SignedIn>, f: FormResult<AckForm>) -> Response {
    let (ctl, f) = match leading_with(&app, f) {
        Ok(v) => v,
        Err(answer) => return *answer,
    };
    if f.reason.trim().is_empty() {
        return fail(StatusCode::BAD_REQUEST, "a reason is required (it is recorded in the audit log)");
    }
    let name = s.session.name.clone();
    tracing::info!(operator = %name, host = %f.host, kind = %f.kind, "dashboard: alarm acknowledgement requested");
    let reg = ctl.reg.clone();
    let (host, kind) = (f.host.clone(), f.kind.clone());
    let r = tokio::task::spawn_blocking(move || crate::alarms::clear(&reg, &f.host, &f.kind, &f.reason, &name)).await;
    match r {
        Ok(Ok(cleared)) => {
            ([("x-lifeboat-done", "1")], html(views::ack_done(cleared.len(), kind.trim(), host.trim()))).into_response()
        }
        Ok(Err(e)) => err(&e),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
