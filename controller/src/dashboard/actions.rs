//! The plan-then-confirm actions: forced migration of a host, moving one
//! guest, cleanup of stale definitions. Each calls exactly what the gRPC
//! handler calls (`Engine::plan`/`Engine::start`, `hostops::cleanup_plan`/
//! `hostops::cleanup`); the confirm posts the plan id that was shown, and
//! the dashboard never sets `MigrateRequest.yes`.

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lifeboat_proto::v1::MigrateRequest;
use maud::html;
use serde::Deserialize;

use super::guard::SignedIn;
use super::routes::{FormResult, err, fail, html as page, leading_with, no_ctl};
use super::{AppState, Ctl, views};
use crate::domain::host::{HostStatus, Liveness};
use crate::error::ControllerError;
use crate::registry::HostFilter;

/// Longest text field read from an action's form.
const MAX_FIELD: usize = 500;
/// Most target options offered for a move.
pub const MAX_TARGETS: usize = 200;
/// Largest parallelism accepted from the form.
const MAX_PARALLEL: u32 = 64;

/// The refusal of a Confirm with no plan id: nothing was planned on screen.
fn no_plan_shown() -> Response {
    fail(StatusCode::BAD_REQUEST, "plan first: Confirm carries out the plan shown, and none is shown")
}

fn bad(msg: &str) -> ControllerError {
    ControllerError::InvalidArgument(msg.to_string())
}

fn field(v: &str) -> String {
    v.trim().chars().take(MAX_FIELD).collect()
}

/// The forced-migration dialog's form.
#[derive(Deserialize)]
pub struct MigrateForm {
    #[serde(default)]
    power: String,
    #[serde(default)]
    attest_typed: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    parallel: String,
    #[serde(default)]
    plan_id: String,
}

/// The request a forced migration's form asks for, checked before any call
/// (400 with what to fix): the power proof, the typed host id, the reason.
fn migrate_request(ctl: &Ctl, id: &str, f: &MigrateForm) -> Result<MigrateRequest, ControllerError> {
    let host = ctl.reg.get_host(id.trim())?;
    let hid = host.info.map(|i| i.host_id).unwrap_or_else(|| id.trim().to_string());
    let reason = field(&f.reason);
    let (fence, attest) = match f.power.trim() {
        "fence" => (true, false),
        "attest" => {
            if f.attest_typed.trim() != hid {
                return Err(bad(&format!(
                    "the typed host id does not match: type {hid} exactly to attest it is powered off"
                )));
            }
            if reason.is_empty() {
                return Err(bad("an attestation needs a reason (recorded in the audit log)"));
            }
            (false, true)
        }
        _ => {
            return Err(bad("choose how the host is proven powered off: fence (BMC power-off) or attest"));
        }
    };
    let parallel = match f.parallel.trim() {
        "" => 0,
        p => match p.parse::<u32>() {
            Ok(n) if (1..=MAX_PARALLEL).contains(&n) => n,
            _ => {
                return Err(bad(&format!(
                    "parallelism {:?}: use a number from 1 to {MAX_PARALLEL}, or leave it empty",
                    field(p)
                )));
            }
        },
    };
    let target = field(&f.target);
    let mut cmd = format!("dashboard: migrate --force --from {hid}");
    if fence {
        cmd.push_str(" --fence");
    } else {
        cmd.push_str(" --attest-powered-off");
    }
    if !target.is_empty() {
        cmd.push_str(&format!(" --to {target}"));
    }
    if parallel > 0 {
        cmd.push_str(&format!(" --parallel {parallel}"));
    }
    Ok(MigrateRequest {
        source: hid,
        target,
        fence,
        attest_powered_off: attest,
        attest_reason: if attest { reason } else { String::new() },
        parallel,
        plan_id: field(&f.plan_id),
        command_line: cmd,
        ..Default::default()
    })
}

/// Plans (changes nothing) and renders the plan with its id.
async fn plan_and_render(ctl: &Ctl, req: &MigrateRequest) -> Response {
    match ctl.engine.plan(req).await {
        Ok(p) => page(views::migration_plan(&p)),
        Err(e) => err(&e),
    }
}

/// Starts exactly the reviewed plan; a refusal comes back with the plan as
/// it is now (nothing was changed).
async fn start_and_answer(ctl: &Ctl, mut req: MigrateRequest, name: &str) -> Response {
    if req.plan_id.is_empty() {
        return no_plan_shown();
    }
    req.yes = false;
    tracing::info!(operator = %name, source = %req.source, plan = %req.plan_id, "dashboard: migration requested");
    match ctl.engine.start(req.clone(), name).await {
        Ok(job) => {
            let to = format!("/jobs/{}", job.id);
            let body = html! { div.done { "Job " a href=(to) { code { (job.id) } } " started." } };
            (StatusCode::OK, [("x-lifeboat-location", to.as_str())], page(body)).into_response()
        }
        Err(e) => {
            tracing::info!(operator = %name, "dashboard: migration refused: {e}");
            let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let now = match &e {
                ControllerError::Refused(_) => {
                    req.plan_id.clear();
                    ctl.engine.plan(&req).await.ok()
                }
                _ => None,
            };
            let body = html! {
                (views::refusal(&e.to_string()))
                @if let Some(p) = &now { h3 { "The plan as it is now" } (views::migration_plan(p)) }
            };
            (status, page(body)).into_response()
        }
    }
}

/// `POST /hosts/<id>/migrate/plan`.
pub async fn plan_migrate(State(app): State<AppState>, Path(id): Path<String>, f: FormResult<MigrateForm>) -> Response {
    let (ctl, f) = match leading_with(&app, f) {
        Ok(v) => v,
        Err(answer) => return *answer,
    };
    match migrate_request(&ctl, &id, &f) {
        Ok(req) => plan_and_render(&ctl, &req).await,
        Err(e) => err(&e),
    }
}

