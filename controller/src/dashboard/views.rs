//! The dashboard's HTML, as maud templates: escaped by default; fragments
//! are plain functions shared by full pages and live updates. No inline
//! script or style anywhere (the CSP forbids it): data goes in `data-*`.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use lifeboat_common::identity::Role;
use lifeboat_proto::v1::{GuestRecord, HostRecord, JobRecord};
use maud::{DOCTYPE, Markup, html};
use sha2::{Digest, Sha256};

use super::auth::Session;
use crate::domain::host::HostStatus;
use crate::ports::AuditRow;

/// The script, stylesheet and icon, embedded.
pub const APP_JS: &str = include_str!("assets/app.js");
/// The stylesheet.
pub const APP_CSS: &str = include_str!("assets/app.css");
/// The icon.
pub const FAVICON: &str = include_str!("assets/favicon.svg");

/// `?v=` of each asset: the first 12 hex of its SHA-256 (cache busting).
pub static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut h = Sha256::new();
    h.update(APP_JS);
    h.update(APP_CSS);
    h.update(FAVICON);
    h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
});

/// What each status means, with its colour class (the set-status dialog and docs).
pub const STATUS_HELP: [(HostStatus, &str); 4] = [
    (HostStatus::Available, "Green: a target for new and migrated guests."),
    (
        HostStatus::NotAccepting,
        "Yellow: no automatic placement (e.g. a test host); an operator may still name it as a move's target.",
    ),
    (HostStatus::Maintenance, "Red: nothing is placed there; its guests are to be moved away."),
    (
        HostStatus::Offline,
        "Grey: declared dead; its guests are to be recreated elsewhere. Refused unless the host is silent \
         (or attested powered off).",
    ),
];

fn head(title: &str, csrf: Option<&str>) -> Markup {
    let v = ASSET_VERSION.as_str();
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            @if let Some(c) = csrf { meta name="lifeboat-csrf" content=(c); }
            title { (title) " · Lifeboat" }
            link rel="icon" href={ "/assets/favicon.svg?v=" (v) };
            link rel="stylesheet" href={ "/assets/app.css?v=" (v) };
            script src={ "/assets/app.js?v=" (v) } defer {}
        }
    }
}

/// A whole page for a signed-in browser. `live` is the page's `/live` URL;
/// `summary`, `alarms` and `main` fill `#summary`, `#alarms` and `#live`.
pub fn page(
    title: &str,
    s: &Session,
    live: &str,
    summary: Markup,
    alarms: Markup,
    main: Markup,
    dialogs: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, Some(&s.csrf)))
            body data-live=(live) {
                header.top {
                    a.brand href="/hosts" { "Lifeboat" }
                    nav { a href="/hosts" { "Hosts" } a href="/guests" { "Guests" } a href="/jobs" { "Jobs" } }
                    span.user { (s.name) " (" (s.role) ")" }
                    form.post.signout method="post" action="/logout" { button type="submit" { "Sign out" } }
                }
                div #summary { (summary) }
                div #alarms { (alarms) }
                main { h1 { (title) } div #live { (main) } }
                div #dialogs { (dialogs) }
            }
        }
    }
}

/// A page with no session (login, errors).
pub fn plain(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, None))
            body { main.plain { h1 { (title) } (body) } }
        }
    }
}

