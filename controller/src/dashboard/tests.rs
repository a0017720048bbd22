//! The dashboard in process: the router driven with `oneshot` (sign-in,
//! sessions, the POST guard, pages, the follower redirect, live updates),
//! and the HTTPS listener with a real client.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use lifeboat_common::identity::Role;
use lifeboat_proto::v1::{Guest, GuestState, Inventory};
use tower::ServiceExt;

use super::*;
use crate::domain::host::{HostStatus, Timing};
use crate::ports::ManualClock;

const HOST: &str = "dash.example:8443";
const ORIGIN: &str = "https://dash.example:8443";

struct Fixture {
    app: AppState,
    reg: Arc<Registry>,
    clock: ManualClock,
    sid: crate::registry::SessionId,
    _rx: tokio::sync::mpsc::Receiver<Box<lifeboat_proto::v1::ControllerMessage>>,
}

fn guest(state: GuestState) -> Guest {
    Guest {
        uuid: "u1".into(),
        name: "vm1".into(),
        state: state as i32,
        definition_xml: "<domain/>".into(),
        ..Default::default()
    }
}

fn fixture() -> Fixture {
    let reg = Arc::new(
        Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap(),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let sid = reg.open_session("host-a", "boot", tx).unwrap();
    reg.apply_inventory("host-a", sid, Inventory { host: None, guests: vec![guest(GuestState::Running)], more: false })
        .unwrap();
    let engine = Engine::new(reg.clone(), &Default::default(), 60_000, 0, 30_000).unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let app = App::new(Arc::new(Auth::new(Arc::new(clock.clone()), 3600)), 8443, None);
    app.open(Ctl { reg: reg.clone(), engine, leadership: None });
    Fixture { app, reg, clock, sid, _rx: rx }
}

async fn send(app: &AppState, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let res = routes::router(app.clone()).oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
}

fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path).header(header::HOST, HOST);
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, format!("__Host-lifeboat={c}"));
    }
    b.body(Body::empty()).unwrap()
}

fn post(path: &str, form: &str, cookie: Option<&str>, origin: Option<&str>, csrf: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path)
        .header(header::HOST, HOST)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, format!("__Host-lifeboat={c}"));
    }
    if let Some(o) = origin {
        b = b.header(header::ORIGIN, o);
    }
    if let Some(t) = csrf {
        b = b.header(guard::CSRF_HEADER, t);
    }
    b.body(Body::from(form.to_string())).unwrap()
}

/// Signs in with a fresh link: (session id, CSRF token).
async fn sign_in(f: &Fixture, name: &str, role: Role) -> (String, String) {
    let (token, _) = f.app.auth.mint(name, role).unwrap();
    let (st, h, _) = send(&f.app, post("/login", &format!("token={token}"), None, Some(ORIGIN), None)).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    let cookie = h.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_string();
    let id = auth::session_cookie(cookie.split(';').next().unwrap()).unwrap().to_string();
    let csrf = f.app.auth.session(&id).unwrap().csrf;
    (id, csrf)
}

async fn audit_actions(reg: &Registry) -> Vec<(String, String)> {
    let rows = reg.repos().audit(|a| a.read(&crate::ports::AuditFilter::default())).await.unwrap();
    rows.into_iter().map(|r| (r.actor, r.action)).collect()
}