/// `POST /hosts/<id>/migrate`.
pub async fn start_migrate(
    State(app): State<AppState>,
    Extension(s): Extension<SignedIn>,
    Path(id): Path<String>,
    f: FormResult<MigrateForm>,
) -> Response {
    let (ctl, f) = match leading_with(&app, f) {
        Ok(v) => v,
        Err(answer) => return *answer,
    };
    match migrate_request(&ctl, &id, &f) {
        Ok(mut req) => {
            req.command_line.push_str(&format!(" --plan {}", req.plan_id));
            start_and_answer(&ctl, req, &s.session.name).await
        }
        Err(e) => err(&e),
    }
}

/// The move dialog's form.
#[derive(Deserialize)]
pub struct MoveForm {
    #[serde(default)]
    from: String,
    #[serde(default)]
    vm: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    plan_id: String,
}

/// A planned move of one guest, as `lifeboat move --vm U --from H --to T` builds it.
fn move_request(f: &MoveForm) -> Result<MigrateRequest, ControllerError> {
    let (from, vm, target) = (field(&f.from), field(&f.vm), field(&f.target));
    if from.is_empty() || vm.is_empty() {
        return Err(bad("which guest, on which host? open the dialog from a guest's Move button"));
    }
    if target.is_empty() {
        return Err(bad("choose a target host"));
    }
    Ok(MigrateRequest {
        command_line: format!("dashboard: move --vm {vm} --from {from} --to {target}"),
        source: from,
        target,
        vms: vec![vm],
        planned_move: true,
        plan_id: field(&f.plan_id),
        ..Default::default()
    })
}

/// `POST /guests/move/plan`.
pub async fn plan_move(State(app): State<AppState>, f: FormResult<MoveForm>) -> Response {
    let (ctl, f) = match leading_with(&app, f) {
        Ok(v) => v,
        Err(answer) => return *answer,
    };
    match move_request(&f) {
        Ok(req) => plan_and_render(&ctl, &req).await,
        Err(e) => err(&e),
    }
}

/// `POST /guests/move`.
pub async fn start_move(
    State(app): State<AppState>,
    Extension(s): Extension<SignedIn>,
    f: FormResult<MoveForm>,
) -> Response {
    let (ctl, f) = match leading_with(&app, f) {
        Ok(v) => v,
        Err(answer) => return *answer,
    };
    match move_request(&f) {
        Ok(mut req) => {
            req.command_line.push_str(&format!(" --plan {}", req.plan_id));
            start_and_answer(&ctl, req, &s.session.name).await
        }
        Err(e) => err(&e),
    }
}

/// The query of `GET /targets`.
#[derive(Deserialize)]
pub struct TargetsQuery {
    #[serde(default)]
    from: String,
}

/// The hosts a guest of `from` may be moved to: reachable AVAILABLE hosts,
/// then reachable NOT_ACCEPTING ones (`false`), at most [`MAX_TARGETS`].
pub fn target_list(ctl: &Ctl, from: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for status in [HostStatus::Available, HostStatus::NotAccepting] {
        let f = HostFilter { status: Some(status), liveness: Some(Liveness::Reachable), ..Default::default() };
        let page = ctl.reg.hosts_page(&f, None, MAX_TARGETS + 1);
        for h in page.rows {
            let id = h.info.map(|i| i.host_id).unwrap_or_default();
            if !id.is_empty() && id != from && out.len() < MAX_TARGETS {
                out.push((id, status == HostStatus::Available));
            }
        }
    }
    out
}

/// `GET /targets?from=H`: `<option>` elements for the move dialog.
pub async fn targets(
    State(app): State<AppState>,
    q: Result<Query<TargetsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(ctl) = app.leading() else { return no_ctl() };
    let from = q.map(|q| field(&q.0.from)).unwrap_or_default();
    match tokio::task::spawn_blocking(move || target_list(&ctl, &from)).await {
        Ok(list) => page(views::target_options(&list)),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The cleanup dialog's form.
#[derive(Deserialize)]
pub struct CleanupForm {
    #[serde(default)]
    plan_id: String,
}

/// `POST /hosts/<id>/cleanup/plan` (running stale copies are refused, never destroyed).
pub async fn plan_cleanup(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(ctl) = app.leading() else { return no_ctl() };
    match crate::hostops::cleanup_plan(&ctl.reg, id.trim(), false).await {
        Ok(p) => page(views::cleanup_plan(&p, false)),
        Err(e) => err(&e),
    }
}

/// `POST /hosts/<id>/cleanup`: carries out exactly the plan id shown.
pub async fn cleanup(
    State(app): State<AppState>,
    Extension(s): Extension<SignedIn>,
    Path(id): Path<String>,
    f: FormResult<CleanupForm>,
) -> Response {
    let (ctl, f) = match leading_with(&app, f) {
        Ok(v) => v,
        Err(answer) => return *answer,
    };
    let plan_id = field(&f.plan_id);
    if plan_id.is_empty() {
        return no_plan_shown();
    }
    let name = &s.session.name;
    tracing::info!(operator = %name, host = %id, plan = %plan_id, "dashboard: cleanup requested");
    match crate::hostops::cleanup(&ctl.reg, id.trim(), false, &plan_id, name).await {
        Ok(p) => page(views::cleanup_plan(&p, true)),
        Err(e) => {
            let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let now = crate::hostops::cleanup_plan(&ctl.reg, id.trim(), false).await.ok();
            let body = html! {
                (views::refusal(&e.to_string()))
                @if let Some(p) = &now { h3 { "The plan as it is now" } (views::cleanup_plan(p, false)) }
            };
            (status, page(body)).into_response()
        }
    }
}