/// The sign-in page: its form is submitted on load by app.js.
pub fn login(token: &str) -> Markup {
    plain(
        "Signing in",
        html! {
            form name="login" method="post" action="/login" {
                input type="hidden" name="token" value=(token);
                p { "Signing you in… If nothing happens, press the button." }
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// A link that was used or expired (410).
pub fn link_gone() -> Markup {
    plain(
        "Sign-in link not valid",
        html! { p { "This link was used or has expired: run " code { "lifeboat dashboard login" } " again." } },
    )
}

/// A sign-in link refused for another reason than use or age: `why`.
pub fn link_refused(why: &str) -> Markup {
    plain("Sign-in link not valid", html! { p { (why) } })
}

/// Signed out (or never signed in).
pub fn signed_out() -> Markup {
    plain(
        "Signed out",
        html! {
            p {
                "To sign in, run " code { "lifeboat dashboard login" }
                " and open the link it prints (it works once, within 60 s)."
            }
        },
    )
}

/// The page a link from another site gets: it loads the same address again
/// at once (`Refresh: 0`), now from this site, with the session cookie.
/// `here` is the page's own path and query, linked for a browser that does
/// not follow `Refresh`.
pub fn reopening(here: &str) -> Markup {
    plain("Opening", html! { p { "Opening the dashboard… " a href=(here) { "Open it" } } })
}

/// A follower with no leader to send the browser to (503, refreshed every 2 s).
pub fn no_leader() -> Markup {
    plain("No leader", html! { p { "No controller leads the pool right now; this page tries again every 2 seconds." } })
}

/// A refusal: the error's text (failed checks and what to do).
pub fn refusal(msg: &str) -> Markup {
    html! { div.refusal { pre { (msg) } } }
}

/// A badge in the status's colour.
pub fn status_badge(status: &str) -> Markup {
    html! { span class={ "status-badge status-" (status) } { (status) } }
}

fn liveness_text(l: &str) -> String {
    l.to_lowercase()
}

/// The `.liveness` cell: reachable / unreachable, coloured by class.
fn liveness(l: &str) -> Markup {
    let t = liveness_text(l);
    html! { span class={ "liveness liveness-" (t) } { (t) } }
}

/// `<time>` that app.js shows as "N s ago".
fn ago(ms: i64) -> Markup {
    if ms <= 0 {
        return html! { span.never { "never" } };
    }
    html! { time data-ms=(ms) { (ms) } }
}

fn mib(kib: u64) -> String {
    format!("{} MiB", kib / 1024)
}

/// The counts at the top of every page.
pub fn summary(counts: &BTreeMap<(&'static str, &'static str), u32>) -> Markup {
    let total: u32 = counts.values().sum();
    html! {
        ul.counts {
            li { span.count { (total) } " hosts" }
            @for s in HostStatus::ALL {
                @let n: u32 = counts.iter().filter(|((st, _), _)| *st == s.as_str()).map(|(_, n)| n).sum();
                li { (status_badge(s.as_str())) " " span.count data-status=(s.as_str()) { (n) } }
            }
            @let down: u32 = counts.iter().filter(|((_, l), _)| *l == "UNREACHABLE").map(|(_, n)| n).sum();
            li.unreachable { span.count { (down) } " unreachable" }
        }
    }
}

/// The alarms banner (empty when there is none).
pub fn alarms(active: &[(String, String, String)]) -> Markup {
    html! {
        @if !active.is_empty() {
            div.alarm-banner role="alert" {
                strong { (active.len()) " active alarm" @if active.len() != 1 { "s" } }
                ul {
                    @for (host, kind, detail) in active.iter().take(20) {
                        li { a href={ (host_path(host)) } { (host) } ": " span.kind { (kind) } " — " (detail) }
                    }
                }
                @if active.len() > 20 { p { "… and " (active.len() - 20) " more (" code { "lifeboat alarms" } ")" } }
            }
        }
    }
}

/// The hosts table with its next-page link.
pub fn hosts_table(rows: &[HostRecord], matching: usize, next: Option<&str>) -> Markup {
    html! {
        p.matching { (matching) " matching" }
        table #hosts {
            thead {
                tr {
                    th { "Host" } th { "Status" } th { "Liveness" } th { "Last seen" }
                    th { "Guests running / defined" } th { "Memory free / total" } th { "Alarms" }
                }
            }
            tbody {
                @for h in rows {
                    @let info = h.info.clone().unwrap_or_default();
                    tr data-host=(info.host_id) {
                        td {
                            a href={ (host_path(&info.host_id)) } { (info.host_id) }
                            @if info.hostname != info.host_id && !info.hostname.is_empty() {
                                br; small { (info.hostname) }
                            }
                        }
                        td {
                            (status_badge(&h.status))
                            @if !h.status_reason.is_empty() { br; small.reason { (h.status_reason) } }
                        }
                        td { (liveness(&h.liveness)) }
                        td { (ago(h.last_seen_unix_ms)) }
                        td { (h.running_count) " / " (h.guest_count) }
                        td { (mib(info.memory_free_kib)) " / " (mib(info.memory_total_kib)) }
                        td.alarms { @for a in &h.alarms { div.alarm { (a) } } }
                    }
                }
            }
        }
        @if let Some(n) = next { a.next href=(n) { "Next page →" } }
    }
}

/// The guests table with its next-page link.
pub fn guests_table(rows: &[GuestRecord], next: Option<&str>) -> Markup {
    html! {
        table #guests {
            thead {
                tr {
                    th { "Guest" } th { "State" } th { "Runs on" } th { "Owned by" } th { "Desired" }
                    th { "vCPUs" } th { "Memory" }
                }
            }
            tbody {
                @for r in rows {
                    @let g = r.guest.clone().unwrap_or_default();
                    tr data-uuid=(g.uuid) {
                        td { (g.name) br; small.uuid { (g.uuid) } }
                        td.state { (if r.missing { "missing" } else { lifeboat_proto::state_name(g.state) }) }
                        td.runs-on { a href={ (host_path(&r.host_id)) } { (r.host_id) } }
                        td.owned-by { (r.owner_host) }
                        td { (r.desired_state) }
                        td { (g.vcpus) }
                        td { (mib(g.memory_kib)) }
                    }
                }
            }
        }
        @if let Some(n) = next { a.next href=(n) { "Next page →" } }
    }
}

/// One host's page body; `since` is the action log's filter as given
/// (shown in its field).
pub fn host_detail(
    h: &HostRecord,
    guests: &[GuestRecord],
    guests_next: Option<&str>,
    jobs: &[JobRecord],
    log: &[AuditRow],
    since: &str,
    role: Role,
) -> Markup {
    let info = h.info.clone().unwrap_or_default();
    html! {
        section.facts {
            @if role.allows(Role::Operator) {
                button type="button" data-action="set-status" data-dialog="status-dialog" { "Set status…" }
                @if !h.alarms.is_empty() {
                    " "
                    button type="button" data-action="ack-alarm" data-dialog="ack-dialog" { "Acknowledge an alarm…" }
                }
                " "
                button type="button" data-action="migrate" data-dialog="migrate-dialog" { "Forced migration…" }
                @if h.stale_definitions > 0 {
                    " "
                    button type="button" data-action="cleanup" data-dialog="cleanup-dialog" { "Clean up…" }
                }
            }
            table.facts #host data-host=(info.host_id) {
                tr {
                    th { "Status" }
                    td {
                        (status_badge(&h.status))
                        @if !h.status_reason.is_empty() { " " span.reason { (h.status_reason) } }
                    }
                }
                tr { th { "Liveness" } td { (liveness(&h.liveness)) } }
                tr { th { "Last seen" } td { (ago(h.last_seen_unix_ms)) } }
                tr { th { "Hostname" } td { (info.hostname) } }
                tr { th { "CPUs" } td { (info.cpus) " × " (info.cpu_model) } }
                tr {
                    th { "Memory free / total" }
                    td { (mib(info.memory_free_kib)) " / " (mib(info.memory_total_kib)) }
                }
                tr { th { "Reserved by moves" } td { (mib(h.reserved_memory_kib)) } }
                tr { th { "Guests running / defined" } td { (h.running_count) " / " (h.guest_count) } }
                tr { th { "Waiting guests" } td { (h.waiting_guests) } }
                tr {
                    th { "Stale definitions" }
                    td.stale {
                        (h.stale_definitions)
                        @if h.stale_definitions > 0 { " (" code { "lifeboat cleanup " (info.host_id) } ")" }
                    }
                }
                tr {
                    th { "libvirt" }
                    td {
                        (info.libvirt_version)
                        @if !info.libvirt_error.is_empty() { " — " span.error { (info.libvirt_error) } }
                    }
                }
                tr {
                    th { "Lock manager" }
                    td { (if info.lock_manager.is_empty() { "none" } else { info.lock_manager.as_str() }) }
                }
                tr { th { "Agent" } td { (info.agent_version) } }
                tr { th { "Boot id" } td { code { (info.boot_id) } } }
                tr { th { "Alarms" } td { @for a in &h.alarms { div.alarm { (a) } } } }
            }
        }
        section { h2 { "Guests" } (guests_table_for(guests, guests_next, role)) }
        section {
            h2 { "Jobs" }
            table #jobs {
                (jobs_head())
                tbody {
                    @for j in jobs {
                        (job_row(j))
                    }
                }
            }
        }
        section {
            h2 { "Action log" }
            form.since method="get" {
                label {
                    "Since "
                    input type="text" name="since" value=(since) maxlength="64" placeholder="RFC 3339 or unix ms";
                }
                button type="submit" { "Show" }
            }
            table #log {
                thead { tr { th { "When" } th { "Who" } th { "What" } th { "Guest" } th { "Detail" } } }
                tbody {
                    @for a in log {
                        tr {
                            td { (ago(a.at_ms)) } td.actor { (a.actor) } td { (a.action) } td { (a.vm) }
                            td { (a.detail) }
                        }
                    }
                }
            }
        }
    }
}