#[tokio::test]
async fn a_link_signs_in_once_and_sets_a_strict_cookie() {
    let f = fixture();
    let (token, _) = f.app.auth.mint("olga", Role::Operator).unwrap();
    let (st, h, body) = send(&f.app, get(&format!("/login?token={token}"), None)).await;
    assert_eq!(st, StatusCode::OK);
    assert!(body.contains(r#"name="login""#) && body.contains(&token), "{body}");
    assert_eq!(h.get("cache-control").unwrap(), "no-store");
    assert!(h.get("content-security-policy").unwrap().to_str().unwrap().contains("script-src 'self'"));
    let (st, h, _) = send(&f.app, post("/login", &format!("token={token}"), None, Some(ORIGIN), None)).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    assert_eq!(h.get(header::LOCATION).unwrap(), "/hosts");
    let cookie = h.get(header::SET_COOKIE).unwrap().to_str().unwrap();
    assert!(cookie.starts_with("__Host-lifeboat="), "{cookie}");
    for attr in ["Path=/", "Secure", "HttpOnly", "SameSite=Strict", "Max-Age=3600"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    // Used: the page and a second POST are refused.
    let (st, _, body) = send(&f.app, post("/login", &format!("token={token}"), None, Some(ORIGIN), None)).await;
    assert_eq!(st, StatusCode::GONE);
    assert!(body.contains("used or has expired"), "{body}");
    let (st, _, body) = send(&f.app, get(&format!("/login?token={token}"), None)).await;
    assert_eq!(st, StatusCode::GONE);
    assert!(body.contains("used or has expired"), "{body}");
    assert!(audit_actions(&f.reg).await.contains(&("olga".into(), "dashboard.login".into())));
}

#[tokio::test]
async fn an_expired_link_and_an_expired_session_are_refused() {
    let f = fixture();
    let (token, _) = f.app.auth.mint("olga", Role::Operator).unwrap();
    f.clock.advance(auth::LINK_TTL_MS + 1);
    let (st, _, body) = send(&f.app, post("/login", &format!("token={token}"), None, Some(ORIGIN), None)).await;
    assert_eq!(st, StatusCode::GONE);
    assert!(body.contains("used or has expired"));
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    assert_eq!(send(&f.app, get("/hosts", Some(&id))).await.0, StatusCode::OK);
    f.clock.advance(3600 * 1000);
    let (st, h, _) = send(&f.app, get("/hosts", Some(&id))).await;
    assert_eq!((st, h.get(header::LOCATION).unwrap().to_str().unwrap()), (StatusCode::SEE_OTHER, "/signed-out"));
    let form = "status=MAINTENANCE&reason=test";
    let (st, _, _) = send(&f.app, post("/hosts/host-a/status", form, Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(f.reg.status_of("host-a"), Some(HostStatus::Available));
    // A link whose certificate expired before it was used: the page says so
    // and what to do.
    let until = crate::ports::clock::Clock::now_ms(&f.clock) + 1_000;
    let (token, _) = f.app.auth.mint_until("brief", Role::Operator, until).unwrap();
    f.clock.advance(1_000);
    let (st, _, body) = send(&f.app, post("/login", &format!("token={token}"), None, Some(ORIGIN), None)).await;
    assert_eq!(st, StatusCode::GONE);
    assert!(body.contains("certificate") && body.contains("expired") && body.contains("certs issue"), "{body}");
}

#[tokio::test]
async fn without_a_session_pages_redirect_and_posts_and_live_get_401() {
    let f = fixture();
    for p in ["/hosts", "/guests", "/hosts/host-a", "/"] {
        let (st, h, _) = send(&f.app, get(p, None)).await;
        if p == "/" {
            assert_eq!(st, StatusCode::SEE_OTHER);
            continue;
        }
        assert_eq!((st, h.get(header::LOCATION).unwrap().to_str().unwrap()), (StatusCode::SEE_OTHER, "/signed-out"));
    }
    assert_eq!(send(&f.app, get("/live?view=hosts", None)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(&f.app, get("/live?view=hosts", Some(&"a".repeat(64)))).await.0, StatusCode::UNAUTHORIZED);
    let (st, _, _) =
        send(&f.app, post("/hosts/host-a/status", "status=OFFLINE&reason=x", None, Some(ORIGIN), None)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, body) = send(&f.app, get("/signed-out", None)).await;
    assert!(st == StatusCode::OK && body.contains("lifeboat dashboard login"));
    // A link from another site arrives without the SameSite=Strict cookie:
    // the page loads itself again (same-site, with the cookie), once.
    let from = |site: &str, path: &str| {
        let mut r = get(path, None);
        r.headers_mut().insert("sec-fetch-site", site.parse().unwrap());
        r
    };
    let (st, h, body) = send(&f.app, from("cross-site", "/jobs?x=1")).await;
    assert_eq!((st, h.get("refresh").map(|v| v.to_str().unwrap())), (StatusCode::OK, Some("0")), "{body}");
    assert!(!body.contains("data-action") && !body.contains("lifeboat-csrf"), "nothing of the pool shows: {body}");
    assert!(body.contains(r#"href="/jobs?x=1""#), "a link for a browser that ignores Refresh: {body}");
    let marker = h.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_string();
    assert!(marker.starts_with("__Host-lifeboat-reopen=1;") && marker.contains("SameSite=Lax"), "{marker}");
    // Still cross-site when it reloads (a sandboxed opener): no loop.
    let mut again = from("cross-site", "/jobs?x=1");
    again.headers_mut().insert(header::COOKIE, "__Host-lifeboat-reopen=1".parse().unwrap());
    let (st, h, _) = send(&f.app, again).await;
    assert_eq!((st, h.get(header::LOCATION).unwrap().to_str().unwrap()), (StatusCode::SEE_OTHER, "/signed-out"));
    assert!(h.get(header::SET_COOKIE).unwrap().to_str().unwrap().contains("Max-Age=0"), "the marker is cleared");
    // Signed in, the reload that carries the marker clears it.
    let (sid, _) = sign_in(&f, "olga", Role::Operator).await;
    let mut back = get("/jobs?x=1", Some(&sid));
    let both = format!("{}; __Host-lifeboat-reopen=1", back.headers()[header::COOKIE].to_str().unwrap());
    back.headers_mut().insert(header::COOKIE, both.parse().unwrap());
    let (st, h, _) = send(&f.app, back).await;
    assert_eq!(st, StatusCode::OK);
    let cleared =
        h.get_all(header::SET_COOKIE).iter().any(|v| v.to_str().unwrap().starts_with("__Host-lifeboat-reopen=;"));
    assert!(cleared, "{h:?}");
    for site in ["same-origin", "none", "same-site"] {
        let (st, h, _) = send(&f.app, from(site, "/jobs")).await;
        assert_eq!(st, StatusCode::SEE_OTHER, "{site}");
        assert!(h.get("refresh").is_none(), "{site}");
    }
    assert_eq!(send(&f.app, from("cross-site", "/live?view=hosts")).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_post_guard_refuses_foreign_origin_missing_or_wrong_csrf_and_viewers() {
    let f = fixture();
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    let form = "status=MAINTENANCE&reason=dashboard+test";
    let path = "/hosts/host-a/status";
    let cases: [(Option<&str>, Option<&str>, &str); 4] = [
        (Some("https://evil.example"), Some(&csrf), "origin"),
        (None, Some(&csrf), "origin"),
        (Some(ORIGIN), None, "csrf"),
        (Some(ORIGIN), Some("0123"), "csrf"),
    ];
    for (origin, token, check) in cases {
        let (st, _, body) = send(&f.app, post(path, form, Some(&id), origin, token)).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{origin:?} {token:?}: {body}");
        assert!(body.contains(check), "{body}");
        assert_eq!(f.reg.status_of("host-a"), Some(HostStatus::Available));
    }
    // A viewer with a valid token: refused by role, nothing changed.
    let (vid, vcsrf) = sign_in(&f, "vera", Role::Viewer).await;
    let (st, _, body) = send(&f.app, post(path, form, Some(&vid), Some(ORIGIN), Some(&vcsrf))).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(body.contains("operator role") && body.contains("vera (viewer)"), "{body}");
    assert_eq!(f.reg.status_of("host-a"), Some(HostStatus::Available));
    // Another session's token is not this one's.
    let (st, _, _) = send(&f.app, post(path, form, Some(&id), Some(ORIGIN), Some(&vcsrf))).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // `Origin: null` counts as no Origin: refused without Sec-Fetch-Site.
    let (st, _, body) = send(&f.app, post(path, form, Some(&id), Some("null"), Some(&csrf))).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    let mut req = post(path, form, Some(&id), Some("null"), Some(&csrf));
    req.headers_mut().insert("sec-fetch-site", "cross-site".parse().unwrap());
    assert_eq!(send(&f.app, req).await.0, StatusCode::FORBIDDEN);
    // The operator, Sec-Fetch-Site instead of Origin: done, audited under the name.
    let mut req = post(path, form, Some(&id), None, Some(&csrf));
    req.headers_mut().insert("sec-fetch-site", "same-origin".parse().unwrap());
    let (st, _, body) = send(&f.app, req).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains("status-MAINTENANCE"), "{body}");
    assert_eq!(f.reg.status_of("host-a"), Some(HostStatus::Maintenance));
    assert!(audit_actions(&f.reg).await.iter().any(|(actor, action)| actor == "olga" && action.contains("status")));
}

#[tokio::test]
async fn a_refused_status_change_names_the_check_and_what_to_do() {
    let f = fixture();
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    // host-a was just heard: OFFLINE needs it silent (or attested off).
    let (st, _, body) =
        send(&f.app, post("/hosts/host-a/status", "status=OFFLINE&reason=dead", Some(&id), Some(ORIGIN), Some(&csrf)))
            .await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("class=\"refusal\"") && body.contains("what to do"), "{body}");
    assert_eq!(f.reg.status_of("host-a"), Some(HostStatus::Available));
    let (st, _, _) =
        send(&f.app, post("/hosts/host-a/status", "status=BOGUS&reason=x", Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _, _) =
        send(&f.app, post("/hosts/nope/status", "status=MAINTENANCE&reason=x", Some(&id), Some(ORIGIN), Some(&csrf)))
            .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pages_follow_the_contract_and_viewers_see_no_actions() {
    let f = fixture();
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    let (st, _, body) = send(&f.app, get("/hosts?status=AVAILABLE&q=host", Some(&id))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    for want in [
        r#"<table id="hosts""#,
        r#"<tr data-host="host-a""#,
        r#"status-badge status-AVAILABLE"#,
        r#"class="liveness liveness-reachable">reachable<"#,
        &format!(r#"<meta name="lifeboat-csrf" content="{csrf}">"#),
        r#"data-live="/live?view=hosts&amp;status=AVAILABLE&amp;q=host""#,
        r#"id="summary""#,
        r#"id="alarms""#,
        r#"id="live""#,
    ] {
        assert!(body.contains(want), "{want} not in {body}");
    }
    let (_, _, body) = send(&f.app, get("/hosts?status=MAINTENANCE", Some(&id))).await;
    assert!(!body.contains("data-host="), "{body}");
    assert_eq!(send(&f.app, get("/hosts?status=nonsense", Some(&id))).await.0, StatusCode::BAD_REQUEST);
    let (_, _, body) = send(&f.app, get("/guests?state=running&host=host-a", Some(&id))).await;
    for want in [
        r#"<table id="guests""#,
        r#"<tr data-uuid="u1""#,
        r#"<td class="state">running<"#,
        r#"class="runs-on""#,
        r#"<td class="owned-by">host-a<"#,
    ] {
        assert!(body.contains(want), "{want} not in {body}");
    }
    let (_, _, body) = send(&f.app, get("/guests?state=shutoff", Some(&id))).await;
    assert!(!body.contains("data-uuid="), "{body}");
    let (st, _, body) = send(&f.app, get("/hosts/host-a", Some(&id))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains("data-action") && body.contains("status-help"), "{body}");
    assert!(body.contains(r#"<table id="log""#) && body.contains(r#"id="jobs""#), "{body}");
    assert_eq!(send(&f.app, get("/hosts/nope", Some(&id))).await.0, StatusCode::NOT_FOUND);
    assert_eq!(send(&f.app, get("/hosts/host-a?since=garbage", Some(&id))).await.0, StatusCode::BAD_REQUEST);
    let (st, _, body) = send(&f.app, get("/hosts/host-a?since=2026-01-01T00:00:00Z", Some(&id))).await;
    assert_eq!(st, StatusCode::OK);
    assert!(body.contains(r#"name="since" value="2026-01-01T00:00:00Z""#), "the filter shows in its field: {body}");
    let (vid, _) = sign_in(&f, "vera", Role::Viewer).await;
    for p in ["/hosts", "/guests", "/hosts/host-a"] {
        let (st, _, body) = send(&f.app, get(p, Some(&vid))).await;
        assert_eq!(st, StatusCode::OK);
        assert!(!body.contains("data-action"), "{p}: {body}");
    }
}

#[tokio::test]
async fn garbage_is_refused_without_a_panic() {
    let f = fixture();
    let long = "a".repeat(100_000);
    let (st, _, body) = send(&f.app, get(&format!("/login?token={}", &long[..30_000]), None)).await;
    assert_eq!(st, StatusCode::GONE);
    assert!(!body.contains(&long[..100]));
    assert_eq!(send(&f.app, get("/login?token=%ff%00", None)).await.0, StatusCode::GONE);
    let (st, _, _) = send(&f.app, post("/login", &format!("token={long}"), None, Some(ORIGIN), None)).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    let (st, _, _) = send(&f.app, post("/login", "token=%zz&&&=", None, Some(ORIGIN), None)).await;
    assert!(st == StatusCode::GONE || st == StatusCode::BAD_REQUEST, "{st}");
    let (st, _, _) = send(&f.app, post("/login", "token=abc", None, Some("https://evil.example"), None)).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let mut req = get("/hosts", None);
    req.headers_mut().insert(header::COOKIE, format!("x=1; __Host-lifeboat={long}; ;;=").parse().unwrap());
    assert_eq!(send(&f.app, req).await.0, StatusCode::SEE_OTHER);
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    let big = format!("status=MAINTENANCE&reason={long}");
    let (st, _, _) = send(&f.app, post("/hosts/host-a/status", &big, Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    let (st, _, _) =
        send(&f.app, post("/hosts/host-a/status", "\u{0}\u{ff}", Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(f.reg.status_of("host-a"), Some(HostStatus::Available));
    for p in ["/hosts?after=%00%ff", "/guests?after_host=zz&after_name=&after_uuid=", "/live?view=nope", "/assets/../x"]
    {
        let st = send(&f.app, get(p, Some(&id))).await.0;
        assert!(st.as_u16() < 500, "{p}: {st}");
    }
}

#[tokio::test]
async fn a_follower_redirects_to_the_leader_on_the_same_port() {
    let (tx, hint) = tokio::sync::watch::channel(crate::ha::election::LeaderHint::Leader("https://b:7443".into(), 1));
    let clock = ManualClock::new(0);
    let app = App::new(Arc::new(Auth::new(Arc::new(clock), 3600)), 8443, Some(hint));
    let (st, h, _) = send(&app, get("/hosts?x=1", None)).await;
    assert_eq!(st, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(h.get(header::LOCATION).unwrap(), "https://b:8443/hosts?x=1");
    let (st, h, _) = send(&app, post("/login", "token=t", None, Some(ORIGIN), None)).await;
    assert_eq!(
        (st, h.get(header::LOCATION).unwrap().to_str().unwrap()),
        (StatusCode::TEMPORARY_REDIRECT, "https://b:8443/login")
    );
    tx.send_replace(crate::ha::election::LeaderHint::Leader("https://[fd00::2]:7443".into(), 1));
    let (_, h, _) = send(&app, get("/guests", None)).await;
    assert_eq!(h.get(header::LOCATION).unwrap(), "https://[fd00::2]:8443/guests");
    tx.send_replace(crate::ha::election::LeaderHint::NoLeader);
    let (st, h, _) = send(&app, get("/hosts", None)).await;
    assert_eq!((st, h.get("refresh").unwrap().to_str().unwrap()), (StatusCode::SERVICE_UNAVAILABLE, "2"));
    // Assets are served by every controller.
    assert_eq!(send(&app, get("/assets/app.js", None)).await.0, StatusCode::OK);
}

/// Reads SSE frames until `want` is in the text or `within` passes.
async fn read_until(body: &mut Body, want: &str, within: Duration) -> Result<String, String> {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(other) => return Err(format!("stream ended: {:?}; {text}", other.map(|r| r.is_ok()))),
            Err(_) => return Err(text),
        };
        if let Ok(d) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&d));
            if text.contains(want) {
                return Ok(text);
            }
        }
    }
}

#[tokio::test]
async fn a_guest_state_change_reaches_an_open_live_stream_within_a_second() {
    let f = fixture();
    let (id, _) = sign_in(&f, "olga", Role::Viewer).await;
    let res = routes::router(f.app.clone()).oneshot(get("/live?view=guests&host=host-a", Some(&id))).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers().get(header::CONTENT_TYPE).unwrap(), "text/event-stream");
    let mut body = res.into_body();
    // The page holds the first render: the stream waits for a change.
    let first = read_until(&mut body, "event: live", Duration::from_millis(600)).await;
    assert!(matches!(&first, Err(t) if t.contains(": open")), "{first:?}");
    let v0 = f.reg.view_version();
    let t0 = std::time::Instant::now();
    f.reg.apply_guest("host-a", f.sid, guest(GuestState::Shutoff)).unwrap();
    assert_ne!(f.reg.view_version(), v0, "a guest change moves the view version");
    let got = read_until(&mut body, r#"<td class="state">shutoff<"#, Duration::from_secs(1)).await;
    let took = t0.elapsed();
    assert!(got.is_ok(), "not within 1 s: {got:?}");
    println!("guest change reached the live stream in {} ms", took.as_millis());
    // The session's end ends the stream.
    f.app.auth.end(&id);
    f.reg.apply_guest("host-a", f.sid, guest(GuestState::Running)).unwrap();
    assert!(read_until(&mut body, "event: signed-out", Duration::from_secs(2)).await.is_ok());
}

#[tokio::test]
async fn the_listener_serves_https_with_h2_and_http1() {
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    lifeboat_common::tls::install_crypto_provider();
    lifeboat_common::pki::init(dir.path()).unwrap();
    lifeboat_common::pki::issue(dir.path(), dir.path(), &lifeboat_common::pki::Leaf::Controller(vec![])).unwrap();
    let cert = std::fs::read(dir.path().join("controller.pem")).unwrap();
    let key = std::fs::read(dir.path().join("controller.key")).unwrap();
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let f = fixture();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let d = Dashboard { app: f.app.clone(), tcp, tls: listener::server_config(&cert, &key).unwrap() };
    let _task = d.spawn();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector.connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/signed-out")
        .header(header::HOST, format!("localhost:{}", addr.port()))
        .body(Body::empty())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers().get("x-frame-options").unwrap(), "DENY");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("Signed out"));
    // A browser asking for h2 gets it.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // A connection that never handshakes does not stop others being served.
    let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates({
            let mut r = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
                r.add(c.unwrap()).unwrap();
            }
            r
        })
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("served while another connection idles")
    .unwrap();
    drop(tls);
}

#[tokio::test]
async fn the_jobs_pages_show_each_move_and_its_step() {
    use crate::domain::job::{JobState, MoveState};
    use crate::domain::{JobKind, PowerEvidence};
    let f = fixture();
    let now = f.reg.now_ms();
    let job = crate::ports::JobRow {
        id: "j-1".into(),
        kind: JobKind::Move,
        source: "host-a".into(),
        state: JobState::Moving,
        operator: "olga".into(),
        plan_id: "p-1".into(),
        power_evidence: PowerEvidence::StoppedByAgent,
        request: vec![],
        parallel: 1,
        created_ms: now,
        updated_ms: now,
        error: String::new(),
    };
    let mv = crate::ports::MoveRow {
        job_id: "j-1".into(),
        uuid: "u1".into(),
        name: "vm1".into(),
        source: "host-a".into(),
        target: "host-a".into(),
        generation: 2,
        state: MoveState::Starting,
        start: true,
        definition_xml: "<domain/>".into(),
        error: String::new(),
        priority: 0,
        updated_ms: now,
        memory_kib: 0,
    };
    let audit = AuditRowFor::job("olga", "j-1");
    f.reg.repos().jobs(move |j| j.create(&job, &[mv], &audit)).await.unwrap();
    let (id, _) = sign_in(&f, "vera", Role::Viewer).await;
    let (st, _, body) = send(&f.app, get("/jobs", Some(&id))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains(r#"<tr data-job="j-1" data-job-state="MOVING""#), "{body}");
    let (st, _, body) = send(&f.app, get("/jobs/j-1", Some(&id))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    for want in [
        r#"data-job-state="MOVING""#,
        r#"<tr class="move" data-uuid="u1" data-move-state="STARTING""#,
        r#"<td class="target"><a href="/hosts/host-a">host-a</a>"#,
        r#"<td class="arrived">running<"#,
        r#"data-live="/live?view=job&amp;id=j-1""#,
    ] {
        assert!(body.contains(want), "{want} not in {body}");
    }
    assert!(!body.contains("data-action"));
    assert_eq!(send(&f.app, get("/jobs/nope", Some(&id))).await.0, StatusCode::NOT_FOUND);
    let res = routes::router(f.app.clone()).oneshot(get("/live?view=job&id=j-1", Some(&id))).await.unwrap();
    let mut body = res.into_body();
    read_until(&mut body, ": open", Duration::from_secs(5)).await.unwrap();
    f.reg.apply_guest("host-a", f.sid, guest(GuestState::Paused)).unwrap();
    assert!(read_until(&mut body, "data-move-state=\"STARTING\"", Duration::from_secs(5)).await.is_ok());
}

struct AuditRowFor;

impl AuditRowFor {
    fn job(actor: &str, job: &str) -> crate::ports::AuditRow {
        crate::ports::AuditRow {
            seq: 0,
            at_ms: 0,
            actor: actor.into(),
            action: "job.created".into(),
            host: "host-a".into(),
            vm: String::new(),
            job: job.into(),
            detail: String::new(),
        }
    }
}

#[tokio::test]
async fn the_status_plan_shows_the_checks_and_changes_nothing() {
    let f = fixture();
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    let plan = |form: &str, id: &str, csrf: Option<&str>| {
        post("/hosts/host-a/status/plan", form, Some(id), Some(ORIGIN), csrf)
    };
    let (st, h, body) = send(&f.app, plan("status=OFFLINE&reason=dead", &id, Some(&csrf))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(h.get("x-lifeboat-done").is_none(), "a plan does not close the dialog");
    assert!(body.contains(r#"class="check failed""#) && body.contains("What to do"), "{body}");
    assert!(body.contains(r#"data-ok="false""#), "{body}");
    let (_, _, body) = send(&f.app, plan("status=MAINTENANCE&reason=work", &id, Some(&csrf))).await;
    assert!(body.contains(r#"data-ok="true""#), "{body}");
    let (_, _, body) = send(&f.app, plan("status=NOT_ACCEPTING&reason=test", &id, Some(&csrf))).await;
    assert!(body.contains(r#"class="check ok""#), "{body}");
    assert_eq!(send(&f.app, plan("status=NOPE&reason=x", &id, Some(&csrf))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(send(&f.app, plan("status=OFFLINE&reason=x", &id, None)).await.0, StatusCode::FORBIDDEN);
    let (vid, vcsrf) = sign_in(&f, "vera", Role::Viewer).await;
    assert_eq!(send(&f.app, plan("status=OFFLINE&reason=x", &vid, Some(&vcsrf))).await.0, StatusCode::FORBIDDEN);
    assert_eq!(f.reg.status_of("host-a"), Some(HostStatus::Available));
    // The change itself says it is done (the dialog closes).
    let (st, h, _) =
        send(&f.app, post("/hosts/host-a/status", "status=MAINTENANCE&reason=w", Some(&id), Some(ORIGIN), Some(&csrf)))
            .await;
    assert_eq!((st, h.get("x-lifeboat-done").map(|v| v.to_str().unwrap())), (StatusCode::OK, Some("1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_hosts_page_by_a_hundred_with_a_next_link() {
    let f = fixture();
    let mut rxs = Vec::new();
    for i in 0..2000 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        f.reg.open_session(&format!("h-{i:05}"), "boot", tx).unwrap();
        rxs.push(rx);
    }
    let (id, _) = sign_in(&f, "vera", Role::Viewer).await;
    let t0 = std::time::Instant::now();
    let (st, _, body) = send(&f.app, get("/hosts", Some(&id))).await;
    let took = t0.elapsed();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body.matches("<tr data-host=").count(), 100);
    assert!(body.contains("2001 matching"), "the count covers every host");
    assert!(body.contains(r#"<a class="next" href="/hosts?after=h-00099">"#), "next link");
    let (_, _, body) = send(&f.app, get("/hosts?after=h-01999", Some(&id))).await;
    assert!(body.contains(r#"<tr data-host="host-a""#) && !body.contains("class=\"next\""), "last page");
    let (_, _, body) = send(&f.app, get("/hosts?q=h-0150", Some(&id))).await;
    assert_eq!(body.matches("<tr data-host=").count(), 10);
    println!("/hosts with 2001 hosts rendered in {} ms (debug build)", took.as_millis());
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    lifeboat_common::tls::install_crypto_provider();
    lifeboat_common::pki::init(dir.path()).unwrap();
    lifeboat_common::pki::issue(dir.path(), dir.path(), &lifeboat_common::pki::Leaf::Controller(vec![])).unwrap();
    let cert = std::fs::read(dir.path().join("controller.pem")).unwrap();
    let key = std::fs::read(dir.path().join("controller.key")).unwrap();
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let l = listener::DashListener::with_idle(
        tcp,
        listener::server_config(&cert, &key).unwrap(),
        Duration::from_millis(300),
    )
    .unwrap();
    let server = tokio::spawn(async move {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let _ = axum::serve(l, app).await;
    });
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut b)).await.expect("closed by the server");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(t0.elapsed() >= Duration::from_millis(250), "{:?}", t0.elapsed());
    server.abort();
}

#[tokio::test]
async fn an_operator_acknowledges_an_alarm_and_a_viewer_cannot() {
    let f = fixture();
    let reg = f.reg.clone();
    tokio::task::spawn_blocking(move || reg.raise_alarm_blocking("host-a", "guests-not-moved", "test"))
        .await
        .unwrap()
        .unwrap();
    let (vid, vcsrf) = sign_in(&f, "vera", Role::Viewer).await;
    let (_, _, body) = send(&f.app, get("/hosts/host-a", Some(&vid))).await;
    assert!(body.contains("alarm-banner") && !body.contains("ack-dialog"), "{body}");
    let form = "host=host-a&kind=guests-not-moved&reason=seen";
    let (st, _, _) = send(&f.app, post("/alarms/ack", form, Some(&vid), Some(ORIGIN), Some(&vcsrf))).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(f.reg.active_alarms().len(), 1);
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    let (_, _, body) = send(&f.app, get("/hosts/host-a", Some(&id))).await;
    assert!(body.contains(r#"<dialog id="ack-dialog">"#) && body.contains(r#"data-action="ack-alarm""#), "{body}");
    let empty = "host=host-a&kind=guests-not-moved&reason=";
    let (st, _, _) = send(&f.app, post("/alarms/ack", empty, Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let wrong = "host=host-a&kind=nope&reason=x";
    let (st, _, body) = send(&f.app, post("/alarms/ack", wrong, Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    let (st, h, body) = send(&f.app, post("/alarms/ack", form, Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(h.get("x-lifeboat-done").is_some() && body.contains("1 guests-not-moved alarm(s)"), "{body}");
    assert!(f.reg.active_alarms().is_empty());
    assert!(audit_actions(&f.reg).await.contains(&("olga".into(), "alarm.cleared".into())));
}

#[tokio::test]
async fn a_live_stream_sends_only_the_fragments_that_changed() {
    let f = fixture();
    let (id, _) = sign_in(&f, "vera", Role::Viewer).await;
    let res = routes::router(f.app.clone()).oneshot(get("/live?view=guests&host=host-a", Some(&id))).await.unwrap();
    let mut body = res.into_body();
    read_until(&mut body, ": open", Duration::from_secs(5)).await.unwrap();
    // The first tick sends all three; host-a's guests stay the same after.
    f.reg.apply_guest("host-a", f.sid, guest(GuestState::Paused)).unwrap();
    read_until(&mut body, "event: live", Duration::from_secs(2)).await.unwrap();
    // A new host changes the counts at the top, not host-a's guests.
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    f.reg.open_session("host-b", "boot", tx).unwrap();
    let got = read_until(&mut body, "event: summary", Duration::from_secs(1)).await.unwrap();
    assert!(got.contains(r#"data-status="AVAILABLE">2<"#), "{got}");
    let rest = read_until(&mut body, "event: live", Duration::from_millis(700)).await;
    assert!(
        matches!(&rest, Err(t) if !t.starts_with("stream ended")),
        "the guests fragment did not change and is not sent again; the stream stays open: {rest:?}"
    );
}

// ---- plan-then-confirm actions (forced migration, move, cleanup) ----

/// A pool where host-a (guest u1) went silent past the grace (0 here) and
/// host-b and host-c are reachable targets (heard every 50 ms).
async fn silent_fixture() -> (Fixture, Vec<tokio::sync::mpsc::Receiver<Box<lifeboat_proto::v1::ControllerMessage>>>) {
    let timing = Timing { heartbeat_interval_ms: 100, unreachable_after_ms: 300 };
    let reg = Arc::new(Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), timing).unwrap());
    let mut rxs = Vec::new();
    let info = |id: &str| lifeboat_proto::v1::HostInfo {
        host_id: id.into(),
        hostname: id.into(),
        cpus: 8,
        memory_total_kib: 64 << 20,
        memory_free_kib: 60 << 20,
        ..Default::default()
    };
    let mut sids = Vec::new();
    for h in ["host-a", "host-b", "host-c"] {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let sid = reg.open_session(h, "boot", tx).unwrap();
        let guests = if h == "host-a" { vec![guest(GuestState::Running)] } else { vec![] };
        reg.apply_inventory(h, sid, Inventory { host: Some(info(h)), guests, more: false }).unwrap();
        if h == "host-a" {
            rxs.push(rx);
        } else {
            // The targets' agents answer every command (the plan asks them about disks).
            let (reg, mut rx) = (reg.clone(), rx);
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if let Some(lifeboat_proto::v1::controller_message::Msg::Command(c)) = m.msg {
                        let ok = lifeboat_proto::v1::CommandResult { id: c.id, ok: true, ..Default::default() };
                        reg.complete(ok);
                    }
                }
            });
        }
        sids.push(sid);
    }
    reg.close_session("host-a", sids[0]);
    let cells: Vec<_> = [("host-b", sids[1]), ("host-c", sids[2])]
        .into_iter()
        .map(|(h, sid)| reg.heard_cell(h, sid).unwrap())
        .collect();
    tokio::spawn(async move {
        loop {
            for c in &cells {
                c.store(lifeboat_common::now_unix_ms(), std::sync::atomic::Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // Past the startup grace and the detection time: host-a is silent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let engine = Engine::new(reg.clone(), &Default::default(), 0, 0, 30_000).unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let app = App::new(Arc::new(Auth::new(Arc::new(clock.clone()), 3600)), 8443, None);
    app.open(Ctl { reg: reg.clone(), engine, leadership: None });
    let rx = rxs.remove(0);
    (Fixture { app, reg, clock, sid: sids[0], _rx: rx }, rxs)
}

fn plan_id_of(body: &str) -> String {
    let at = body.find(r#"name="plan_id" value=""#).unwrap_or_else(|| panic!("no plan id in {body}"));
    let rest = &body[at + r#"name="plan_id" value=""#.len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

async fn job_count(f: &Fixture) -> usize {
    f.app.leading().unwrap().engine.jobs(None, 100).await.unwrap().len()
}

#[tokio::test]
async fn a_forced_migration_plan_is_rendered_and_only_its_exact_plan_id_starts_a_job() {
    let (f, _rxs) = silent_fixture().await;
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    let p = |path: &str, form: &str| post(path, form, Some(&id), Some(ORIGIN), Some(&csrf));
    let form = "power=attest&attest_typed=host-a&reason=pulled+the+plug";
    let (st, _, body) = send(&f.app, p("/hosts/host-a/migrate/plan", form)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains(r#"id="migrate-plan""#) && body.contains(r#"class="check ok""#), "{body}");
    assert!(body.contains(r#"<tr data-uuid="u1""#) && body.contains("attestation"), "{body}");
    let plan = plan_id_of(&body);
    assert!(body.contains(r#"data-executable="true""#), "{body}");
    // A plan id that is not the one computed now: the engine's refusal and the plan as it is now.
    let (st, h, body) = send(&f.app, p("/hosts/host-a/migrate", &format!("{form}&plan_id=0000"))).await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert!(h.get("x-lifeboat-location").is_none());
    assert!(body.contains(r#"class="refusal""#) && body.contains(&plan), "{body}");
    assert_eq!(job_count(&f).await, 0, "nothing started");
    // No plan id at all: 400, nothing started (the dashboard never sends `yes`).
    let (st, _, _) = send(&f.app, p("/hosts/host-a/migrate", form)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(job_count(&f).await, 0);
    // The exact plan id: a job, and the browser is sent to its page.
    let (st, h, body) = send(&f.app, p("/hosts/host-a/migrate", &format!("{form}&plan_id={plan}"))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let to = h.get("x-lifeboat-location").unwrap().to_str().unwrap().to_string();
    assert!(to.starts_with("/jobs/"), "{to}");
    let jobs = f.app.leading().unwrap().engine.jobs(None, 10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!((jobs[0].operator.as_str(), jobs[0].plan_id.as_str()), ("olga", plan.as_str()));
    assert_eq!(to, format!("/jobs/{}", jobs[0].id));
    let rows = f.reg.repos().audit(|a| a.read(&crate::ports::AuditFilter::default())).await.unwrap();
    assert!(
        rows.iter().any(|r| r.actor == "olga" && r.detail.contains("dashboard: migrate --force --from host-a")),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_forced_migration_is_refused_before_any_call_without_proof_and_for_viewers() {
    let (f, _rxs) = silent_fixture().await;
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    for (form, want) in [
        ("power=attest&attest_typed=host-b&reason=r", "does not match"),
        ("power=attest&attest_typed=&reason=r", "does not match"),
        ("power=attest&attest_typed=host-a&reason=+", "needs a reason"),
        ("power=&reason=r", "fence"),
        ("power=fence&parallel=0", "parallelism"),
        ("power=fence&parallel=99999999999", "parallelism"),
    ] {
        for path in ["/hosts/host-a/migrate/plan", "/hosts/host-a/migrate"] {
            let full = format!("{form}&plan_id=x");
            let (st, _, body) = send(&f.app, post(path, &full, Some(&id), Some(ORIGIN), Some(&csrf))).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{form}: {body}");
            assert!(body.contains(want), "{form}: {body}");
        }
    }
    assert_eq!(job_count(&f).await, 0);
    // A host that is still talking: the plan says which check failed and what to do.
    let (st, _, body) =
        send(&f.app, post("/hosts/host-b/migrate/plan", "power=fence", Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains(r#"class="check failed""#) && body.contains("What to do"), "{body}");
    assert!(body.contains(r#"data-executable="false""#), "{body}");
    let (vid, vcsrf) = sign_in(&f, "vera", Role::Viewer).await;
    for (path, form) in [
        ("/hosts/host-a/migrate/plan", "power=attest&attest_typed=host-a&reason=r"),
        ("/hosts/host-a/migrate", "power=attest&attest_typed=host-a&reason=r&plan_id=x"),
        ("/guests/move/plan", "from=host-b&vm=u1&target=host-c"),
        ("/guests/move", "from=host-b&vm=u1&target=host-c&plan_id=x"),
        ("/hosts/host-a/cleanup/plan", ""),
        ("/hosts/host-a/cleanup", "plan_id=x"),
    ] {
        let (st, _, body) = send(&f.app, post(path, form, Some(&vid), Some(ORIGIN), Some(&vcsrf))).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path}: {body}");
        // Without the CSRF header an operator is refused too.
        let (st, _, _) = send(&f.app, post(path, form, Some(&id), Some(ORIGIN), None)).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(job_count(&f).await, 0);
    for p in ["/hosts/host-a", "/guests"] {
        let (_, _, body) = send(&f.app, get(p, Some(&vid))).await;
        assert!(!body.contains("data-action") && !body.contains("migrate-dialog"), "{p}: {body}");
        let (_, _, body) = send(&f.app, get(p, Some(&id))).await;
        assert!(body.contains(r#"id="move-dialog""#), "{p}: {body}");
    }
    let (_, _, body) = send(&f.app, get("/hosts/host-a", Some(&id))).await;
    assert!(body.contains(r#"data-action="migrate""#) && body.contains(r#"id="migrate-dialog""#), "{body}");
    assert!(body.contains(r#"data-action="move-guest""#) && body.contains(r#"data-from="host-a""#), "{body}");
}

#[tokio::test]
async fn targets_list_reachable_accepting_and_marked_test_hosts_and_a_move_plans_one_guest() {
    let (f, _rxs) = silent_fixture().await;
    f.reg.set_status("host-c", HostStatus::NotAccepting, "test host", "olga").await.unwrap();
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    let (st, _, body) = send(&f.app, get("/targets?from=host-b", Some(&id))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains(r#"<option value="host-c">host-c (NOT ACCEPTING — test host)"#), "{body}");
    assert!(!body.contains(r#"value="host-b""#), "not the source: {body}");
    assert!(!body.contains(r#"value="host-a""#), "not an unreachable host: {body}");
    // A move of a guest off a silent host: refused by the plan (the source must be connected).
    let form = "from=host-a&vm=u1&target=host-b";
    let (st, _, body) = send(&f.app, post("/guests/move/plan", form, Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains(r#"data-executable="false""#) && body.contains("What to do"), "{body}");
    let plan = plan_id_of(&body);
    let (st, h, body) =
        send(&f.app, post("/guests/move", &format!("{form}&plan_id={plan}"), Some(&id), Some(ORIGIN), Some(&csrf)))
            .await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert!(h.get("x-lifeboat-location").is_none() && body.contains(r#"class="refusal""#), "{body}");
    assert_eq!(job_count(&f).await, 0);
    let (st, _, body) =
        send(&f.app, post("/guests/move/plan", "from=host-a&vm=u1", Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn cleanup_plans_and_confirms_only_the_exact_plan_id() {
    let f = fixture();
    let (id, csrf) = sign_in(&f, "olga", Role::Operator).await;
    let (st, _, body) =
        send(&f.app, post("/hosts/host-a/cleanup/plan", "", Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains(r#"id="cleanup-plan""#), "{body}");
    let plan = plan_id_of(&body);
    let (st, _, body) =
        send(&f.app, post("/hosts/host-a/cleanup", "plan_id=nope", Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert!(st == StatusCode::CONFLICT || st == StatusCode::BAD_REQUEST, "{st}: {body}");
    assert!(body.contains(r#"class="refusal""#) && body.contains(&plan), "{body}");
    let (st, _, _) = send(&f.app, post("/hosts/host-a/cleanup", "", Some(&id), Some(ORIGIN), Some(&csrf))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _, body) =
        send(&f.app, post("/hosts/host-a/cleanup", &format!("plan_id={plan}"), Some(&id), Some(ORIGIN), Some(&csrf)))
            .await;
    assert!(st == StatusCode::OK || st == StatusCode::CONFLICT, "{st}: {body}");
    if st == StatusCode::OK {
        assert!(body.contains(r#"data-done="true""#), "{body}");
    }
}

#[tokio::test]
async fn live_streams_are_capped_per_session_and_in_all_and_given_back_when_they_end() {
    let f = fixture();
    let (id, _) = sign_in(&f, "vera", Role::Viewer).await;
    let open = |sid: &str| routes::router(f.app.clone()).oneshot(get("/live?view=hosts", Some(sid)));
    let mut held = Vec::new();
    for _ in 0..live::MAX_STREAMS_PER_SESSION {
        let res = open(&id).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        held.push(res);
    }
    // A fifth page of the session takes the place of its oldest, which is
    // told so ("replaced") and ends; the count stays at the cap.
    let res = open(&id).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut oldest = held.remove(0).into_body();
    let got = read_until(&mut oldest, "event: replaced", Duration::from_secs(5)).await;
    assert!(got.is_ok(), "the oldest stream is told it was replaced: {got:?}");
    held.push(res);
    assert_eq!(f.app.streams.open(&id), (live::MAX_STREAMS_PER_SESSION + 1, live::MAX_STREAMS_PER_SESSION));
    drop(oldest);
    assert_eq!(
        f.app.streams.open(&id),
        (live::MAX_STREAMS_PER_SESSION, live::MAX_STREAMS_PER_SESSION),
        "a replaced stream counts in all until its body is gone, and only once"
    );
    // A client that never reads what it was told: the replaced streams it
    // keeps count, and at 4 of them the session gets no more.
    let mut unread = Vec::new();
    for _ in 0..live::MAX_STREAMS_PER_SESSION {
        let res = open(&id).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        held.push(res);
        unread.push(held.remove(0));
    }
    let (st, _, body) = send(&f.app, get("/live?view=hosts", Some(&id))).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert!(body.contains("still closing (4)"), "{body}");
    assert_eq!(f.app.streams.open(&id).0, 2 * live::MAX_STREAMS_PER_SESSION);
    drop(unread);
    assert_eq!(f.app.streams.open(&id), (live::MAX_STREAMS_PER_SESSION, live::MAX_STREAMS_PER_SESSION));
    // A closed page gives its place back.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while f.app.streams.open(&id).1 == live::MAX_STREAMS_PER_SESSION && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.app.streams.open(&id).1, live::MAX_STREAMS_PER_SESSION - 1);
    let res = open(&id).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    held.push(res);
    // In all: other sessions fill the controller up to MAX_STREAMS.
    let mut n = 1;
    while f.app.streams.open(&id).0 < live::MAX_STREAMS {
        let (other, _) = sign_in(&f, &format!("viewer-{n}"), Role::Viewer).await;
        n += 1;
        for _ in 0..live::MAX_STREAMS_PER_SESSION.min(live::MAX_STREAMS - f.app.streams.open(&id).0) {
            let res = open(&other).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            held.push(res);
        }
    }
    let (last, _) = sign_in(&f, "late", Role::Viewer).await;
    let (st, _, body) = send(&f.app, get("/live?view=hosts", Some(&last))).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert!(body.contains("on this controller (64)"), "{body}");
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while f.app.streams.open(&id).0 > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.app.streams.open(&id), (0, 0), "every ended stream gave its place back");
}

#[tokio::test]
async fn streams_share_one_chrome_render_per_tick_and_slow_views_render_at_most_once_a_second() {
    let f = fixture();
    let (id, _) = sign_in(&f, "vera", Role::Viewer).await;
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let res = routes::router(f.app.clone()).oneshot(get("/live?view=hosts", Some(&id))).await.unwrap();
        let mut body = res.into_body();
        read_until(&mut body, ": open", Duration::from_secs(2)).await.unwrap();
        bodies.push(body);
    }
    let hub = f.app.hub.get().unwrap();
    assert_eq!(hub.renders(), (0, 0), "nothing is rendered again right after the page load");
    let ticks0 = *hub.subscribe().borrow();
    for (i, st) in [GuestState::Shutoff, GuestState::Running, GuestState::Paused].into_iter().enumerate() {
        f.reg.apply_guest("host-a", f.sid, guest(st)).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        for b in &mut bodies {
            let _ = read_until(b, "never", Duration::from_millis(1)).await;
        }
        let _ = i;
    }
    let ticks = *hub.subscribe().borrow() - ticks0;
    let (chrome, views) = hub.renders();
    assert!(ticks >= 2, "{ticks}");
    assert_eq!(views, 3 * ticks, "each stream renders its view once per tick");
    assert!(chrome <= ticks, "the summary and alarms are rendered once per tick: {chrome} for {ticks} ticks");
    drop(bodies);

    // A jobs page (store reads) renders at most once a second however often it ticks.
    let res = routes::router(f.app.clone()).oneshot(get("/live?view=jobs", Some(&id))).await.unwrap();
    let mut body = res.into_body();
    read_until(&mut body, ": open", Duration::from_secs(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, v0) = hub.renders();
    let t0 = std::time::Instant::now();
    let mut st = GuestState::Running;
    while t0.elapsed() < Duration::from_millis(2_000) {
        st = if st == GuestState::Running { GuestState::Shutoff } else { GuestState::Running };
        f.reg.apply_guest("host-a", f.sid, guest(st)).unwrap();
        let _ = read_until(&mut body, "never", Duration::from_millis(100)).await;
    }
    let (_, v1) = hub.renders();
    println!("jobs view: {} renders in 2 s of changes every 100 ms", v1 - v0);
    assert!(v1 - v0 <= 3, "throttled to one render a second: {} in 2 s", v1 - v0);
    assert!(v1 - v0 >= 1);
}

#[test]
fn a_closed_live_stream_reloads_the_page_and_shows_a_not_live_banner() {
    let js = views::APP_JS;
    let at = js.find("es.readyState === EventSource.CLOSED").expect("onerror tells a closed stream apart");
    let branch = &js[at..js[at..].find("return;").map_or(js.len(), |e| at + e)];
    assert!(branch.contains("setTimeout") && branch.contains("whyClosed"), "{branch}");
    assert!(branch.contains("2000"), "asks why after a pause: {branch}");
    let why = &js[js.find("function whyClosed").expect("whyClosed")..];
    let why = &why[..why.find("\n  }\n").unwrap_or(why.len())];
    assert!(why.contains("res.status === 429") && why.contains("setTimeout(live, 10000)"), "{why}");
    assert!(why.contains("reloadWhenIdle()"), "anything else reloads: {why}");
    let idle = &js[js.find("function reloadWhenIdle").expect("reloadWhenIdle")..];
    let idle = &idle[..idle.find("\n  }\n").unwrap_or(idle.len())];
    assert!(idle.contains(r#"querySelector("dialog[open]")"#) && idle.contains("location.reload()"), "{idle}");
    assert!(js.contains(r#"liveState = "error""#) && js.contains(r#"liveState = "full""#));
    assert!(views::APP_CSS.contains(r#"body[data-live-state="full"]::before"#));
    let css = views::APP_CSS;
    let rule = css.find(r#"body[data-live-state="error"]::before"#).expect("a banner rule for the error state");
    let rule = &css[rule..css[rule..].find('}').map_or(css.len(), |e| rule + e)];
    assert!(rule.contains("not live") && rule.contains("reconnecting") && rule.contains("display: block"), "{rule}");
}

#[tokio::test]
async fn a_hint_naming_this_controller_answers_503_not_a_redirect_to_itself() {
    let (tx, hint) = tokio::sync::watch::channel(crate::ha::election::LeaderHint::Leader("https://a:7443".into(), 1));
    let app = App::new(Arc::new(Auth::new(Arc::new(ManualClock::new(0)), 3600)), 8443, Some(hint));
    app.set_advertise_url("https://A:7443/");
    // Leading but not loaded yet (no Ctl): 503 and retry, no 307 to itself.
    let (st, h, body) = send(&app, get("/hosts", None)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{h:?}");
    assert!(h.get(header::LOCATION).is_none());
    assert_eq!(h.get("refresh").unwrap(), "2");
    assert!(body.contains("tries again every 2 seconds"), "{body}");
    // Another controller leads: the redirect goes there.
    tx.send_replace(crate::ha::election::LeaderHint::Leader("https://b:7443".into(), 1));
    let (st, h, _) = send(&app, get("/hosts", None)).await;
    assert_eq!(
        (st, h.get(header::LOCATION).unwrap().to_str().unwrap()),
        (StatusCode::TEMPORARY_REDIRECT, "https://b:8443/hosts")
    );
}

#[tokio::test]
async fn a_controller_that_lost_leadership_while_the_hint_names_it_answers_503() {
    let f = fixture();
    let (tx, hint) = tokio::sync::watch::channel(crate::ha::election::LeaderHint::Leader("https://a:7443".into(), 1));
    let clock = ManualClock::new(0);
    let app = App::new(Arc::new(Auth::new(Arc::new(clock), 3600)), 8443, Some(hint));
    app.set_advertise_url("https://a:7443");
    let lost =
        Arc::new(crate::ha::Leadership::new(b"k".to_vec(), 1, Duration::from_secs(10), tokio::time::Instant::now()));
    lost.lose("test");
    app.open(Ctl { reg: f.reg.clone(), engine: f.app.ctl.get().unwrap().engine.clone(), leadership: Some(lost) });
    assert!(app.leading().is_none());
    let (st, h, _) = send(&app, get("/guests", None)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.get(header::LOCATION).is_none());
    assert!(crate::dashboard::guard::same_controller("https://a:7443", "https://a:7443/"));
    assert!(!crate::dashboard::guard::same_controller("https://a:7443", "https://a:7444"));
    assert!(!crate::dashboard::guard::same_controller("https://a:7443", "garbage"));
    drop(tx);
}

#[tokio::test]
async fn host_links_and_actions_use_the_canonical_id_percent_encoded() {
    let f = fixture();
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let odd = "a b/..?x#y";
    f.reg.open_session(odd, "boot", tx).unwrap();
    let (id, _) = sign_in(&f, "olga", Role::Operator).await;
    let (st, _, body) = send(&f.app, get("/hosts/a%20b%2F..%3Fx%23y", Some(&id))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let enc = "a%20b%2F..%3Fx%23y";
    assert!(body.contains(&format!(r#"action="/hosts/{enc}/status""#)), "{body}");
    assert!(body.contains(&format!(r#"formaction="/hosts/{enc}/status/plan""#)), "{body}");
    assert!(!body.contains(r#"="/hosts/a b"#), "no raw id in an href or action: {body}");
    let (_, _, body) = send(&f.app, get("/hosts", Some(&id))).await;
    assert!(body.contains(&format!(r#"href="/hosts/{enc}""#)), "{body}");
}

#[tokio::test]
async fn the_alarms_filter_lists_exactly_the_alarmed_hosts_across_lock_chunks() {
    let f = fixture();
    let mut keep = Vec::new();
    for i in 0..600 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        f.reg.open_session(&format!("h{i:04}"), "boot", tx).unwrap();
        keep.push(rx);
    }
    let reg = f.reg.clone();
    tokio::task::spawn_blocking(move || {
        for i in (0..600).step_by(150) {
            reg.raise_alarm_blocking(&format!("h{i:04}"), "guests-not-moved", "test").unwrap();
        }
    })
    .await
    .unwrap();
    let filter = crate::registry::HostFilter { alarms_only: true, ..Default::default() };
    let page = f.reg.hosts_page(&filter, None, 100);
    let ids: Vec<String> = page.rows.iter().filter_map(|r| r.info.as_ref().map(|i| i.host_id.clone())).collect();
    assert_eq!(ids, ["h0000", "h0150", "h0300", "h0450"]);
    assert_eq!(page.matching, 4);
    let t0 = std::time::Instant::now();
    for _ in 0..20 {
        f.reg.hosts_page(&filter, None, 100);
    }
    println!("alarms filter over 601 hosts: {} us a call", t0.elapsed().as_micros() / 20);
}
