//! The dashboard wired into a running controller (SQLite backend): a
//! sign-in link minted over gRPC with a client certificate works once over
//! real HTTPS, and a controller without `[dashboard]` refuses to mint one.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use lifeboat_common::identity::Role;
use lifeboat_common::pki::{self, Leaf};
use lifeboat_common::tls::TlsFiles;
use lifeboat_proto::v1::admin_client::AdminClient;
use lifeboat_proto::v1::{CreateDashboardLoginRequest, EndDashboardSessionsRequest};
use tokio_rustls::rustls;

struct Running {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(dir: &Path, db_name: &str, extra: &str) -> Running {
    let db = dir.join(db_name);
    lifeboat_controller::config::init_database(&db, Path::new("test.toml")).unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndatabase = {db:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{extra}",
        dir.join("ca.pem"),
        dir.join("controller.pem"),
        dir.join("controller.key")
    );
    let cfg = lifeboat_controller::config::ControllerConfig::parse(&text, Path::new("test.toml")).unwrap();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(lifeboat_controller::serve(cfg, listener, async {
        let _ = rx.await;
    }));
    Running { addr, stop: Some(tx), task }
}

impl Running {
    async fn admin(&self, dir: &Path, name: &str) -> AdminClient<tonic::transport::Channel> {
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("client-{name}.pem")),
            key: dir.join(format!("client-{name}.key")),
        };
        let m = files.load().unwrap();
        let mut last = None;
        for _ in 0..50 {
            let ep = tonic::transport::Endpoint::from_shared(format!("https://{}", self.addr))
                .unwrap()
                .tls_config(m.client_config(pki::CONTROLLER_NAME))
                .unwrap();
            match ep.connect().await {
                Ok(ch) => return AdminClient::new(ch),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("controller not reachable: {last:?}");
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}

/// One HTTPS request (HTTP/1.1) to the dashboard on `port`: status, headers, body.
async fn https(ca: &[u8], port: u16, req: axum::http::Request<String>) -> (u16, axum::http::HeaderMap, String) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let res = sender.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&body).into_owned())
}

/// The tests of this file one at a time: a port from [`free_port`] is free
/// when read, and another test's listener on port 0 could take it before
/// the controller binds it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A CA with the controller's certificate and operator olga's; the CA's PEM.
fn pki_dir() -> (tempfile::TempDir, Vec<u8>) {
    lifeboat_common::tls::install_crypto_provider();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    pki::init(dir).unwrap();
    pki::issue(dir, dir, &Leaf::Controller(vec![])).unwrap();
    pki::issue(dir, dir, &Leaf::Client("olga".into(), Role::Operator)).unwrap();
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    (d, ca)
}