/// `/hosts/<id>` with the id percent-encoded: a name holding `/`, `?`,
/// `#` or `..` cannot make a link or action point elsewhere.
pub fn host_path(id: &str) -> String {
    format!("/hosts/{}", super::routes::enc(id))
}

/// The end of a plan-then-confirm dialog `<what>-dialog`: where the plan
/// or the answer shows (`.result`), Cancel, Plan (posts to `plan_url`,
/// `data-action=plan-<what>`) and the confirm button
/// (`data-action=confirm-<what>`, posts to the form's action).
fn plan_confirm(what: &str, plan_url: &str, confirm: &str) -> Markup {
    html! {
        div.result {}
        div.buttons {
            button type="button" data-close={ (what) "-dialog" } { "Cancel" }
            button type="submit" data-action={ "plan-" (what) } formaction=(plan_url) { "Plan" }
            button type="submit" data-action={ "confirm-" (what) } { (confirm) }
        }
    }
}

/// The set-status dialog: the four statuses explained in their colours.
pub fn status_dialog(host: &str) -> Markup {
    html! {
        dialog #status-dialog {
            form.post method="post" action={ (host_path(host)) "/status" } {
                h2 { "Set the status of " (host) }
                @for (s, help) in STATUS_HELP {
                    label.status-help data-status=(s.as_str()) {
                        input type="radio" name="status" value=(s.as_str()) required;
                        " " (status_badge(s.as_str())) " " (help)
                    }
                }
                label {
                    "Reason (recorded in the audit log) "
                    input type="text" name="reason" required maxlength="500";
                }
                label {
                    input type="checkbox" name="attest_powered_off" value="true";
                    " I attest that this host is powered off (OFFLINE of a host that is not silent)"
                }
                (plan_confirm("status", &format!("{}/status/plan", host_path(host)), "Set status"))
            }
        }
    }
}

