//! Connection floods against the real `lifeboat-controller` binary (mutual
//! TLS, its own descriptor table and limits): idle TCP sockets, stalled
//! half-handshakes and handshakes with a foreign certificate, while an
//! operator and a new agent still get in; the stalled handshakes are closed
//! after the handshake timeout, counted in metrics and logged rate-limited.
//! And the CLI's `--timeout` against a peer that never speaks TLS.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lifeboat_common::identity::Role;
use lifeboat_common::pki;
use lifeboat_common::tls::TlsFiles;
use lifeboat_e2e::{Agent, ControllerProcess, Pki, agent_config, metric_value, test_node, wait_for};
use lifeboat_proto::v1::ListHostsRequest;
use lifeboat_proto::v1::admin_client::AdminClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tonic::transport::Endpoint;

async fn connect_from(src: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((src, 0)))?;
    s.connect(to).await
}

/// Whether the controller has closed `s` (EOF or reset) by now.
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(5), s.read(&mut b)).await {
        Err(_) => false,
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
    }
}

async fn admin(url: &str, tls: &TlsFiles) -> Result<AdminClient<tonic::transport::Channel>, tonic::transport::Error> {
    let m = tls.load().expect("client tls");
    let ch = Endpoint::from_shared(url.to_string())?
        .tls_config(m.client_config(pki::CONTROLLER_NAME))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(AdminClient::new(ch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_leaves_room_for_operators_and_agents() {
    lifeboat_common::raise_open_files_limit();
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    std::fs::write(dir.join("a.xml"), test_node(&[])).unwrap();
    std::fs::write(dir.join("b.xml"), test_node(&[])).unwrap();
    let uri = |h: &str| format!("test://{}", dir.join(format!("{h}.xml")).display());
    let c = ControllerProcess::start(&pki, &dir.join("c.db"), 200, 3000).await;
    let a = Agent::start(&agent_config("host-a", &uri("a"), &c.url(), &pki.agent("host-a"), ""));
    let op_tls = pki.client("olga", Role::Operator);

    // Idle sockets that never send a byte, from 127.0.0.2.
    let t0 = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..3000 {
        match connect_from([127, 0, 0, 2], c.addr).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connecting idle socket {}: {e}", idle.len()),
        }
    }
    // Stalled half-handshakes from 127.0.0.3: a TLS record header that
    // announces a ClientHello which never comes.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut s = connect_from([127, 0, 0, 3], c.addr).await.expect("connect");
        let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
        stalled.push(s);
    }
    let flood_s = t0.elapsed().as_secs_f64();
    // Handshakes with a certificate from another CA.
    let foreign = Pki::new(&dir.join("foreign"));
    let f = foreign.client("mallory", Role::Operator);
    let bad = TlsFiles { ca: pki.controller().ca, cert: f.cert, key: f.key };
    for _ in 0..40 {
        // TLS 1.3: the client may finish before the server's verdict arrives;
        // then the first call fails.
        if let Ok(mut x) = admin(&c.url(), &bad).await {
            assert!(
                x.who_am_i(lifeboat_proto::v1::WhoAmIRequest::default()).await.is_err(),
                "a foreign certificate was accepted"
            );
        }
    }

    // With the flood in place: an operator's request and a new agent's session.
    let t = Instant::now();
    let mut op = admin(&c.url(), &op_tls).await.expect("operator connects during the flood");
    let hosts =
        op.list_hosts(ListHostsRequest::default()).await.expect("operator request during the flood").into_inner().hosts;
    let op_s = t.elapsed().as_secs_f64();
    assert!(op_s < 3.0, "operator's request took {op_s:.2} s during the flood");
    let b = Agent::start(&agent_config("host-b", &uri("b"), &c.url(), &pki.agent("host-b"), ""));
    let (_, agent_took) = wait_for(Duration::from_secs(8), "host-b's session during the flood", || {
        let mut op = op.clone();
        async move {
            let hosts = op.list_hosts(ListHostsRequest::default()).await.ok()?.into_inner().hosts;
            hosts
                .iter()
                .any(|h| h.info.as_ref().is_some_and(|i| i.host_id == "host-b") && h.liveness == "REACHABLE")
                .then_some(())
        }
    })
    .await;

    let during = c.metrics_text().await;
    let in_progress = metric_value(&during, "lifeboat_tls_handshakes_in_progress");
    let open_conns = metric_value(&during, "lifeboat_connections_open");
    assert!(
        (60.0..=70.0).contains(&in_progress),
        "handshakes in progress during the flood: {in_progress} (32 per address)\n{during}"
    );
    assert!(open_conns >= 3.0, "established connections: {open_conns}\n{during}");

    // Most idle sockets were closed at once (over the per-address cap); the
    // ones that got a handshake slot, and the stalled ones, only after the
    // handshake timeout.
    let mut open_idle = 0usize;
    for s in idle.iter_mut() {
        if !closed(s).await {
            open_idle += 1;
        }
    }
    assert!(open_idle <= 32, "{open_idle} idle sockets from one address still open (cap 32)");
    // The deadline counts from each handshake's start, which a loaded
    // machine reaches some seconds after the flood began: poll, and report
    // how long after the flood's end the last one closed.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(t0.elapsed())).await;
    let mut still_open = usize::MAX;
    let poll_start = Instant::now();
    while poll_start.elapsed() < Duration::from_secs(20) {
        still_open = 0;
        for s in idle.iter_mut().chain(stalled.iter_mut()) {
            if !closed(s).await {
                still_open += 1;
            }
        }
        if still_open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(still_open, 0, "sockets still open 20 s after the 10 s handshake timeout");
    println!("every stalled socket closed {:.1} s after the flood began", t0.elapsed().as_secs_f64());

    let m = c.metrics_text().await;
    assert_eq!(metric_value(&m, "lifeboat_tls_handshakes_in_progress"), 0.0, "{m}");
    let timeouts = metric_value(&m, "lifeboat_tls_handshake_failures_total{reason=\"timeout\"}");
    let per_ip = metric_value(&m, "lifeboat_connections_refused_total{reason=\"handshake_limit_per_ip\"}");
    let bad_cert = metric_value(&m, "lifeboat_tls_handshake_failures_total{reason=\"client_certificate\"}");
    assert!(timeouts >= (open_idle + 32) as f64 * 0.9, "handshake timeouts counted: {timeouts}\n{m}");
    assert!(per_ip >= 2900.0, "per-address refusals counted: {per_ip}\n{m}");
    assert!(bad_cert >= 40.0, "bad-certificate handshakes counted: {bad_cert}\n{m}");
    let log = c.log_text();
    let lines = log.lines().filter(|l| l.contains("connection refused") || l.contains("TLS handshake failed")).count();
    assert!(lines <= 12, "{lines} refusal log lines for ~3,100 refusals (not rate-limited?):\n{log}");
    assert!(log.contains("handshake_limit_per_ip") && log.contains("reason=\"timeout\""), "{log}");
    println!(
        "flood: 3000 idle + 50 stalled sockets in {flood_s:.2} s; {} hosts listed; operator request {op_s:.3} s; \
         new agent REACHABLE in {:.2} s; {in_progress} handshakes in progress, {open_conns} connections open; {open_idle} idle sockets held a handshake slot; metrics: {timeouts} timeouts, \
         {per_ip} per-address refusals, {bad_cert} bad certificates; {lines} log lines",
        hosts.len(),
        agent_took.as_secs_f64()
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_timeout_covers_a_handshake_that_never_comes() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let tls = pki.client("olga", Role::Operator);
    // Accepts and never answers.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let cli = lifeboat_e2e::workspace_binary("lifeboat");
    let t = Instant::now();
    let out = tokio::process::Command::new(cli)
        .args(["--timeout", "3", "--controller-url", &format!("https://{addr}")])
        .arg("--ca")
        .arg(&tls.ca)
        .arg("--cert")
        .arg(&tls.cert)
        .arg("--key")
        .arg(&tls.key)
        .args(["hosts", "list"])
        .output()
        .await
        .unwrap();
    let took = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("lifeboat --timeout 3 against a silent peer: {took:.2} s, {:?}: {err}", out.status.code());
    assert!(took < 4.5, "took {took:.2} s with --timeout 3");
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no TLS session within 3 s"), "{err}");
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_sessions_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    std::fs::write(dir.join("a.xml"), test_node(&[])).unwrap();
    let limits = lifeboat_controller::conn::Limits {
        idle_timeout: Duration::from_millis(1500),
        ..lifeboat_controller::conn::Limits::from_nofile(4096)
    };
    let c = lifeboat_e2e::Controller::start_limited(&pki, &dir.join("c.db"), 0, 200, 1000, "", Some(limits)).await;
    let a = Agent::start(&agent_config(
        "host-a",
        &format!("test://{}", dir.join("a.xml").display()),
        &c.url(),
        &pki.agent("host-a"),
        "",
    ));
    let idle_closed = || {
        metric_value(
            &lifeboat_controller::telemetry::get().encode(),
            "lifeboat_connections_closed_total{reason=\"idle\"}",
        )
    };
    let before = idle_closed();
    let mut op = c.admin(&pki.client("olga", Role::Viewer)).await;
    wait_for(Duration::from_secs(5), "host-a REACHABLE", || {
        let mut op = op.clone();
        async move {
            let h = op.list_hosts(ListHostsRequest::default()).await.ok()?.into_inner().hosts;
            h.iter().any(|h| h.liveness == "REACHABLE").then_some(())
        }
    })
    .await;
    // The operator's connection carries nothing now; the agent's carries its session.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = idle_closed();
    // Exactly one: the operator's. The agent's session (and so its connection)
    // is in flight all along.
    assert_eq!(after - before, 1.0, "idle connections closed: {before} -> {after}");
    // The agent's session outlived the idle timeout: the host never went unreachable
    // (1 s without heartbeats would have made it so), and it had one session only.
    let h = op.list_hosts(ListHostsRequest::default()).await.expect("a new call dials again").into_inner().hosts;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].liveness, "REACHABLE", "{h:?}");
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_soft_limit_only_operators_and_known_agents_get_in() {
    use lifeboat_proto::v1::agent_session_client::AgentSessionClient;
    use lifeboat_proto::v1::{AgentMessage, Hello, WhoAmIRequest, agent_message::Msg};
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    std::fs::write(dir.join("a.xml"), test_node(&[])).unwrap();
    let limits = lifeboat_controller::conn::Limits {
        max_connections: 40,
        soft_connections: 4,
        ..lifeboat_controller::conn::Limits::from_nofile(4096)
    };
    let c = lifeboat_e2e::Controller::start_limited(&pki, &dir.join("c.db"), 0, 200, 3000, "", Some(limits)).await;
    let a = Agent::start(&agent_config(
        "host-a",
        &format!("test://{}", dir.join("a.xml").display()),
        &c.url(),
        &pki.agent("host-a"),
        "",
    ));
    let reserved = || {
        metric_value(
            &lifeboat_controller::telemetry::get().encode(),
            "lifeboat_connections_refused_total{reason=\"reserved_for_known_peers\"}",
        )
    };
    let before = reserved();
    // Fill up to the soft limit with operators' connections (host-a's session is one more).
    let mut ops = Vec::new();
    for i in 0..4 {
        let mut op = c.admin(&pki.client(&format!("op{i}"), Role::Viewer)).await;
        op.who_am_i(WhoAmIRequest::default()).await.expect("operator below the soft limit");
        ops.push(op);
    }
    wait_for(Duration::from_secs(5), "host-a known", || {
        let mut op = ops[0].clone();
        async move { (op.list_hosts(ListHostsRequest::default()).await.ok()?.into_inner().hosts.len() == 1).then_some(()) }
    })
    .await;
    // An agent certificate for a host the controller has never seen: refused above the soft limit.
    let stranger = async {
        let m = pki.agent("stranger").load().unwrap();
        let ch = Endpoint::from_shared(c.url())
            .unwrap()
            .tls_config(m.client_config(pki::CONTROLLER_NAME))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let hello = AgentMessage {
            msg: Some(Msg::Hello(Hello { host_id: "stranger".into(), agent_version: "t".into(), boot_id: "b".into() })),
        };
        let mut s = AgentSessionClient::new(ch)
            .session(tokio_stream::iter(vec![hello]))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        s.message().await.map_err(|e| e.to_string())
    };
    let r = tokio::time::timeout(Duration::from_secs(10), stranger).await.expect("the stranger's attempt hung");
    assert!(r.is_err(), "an unknown agent got a session above the soft limit: {r:?}");
    assert!(reserved() >= before + 1.0, "reserved refusals: {before} -> {}", reserved());
    // An operator still gets in, and so does the known host's agent after a restart.
    let mut late = c.admin(&pki.client("late", Role::Operator)).await;
    late.who_am_i(WhoAmIRequest::default()).await.expect("an operator above the soft limit");
    a.stop().await;
    wait_for(Duration::from_secs(10), "host-a's session closed", || {
        let mut op = late.clone();
        async move {
            let h = op.list_hosts(ListHostsRequest::default()).await.ok()?.into_inner().hosts;
            (h.len() == 1 && !h[0].session_open).then_some(())
        }
    })
    .await;
    let a2 = Agent::start(&agent_config(
        "host-a",
        &format!("test://{}", dir.join("a.xml").display()),
        &c.url(),
        &pki.agent("host-a"),
        "",
    ));
    wait_for(Duration::from_secs(10), "host-a back", || {
        let mut op = late.clone();
        async move {
            let h = op.list_hosts(ListHostsRequest::default()).await.ok()?.into_inner().hosts;
            (h.len() == 1 && h[0].session_open).then_some(())
        }
    })
    .await;
    a2.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    // 26 descriptors in all: the controller's own files and a few
    // connections, so that a flood runs it out (EMFILE) despite its limits.
    let started = Instant::now();
    let c = ControllerProcess::start_with_nofile(&pki, &dir.join("c.db"), 200, 3000, Some(26)).await;
    let mut held = Vec::new();
    for _ in 0..200 {
        match connect_from([127, 0, 0, 2], c.addr).await {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.child.id())).unwrap();
        let f: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let (t0, c0) = (Instant::now(), cpu());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ticks = cpu() - c0;
    let secs = t0.elapsed().as_secs_f64();
    let log = c.log_text();
    assert!(
        log.contains("cannot accept a connection"),
        "no EMFILE seen (the test did not exhaust the descriptors):\n{log}"
    );
    // 100 ticks per second: a spinning accept loop would burn ~300.
    assert!(ticks < 60, "{ticks} CPU ticks in {secs:.1} s while out of descriptors: spinning?");
    let lines = log.lines().filter(|l| l.contains("cannot accept a connection")).count();
    let up = started.elapsed().as_secs();
    assert!(lines as u64 <= 2 + up / 10, "{lines} accept-error lines in {up} s (one per 10 s):\n{log}");
    drop(held);
    let m = pki.client("olga", Role::Viewer).load().unwrap();
    let (_, took) = wait_for(Duration::from_secs(15), "an operator after the flood", || {
        let url = c.url();
        let m = m.clone();
        async move {
            let ch = Endpoint::from_shared(url)
                .ok()?
                .tls_config(m.client_config(pki::CONTROLLER_NAME))
                .ok()?
                .connect()
                .await
                .ok()?;
            AdminClient::new(ch).who_am_i(lifeboat_proto::v1::WhoAmIRequest::default()).await.ok().map(|_| ())
        }
    })
    .await;
    println!(
        "EMFILE: {ticks} CPU ticks in {secs:.1} s out of descriptors, {lines} log lines in {up} s; an operator got in {:.2} s after the flood ended",
        took.as_secs_f64()
    );
}
