//! The dashboard's middlewares: security headers on every response, the
//! leader check, the session check, and the POST guard (Origin or
//! `Sec-Fetch-Site`, CSRF token, role). Every refusal changes nothing and
//! says which check failed.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lifeboat_common::identity::Role;
use subtle::ConstantTimeEq;

use super::auth::{Session, session_cookie};
use super::{AppState, views};
use crate::ha::election::LeaderHint;

/// The Content-Security-Policy of every response: our own script and style only.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The header carrying the CSRF token.
pub const CSRF_HEADER: &str = "x-lifeboat-csrf";

/// Adds the security headers to every response.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, "content-security-policy", CSP);
    set(h, "x-frame-options", "DENY");
    set(h, "x-content-type-options", "nosniff");
    // Not `no-referrer`: under it browsers send `Origin: null` with a
    // same-origin POST, and the Origin check could not tell it from a
    // sandboxed or cross-site one. `same-origin` sends nothing elsewhere.
    set(h, "referrer-policy", "same-origin");
    set(h, "strict-transport-security", "max-age=31536000");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    res
}

/// Where a follower sends a request: the leader's host on `port`, with the
/// request's path and query. `None` when the URL has no host.
pub fn leader_location(leader_url: &str, port: u16, path_q: &str) -> Option<String> {
    let uri: axum::http::Uri = leader_url.parse().ok()?;
    let host = uri.host()?;
    // http::Uri keeps IPv6 brackets in host().
    Some(format!("https://{host}:{port}{path_q}"))
}

/// Whether two controller URLs name the same host and port.
pub fn same_controller(a: &str, b: &str) -> bool {
    let parse = |u: &str| {
        let uri: axum::http::Uri = u.trim().parse().ok()?;
        let port = uri.port_u16().unwrap_or(443);
        Some((uri.host()?.to_ascii_lowercase(), port))
    };
    matches!((parse(a), parse(b)), (Some(x), Some(y)) if x == y)
}

/// Serves only while this process leads: a follower answers 307 to the
/// leader (same dashboard port) or 503 while there is none.
pub async fn leader_only(State(app): State<AppState>, req: Request, next: Next) -> Response {
    if app.leading().is_some() {
        return next.run(req).await;
    }
    let path_q = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let hint = app.hint.as_ref().map(|h| h.borrow().clone());
    // The hint naming this very process (not loaded yet, or leadership just
    // lost): a redirect would point at itself, a loop; wait instead.
    if let Some(LeaderHint::Leader(url, _)) = hint
        && !app.advertise_url.get().is_some_and(|own| same_controller(own, &url))
        && let Some(loc) = leader_location(&url, app.port, &path_q)
        && let Ok(v) = HeaderValue::from_str(&loc)
    {
        return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, v)]).into_response();
    }
    (StatusCode::SERVICE_UNAVAILABLE, [("refresh", "2")], axum::response::Html(views::no_leader().into_string()))
        .into_response()
}

/// The marker of a cross-site page that was asked to load itself again.
const REOPEN_COOKIE: &str = "__Host-lifeboat-reopen";
const REOPEN_SET: &str = "__Host-lifeboat-reopen=1; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=10";
const REOPEN_CLEAR: &str = "__Host-lifeboat-reopen=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0";

/// Whether a `Cookie` header of the request names `name`.
fn has_cookie(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .any(|c| c.trim().split_once('=').is_some_and(|(k, _)| k == name))
}

/// The signed-in browser of a request: its session id and session.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The session id (the cookie's value).
    pub id: String,
    /// The session.
    pub session: Session,
}