/// The answer of a successful status change.
pub fn status_done(h: &HostRecord) -> Markup {
    html! { div.done { "Status is now " (status_badge(&h.status)) } }
}

fn jobs_head() -> Markup {
    html! {
        thead { tr { th { "Job" } th { "Kind" } th { "Source" } th { "State" } th { "Operator" } th { "Created" } } }
    }
}

fn job_row(j: &JobRecord) -> Markup {
    html! {
        tr data-job=(j.id) data-job-state=(j.state) {
            td { a href={ "/jobs/" (j.id) } { code { (j.id) } } }
            td { (j.kind) }
            td { a href={ (host_path(&j.source)) } { (j.source) } }
            td.job-state { (j.state) }
            td { (j.operator) }
            td { (ago(j.created_unix_ms)) }
        }
    }
}

/// The newest jobs.
pub fn jobs_table(jobs: &[JobRecord]) -> Markup {
    html! {
        table #jobs {
            (jobs_head())
            tbody { @for j in jobs { (job_row(j)) } }
        }
    }
}

/// One job: its facts and each guest's move, with the state the target
/// last reported for it (`arrived`).
pub fn job_detail(j: &JobRecord, arrived: &[String]) -> Markup {
    html! {
        table.facts #job data-job=(j.id) data-job-state=(j.state) {
            tr { th { "State" } td.job-state { (j.state) } }
            tr { th { "Kind" } td { (j.kind) } }
            tr { th { "Source" } td { a href={ (host_path(&j.source)) } { (j.source) } } }
            tr { th { "Operator" } td { (j.operator) } }
            tr { th { "Power evidence" } td { (j.power_evidence) } }
            tr { th { "Plan" } td { code { (j.plan_id) } } }
            tr { th { "Created" } td { (ago(j.created_unix_ms)) } }
            tr { th { "Updated" } td { (ago(j.updated_unix_ms)) } }
            @if !j.paused.is_empty() { tr { th { "Paused" } td.error { (j.paused) } } }
            @if !j.error.is_empty() { tr { th { "Left behind" } td { pre.error { (j.error) } } } }
        }
        h2 { "Moves" }
        table #moves {
            thead {
                tr { th { "Guest" } th { "Target" } th { "Step" } th { "Arrived" } th { "Error" } th { "Updated" } }
            }
            tbody {
                @for (i, m) in j.moves.iter().enumerate() {
                    tr.move data-uuid=(m.uuid) data-move-state=(m.state) {
                        td { (m.name) br; small.uuid { (m.uuid) } }
                        td.target { @if !m.target.is_empty() { a href={ (host_path(&m.target)) } { (m.target) } } }
                        td.step { span class={ "step step-" (m.state) } { (m.state) } }
                        td.arrived { (arrived.get(i).map(String::as_str).unwrap_or("")) }
                        td.error { (m.error) }
                        td { (ago(m.updated_unix_ms)) }
                    }
                }
            }
        }
    }
}