/// `POST /login` with `token`, from the dashboard's own origin.
fn login_request(port: u16, token: &str) -> axum::http::Request<String> {
    let host = format!("localhost:{port}");
    axum::http::Request::post("/login")
        .header("host", &host)
        .header("origin", format!("https://{host}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .unwrap()
}

/// The audit log, read with `name`'s certificate.
async fn audit_log(on: &Running, dir: &Path, name: &str) -> Vec<lifeboat_proto::v1::AuditEntry> {
    on.admin(dir, name)
        .await
        .list_audit(lifeboat_proto::v1::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_minted_over_grpc_signs_in_once_over_https() {
    let _serial = SERIAL.lock().await;
    let (d, ca) = pki_dir();
    let dir = d.path();

    // Off: no link, and the refusal says how to turn it on.
    let off = start(dir, "off.db", "").await;
    let e = off.admin(dir, "olga").await.create_dashboard_login(CreateDashboardLoginRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("[dashboard] enabled = true"), "{e}");
    off.stop().await;

    let port = free_port();
    let on = start(dir, "on.db", &format!("[dashboard]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n")).await;
    let link = on.admin(dir, "olga").await.create_dashboard_login(CreateDashboardLoginRequest {}).await.unwrap();
    let link = link.into_inner();
    assert_eq!((link.name.as_str(), link.role.as_str(), link.port), ("olga", "operator", u32::from(port)));
    assert_eq!(link.token.len(), 64);
    let host = format!("localhost:{port}");
    let get = |path: String, cookie: Option<String>| {
        let mut b = axum::http::Request::get(path).header("host", &host);
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        b.body(String::new()).unwrap()
    };
    let (st, _, body) = https(&ca, port, get(format!("/login?token={}", link.token), None)).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains(r#"name="login""#), "{body}");
    let login = || login_request(port, &link.token);
    let (st, h, _) = https(&ca, port, login()).await;
    assert_eq!(st, 303);
    let cookie = h.get("set-cookie").unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
    let (st, _, body) = https(&ca, port, get("/hosts".into(), Some(cookie.clone()))).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains(r#"<table id="hosts""#) && body.contains("olga (operator)"), "{body}");
    let (st, _, body) = https(&ca, port, login()).await;
    assert_eq!(st, 410);
    assert!(body.contains("used or has expired"), "{body}");
    let (st, h, _) = https(&ca, port, get("/hosts".into(), None)).await;
    assert_eq!((st, h.get("location").unwrap().to_str().unwrap()), (303, "/signed-out"));
    // The link and the sign-in are in the audit log under the certificate's name.
    let log = audit_log(&on, dir, "olga").await;
    for action in ["dashboard.link", "dashboard.login"] {
        assert!(log.iter().any(|e| e.actor == "olga" && e.action == action), "{action} not in {log:?}");
    }
    on.stop().await;
}

/// Signs `link` in over HTTPS; returns the session cookie and its Max-Age.
async fn redeem(ca: &[u8], port: u16, token: &str) -> (String, i64) {
    let (st, h, body) = https(ca, port, login_request(port, token)).await;
    assert_eq!(st, 303, "{body}");
    let set = h.get("set-cookie").unwrap().to_str().unwrap().to_string();
    let max_age = set.rsplit_once("Max-Age=").unwrap().1.parse().unwrap();
    (set.split(';').next().unwrap().to_string(), max_age)
}

async fn hosts_page(ca: &[u8], port: u16, cookie: &str) -> u16 {
    let req = axum::http::Request::get("/hosts")
        .header("host", format!("localhost:{port}"))
        .header("cookie", cookie)
        .body(String::new())
        .unwrap();
    https(ca, port, req).await.0
}

/// A session never outlives the client certificate that asked for its
/// link; an admin ends one name's sessions (or everybody's), audited, and
/// nobody else can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_with_the_certificate_and_when_an_admin_ends_them() {
    let _serial = SERIAL.lock().await;
    let (d, ca) = pki_dir();
    let dir = d.path();
    pki::issue(dir, dir, &Leaf::Client("ada".into(), Role::Admin)).unwrap();
    // A certificate that lasts two hours (less the hour it is back-dated).
    let brief = pki::Authority::load(dir)
        .unwrap()
        .issue_pem_lasting(&Leaf::Client("brief".into(), Role::Operator), time::Duration::hours(2))
        .unwrap();
    std::fs::write(dir.join("client-brief.pem"), &brief.cert_pem).unwrap();
    std::fs::write(dir.join("client-brief.key"), &brief.key_pem).unwrap();
    std::fs::set_permissions(dir.join("client-brief.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    let port = free_port();
    let on = start(dir, "on.db", &format!("[dashboard]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n")).await;

    let mint = |name: &'static str| {
        let on = &on;
        async move {
            on.admin(dir, name).await.create_dashboard_login(CreateDashboardLoginRequest {}).await.unwrap().into_inner()
        }
    };
    let (brief_cookie, max_age) = redeem(&ca, port, &mint("brief").await.token).await;
    assert!((7000..=7200).contains(&max_age), "the session ends with the 2-hour certificate: Max-Age={max_age}");
    let (olga_cookie, max_age) = redeem(&ca, port, &mint("olga").await.token).await;
    assert_eq!(max_age, 28_800, "session_ttl_s for a long-lived certificate");
    assert_eq!(hosts_page(&ca, port, &brief_cookie).await, 200);

    let end = |who: &'static str, name: &'static str, all: bool| {
        let on = &on;
        async move {
            let req = EndDashboardSessionsRequest { name: name.into(), all };
            on.admin(dir, who).await.end_dashboard_sessions(req).await
        }
    };
    // Only an admin; a name or all, not both, not neither; nothing changes on a refusal.
    let e = end("olga", "brief", false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("admin"), "{e}");
    for (name, all) in [("", false), ("brief", true), ("a\u{7}b", false)] {
        let e = end("ada", name, all).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name:?} {all}: {e}");
    }
    let long = Box::leak("x".repeat(257).into_boxed_str());
    assert_eq!(end("ada", long, false).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(hosts_page(&ca, port, &brief_cookie).await, 200, "a refusal ended nothing");

    let pending = mint("brief").await;
    let r = end("ada", "brief", false).await.unwrap().into_inner();
    assert_eq!((r.sessions, r.links), (1, 1));
    assert_eq!(hosts_page(&ca, port, &brief_cookie).await, 303, "brief is signed out");
    assert_eq!(hosts_page(&ca, port, &olga_cookie).await, 200, "olga is not");
    assert_eq!(https(&ca, port, login_request(port, &pending.token)).await.0, 410, "brief's unused link is gone too");
    let r = end("ada", "", true).await.unwrap().into_inner();
    assert_eq!(r.sessions, 1, "everybody's: olga's");
    assert_eq!(hosts_page(&ca, port, &olga_cookie).await, 303);

    let log = audit_log(&on, dir, "ada").await;
    let ended: Vec<_> = log.iter().filter(|e| e.action == "dashboard.sessions_ended").collect();
    assert_eq!(ended.len(), 2, "{log:?}");
    assert!(ended.iter().all(|e| e.actor == "ada"), "{ended:?}");
    assert!(
        ended.iter().any(|e| e.detail.contains("\"brief\"")) && ended.iter().any(|e| e.detail.contains("everybody"))
    );
    on.stop().await;
}