/// Needs a session: pages without one get 303 to `/signed-out`, POSTs and
/// `/live` 401.
pub async fn session(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let found = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| session_cookie(v).map(str::to_string))
        .and_then(|id| app.auth.session(&id).map(|session| SignedIn { id, session }));
    match found {
        Some(s) => {
            // The reopen marker did its work: the next link from another
            // site must be reopened again, not sent to /signed-out.
            let marked = has_cookie(req.headers(), REOPEN_COOKIE);
            req.extensions_mut().insert(s);
            let mut res = next.run(req).await;
            if marked {
                res.headers_mut().append(header::SET_COOKIE, HeaderValue::from_static(REOPEN_CLEAR));
            }
            res
        }
        None if req.method() != Method::GET || req.uri().path() == "/live" => {
            (StatusCode::UNAUTHORIZED, "not signed in: run `lifeboat dashboard login` and open its link\n")
                .into_response()
        }
        // A link followed from another site (a chat, a ticket) arrives
        // without the SameSite=Strict cookie. Loading the same address
        // again from this page is a same-site navigation that carries it.
        // A page that stays cross-site when it reloads (opened from a
        // sandboxed frame) would loop: the Lax marker set here comes back
        // with that second request, and then it is sent to /signed-out.
        None if req.headers().get("sec-fetch-site").is_some_and(|v| v.as_bytes() == b"cross-site") => {
            if has_cookie(req.headers(), REOPEN_COOKIE) {
                let mut res = (StatusCode::SEE_OTHER, [(header::LOCATION, "/signed-out")]).into_response();
                res.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_static(REOPEN_CLEAR));
                return res;
            }
            let here = req.uri().path_and_query().map_or("/hosts", |p| p.as_str()).to_string();
            (
                StatusCode::OK,
                [("refresh", "0"), ("set-cookie", REOPEN_SET)],
                axum::response::Html(views::reopening(&here).into_string()),
            )
                .into_response()
        }
        None => (StatusCode::SEE_OTHER, [(header::LOCATION, "/signed-out")]).into_response(),
    }
}

/// The dashboard's origin as the request names it (`https://` + authority).
fn own_origin(req: &Request) -> Option<String> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str().to_string(),
        None => req.headers().get(header::HOST)?.to_str().ok()?.to_string(),
    };
    Some(format!("https://{authority}"))
}

/// The Origin check every POST passes (login included): `Origin` equal to
/// the dashboard's own, or without `Origin`, `Sec-Fetch-Site: same-origin`.
pub fn origin_check(req: &Request) -> Result<(), &'static str> {
    let h = req.headers();
    // `Origin: null` (a browser's privacy choice) says nothing: it is
    // judged like a missing Origin, by Sec-Fetch-Site.
    match h.get(header::ORIGIN).filter(|o| o.as_bytes() != b"null") {
        Some(o) => {
            if own_origin(req).is_some_and(|own| o.as_bytes() == own.as_bytes()) {
                Ok(())
            } else {
                Err("origin: the request's Origin is not this dashboard; reload the page from the dashboard itself")
            }
        }
        None => match h.get("sec-fetch-site") {
            Some(v) if v.as_bytes() == b"same-origin" => Ok(()),
            _ => Err("origin: the request has neither an Origin header nor Sec-Fetch-Site: same-origin; \
                      use the dashboard's own buttons"),
        },
    }
}

fn refuse(req: &Request, who: &str, why: String) -> Response {
    let peer = req.extensions().get::<axum::extract::ConnectInfo<super::listener::Peer>>().map(|c| c.0.0);
    crate::conn::request_denied("dashboard_post", who, peer, &why);
    (StatusCode::FORBIDDEN, format!("refused, nothing was changed: {why}\n")).into_response()
}

async fn post_guard_for(needed: Role, req: Request, next: Next) -> Response {
    let Some(s) = req.extensions().get::<SignedIn>().cloned() else {
        return (StatusCode::UNAUTHORIZED, "not signed in\n").into_response();
    };
    if let Err(why) = origin_check(&req) {
        return refuse(&req, &s.session.name, why.to_string());
    }
    let sent = req.headers().get(CSRF_HEADER).map(HeaderValue::as_bytes).unwrap_or_default();
    if sent.is_empty() {
        return refuse(&req, &s.session.name, "csrf: the X-Lifeboat-Csrf header is missing; reload the page".into());
    }
    if !bool::from(sent.ct_eq(s.session.csrf.as_bytes())) {
        return refuse(&req, &s.session.name, "csrf: the X-Lifeboat-Csrf token is wrong; reload the page".into());
    }
    if !s.session.role.allows(needed) {
        let why = format!(
            "role: this action needs the {needed} role; you are signed in as {} ({})",
            s.session.name, s.session.role
        );
        return refuse(&req, &s.session.name, why);
    }
    next.run(req).await
}

/// The POST guard for actions: Origin, CSRF, and the operator role.
pub async fn post_guard_operator(req: Request, next: Next) -> Response {
    post_guard_for(Role::Operator, req, next).await
}

/// The POST guard for what any signed-in role may do (sign out): Origin and CSRF.
pub async fn post_guard_any(req: Request, next: Next) -> Response {
    post_guard_for(Role::Viewer, req, next).await
}