/// What a status change would check, before it is made (nothing changes).
pub fn status_plan(host: &str, to: &str, checks: &[lifeboat_proto::v1::Check]) -> Markup {
    let ok = checks.iter().all(|c| c.ok);
    html! {
        div.plan data-host=(host) data-status=(to) data-ok=(ok) {
            p { (host) " → " (status_badge(to)) ": "
                @if ok { "every check passes; press Set status to make the change." }
                @else { "refused as things stand; nothing was changed." }
            }
            @if checks.is_empty() { p { "No checks apply to this change." } }
            ul.checks {
                @for c in checks {
                    li class={ "check " (if c.ok { "ok" } else { "failed" }) } {
                        strong { (c.name) } ": " (c.detail)
                        @if !c.ok && !c.remedy.is_empty() { br; span.remedy { "What to do: " (c.remedy) } }
                    }
                }
            }
        }
    }
}

/// The dialog that acknowledges (clears) one kind of a host's active alarms.
pub fn ack_dialog(host: &str, kinds: &[String]) -> Markup {
    html! {
        dialog #ack-dialog {
            form.post method="post" action="/alarms/ack" {
                h2 { "Acknowledge an alarm on " (host) }
                p { "Clears every active alarm of the kind on this host; recorded in the audit log under your name." }
                input type="hidden" name="host" value=(host);
                label { "Alarm " select name="kind" required { @for k in kinds { option value=(k) { (k) } } } }
                label {
                    "Reason (recorded in the audit log) "
                    input type="text" name="reason" required maxlength="2048";
                }
                div.result {}
                div.buttons {
                    button type="button" data-close="ack-dialog" { "Cancel" }
                    button type="submit" data-action="confirm-ack" { "Acknowledge" }
                }
            }
        }
    }
}

