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
use lifeboat_proto::v1::CreateDashboardLoginRequest;
use lifeboat_proto::v1::admin_client::AdminClient;
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_minted_over_grpc_signs_in_once_over_https() {
    lifeboat_common::tls::install_crypto_provider();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    pki::init(dir).unwrap();
    pki::issue(dir, dir, &Leaf::Controller(vec![])).unwrap();
    pki::issue(dir, dir, &Leaf::Client("olga".into(), Role::Operator)).unwrap();
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();

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
    let login = || {
        axum::http::Request::post("/login")
            .header("host", &host)
            .header("origin", format!("https://{host}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={}", link.token))
            .unwrap()
    };
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
    let log = on
        .admin(dir, "olga")
        .await
        .list_audit(lifeboat_proto::v1::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    for action in ["dashboard.link", "dashboard.login"] {
        assert!(log.iter().any(|e| e.actor == "olga" && e.action == action), "{action} not in {log:?}");
    }
    on.stop().await;
}