/// The answer of acknowledged alarms.
pub fn ack_done(n: usize, kind: &str, host: &str) -> Markup {
    html! { div.done { (n) " " (kind) " alarm(s) on " (host) " cleared." } }
}

/// The guests table with a "Move…" button per guest for operators.
pub fn guests_table_for(rows: &[GuestRecord], next: Option<&str>, role: Role) -> Markup {
    if !role.allows(Role::Operator) {
        return guests_table(rows, next);
    }
    html! {
        table #guests {
            thead {
                tr {
                    th { "Guest" } th { "State" } th { "Runs on" } th { "Owned by" } th { "Desired" }
                    th { "vCPUs" } th { "Memory" } th { "Actions" }
                }
            }
            tbody {
                @for r in rows {
                    @let g = r.guest.clone().unwrap_or_default();
                    tr data-uuid=(g.uuid) {
                        td { (g.name) br; small.uuid { (g.uuid) } }
                        td.state { (if r.missing { "missing" } else { lifeboat_proto::state_name(g.state) }) }
                        td.runs-on { a href=(host_path(&r.host_id)) { (r.host_id) } }
                        td.owned-by { (r.owner_host) }
                        td { (r.desired_state) }
                        td { (g.vcpus) }
                        td { (mib(g.memory_kib)) }
                        td.actions {
                            button type="button" data-action="move-guest" data-dialog="move-dialog"
                                data-uuid=(g.uuid) data-name=(g.name) data-from=(r.host_id) { "Move…" }
                        }
                    }
                }
            }
        }
        @if let Some(n) = next { a.next href=(n) { "Next page →" } }
    }
}

fn checks_list(checks: &[lifeboat_proto::v1::Check]) -> Markup {
    html! {
        ul.checks {
            @for c in checks {
                li class={ "check " (if c.ok { "ok" } else { "failed" }) } {
                    strong { (c.name) } ": " (c.detail)
                    @if !c.ok && !c.remedy.is_empty() { br; span.remedy { "What to do: " (c.remedy) } }
                }
            }
        }
    }
}

/// A forced-migration or move plan: its checks, the power evidence and each
/// guest with its target. The hidden `plan_id` sits inside the dialog's form,
/// so the confirm button posts exactly this plan.
pub fn migration_plan(p: &lifeboat_proto::v1::MigrationPlan) -> Markup {
    html! {
        div.plan #migrate-plan data-plan-id=(p.plan_id) data-executable=(p.executable) {
            input type="hidden" name="plan_id" value=(p.plan_id);
            p.summary { (p.summary) }
            p { "Plan " code.plan-id { (p.plan_id) } ": "
                @if p.executable { "every check passes; press Confirm to carry out exactly this plan." }
                @else { "refused as things stand; nothing was changed." }
            }
            p.evidence { "Power evidence: "
                span.power-evidence { (if p.power_evidence.is_empty() { "none" } else { p.power_evidence.as_str() }) }
            }
            (checks_list(&p.preconditions))
            table.plan-guests {
                thead { tr { th { "Guest" } th { "Target" } th { "Why" } th { "Checks" } } }
                tbody {
                    @for g in &p.guests {
                        tr data-uuid=(g.uuid) data-movable=(g.movable) {
                            td { (g.name) br; small.uuid { (g.uuid) } }
                            td.target { @if g.target.is_empty() { "—" } @else { (g.target) } }
                            td { (g.reason) }
                            td { (checks_list(&g.checks)) }
                        }
                    }
                }
            }
        }
    }
}

fn power_choice() -> Markup {
    html! {
        fieldset.power {
            legend { "How is the host proven powered off?" }
            label {
                input type="radio" name="power" value="fence" required;
                " Fence: power it off through its BMC first"
            }
            label {
                input type="radio" name="power" value="attest" required;
                " I attest that it is powered off (type the host id below)"
            }
            label { "Host id, typed " input type="text" name="attest_typed" maxlength="256" autocomplete="off"; }
        }
    }
}

/// The forced-migration dialog of a host's page.
pub fn migrate_dialog(host: &str) -> Markup {
    html! {
        dialog #migrate-dialog {
            form.post method="post" action={ (host_path(host)) "/migrate" } {
                h2 { "Forced migration of " (host) }
                p { "Recreates every guest of this silent host elsewhere. Plan first; Confirm carries out the plan shown." }
                (power_choice())
                label {
                    "Reason (recorded in the audit log) "
                    input type="text" name="reason" maxlength="500";
                }
                label { "Target host (empty: choose) " input type="text" name="target" maxlength="256"; }
                label { "Parallelism (empty: default) " input type="number" name="parallel" min="1" max="64"; }
                (plan_confirm("migrate", &format!("{}/migrate/plan", host_path(host)), "Confirm"))
            }
        }
    }
}

/// The move-one-guest dialog (guests page and host page); app.js fills
/// `from`, `vm` and the target list from the pressed button.
pub fn move_dialog() -> Markup {
    html! {
        dialog #move-dialog {
            form.post method="post" action="/guests/move" {
                h2 { "Move " span.move-name {} }
                input type="hidden" name="from" value="";
                input type="hidden" name="vm" value="";
                label { "Target " select name="target" required { option value="" { "(loading…)" } } }
                (plan_confirm("move", "/guests/move/plan", "Confirm"))
            }
        }
    }
}

/// The target options of a move (`GET /targets?from=`).
pub fn target_options(targets: &[(String, bool)]) -> Markup {
    html! {
        option value="" { "(choose a target)" }
        @for (id, accepting) in targets {
            option value=(id) {
                (id) @if !accepting { " (NOT ACCEPTING — test host)" }
            }
        }
    }
}

/// The cleanup dialog of a host's page.
pub fn cleanup_dialog(host: &str) -> Markup {
    html! {
        dialog #cleanup-dialog {
            form.post method="post" action={ (host_path(host)) "/cleanup" } {
                h2 { "Clean up stale definitions on " (host) }
                p { "Removes the definitions of guests that were moved away. Plan first; Confirm carries out the plan shown." }
                (plan_confirm("cleanup", &format!("{}/cleanup/plan", host_path(host)), "Confirm"))
            }
        }
    }
}

/// A cleanup plan (or its result): checks and each definition with what
/// happens (or happened) to it.
pub fn cleanup_plan(p: &lifeboat_proto::v1::CleanupPlan, done: bool) -> Markup {
    html! {
        div.plan #cleanup-plan data-plan-id=(p.plan_id) data-executable=(p.executable) data-done=(done) {
            @if !done { input type="hidden" name="plan_id" value=(p.plan_id); }
            p.summary { (p.summary) }
            @if !done {
                p { "Plan " code.plan-id { (p.plan_id) } ": "
                    @if p.executable { "every check passes; press Confirm to carry out exactly this plan." }
                    @else { "refused as things stand; nothing was changed." }
                }
            }
            (checks_list(&p.preconditions))
            table.cleanup-items {
                thead { tr { th { "Guest" } th { "Moved to" } th { "State here" } th { "Action" } th { "Detail" } } }
                tbody {
                    @for i in &p.items {
                        tr data-uuid=(i.uuid) data-cleanup-action=(i.action) {
                            td { (i.name) br; small.uuid { (i.uuid) } }
                            td { (i.moved_to) } td { (i.state) } td.cleanup-action { (i.action) } td { (i.detail) }
                        }
                    }
                }
            }
        }
    }
}
