//! The web dashboard in the lab, driven by a real headless Chromium
//! (Debian's `chromium` + `chromium-driver`, `lifeboat_e2e::browser`).
//! Chromium runs in the controller's network namespace and trusts the lab
//! controller's key. Without root, the lab's packages or Chromium each test
//! prints why it skips; under `CI=true` it fails instead.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat_e2e::lab::{Lab, skip_or_fail};
use lifeboat_e2e::{browser_or_skip, lab_or_skip};
use serde_json::{Value, json};

/// Chromium processes of any browser left in a lab namespace.
fn browser_pids_in(netns: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "pids", netns]).output().expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            !zombie && (comm.contains("chrom") || comm.contains("headless"))
        })
        .map(String::from)
        .collect()
}

/// A process killed when dropped (the test's own HTTPS server).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `dir` over HTTPS with `cert`/`key` on `port` inside `netns`
/// (Python's http.server wrapped in TLS), once it listens.
fn https_server(
    netns: &str,
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    port: u16,
) -> Server {
    const PY: &str = "import functools, http.server, ssl, sys\n\
        d, cert, key, port = sys.argv[1:5]\n\
        h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=d)\n\
        s = http.server.ThreadingHTTPServer(('0.0.0.0', int(port)), h)\n\
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
        c.load_cert_chain(cert, key)\n\
        s.socket = c.wrap_socket(s.socket, server_side=True)\n\
        s.serve_forever()\n";
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "python3", "-c", PY])
        .arg(dir)
        .arg(cert)
        .arg(key)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the HTTPS server");
    let server = Server(child);
    let t = Instant::now();
    loop {
        let ss = Command::new("ip")
            .args(["netns", "exec", netns, "ss", "-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss");
        if !String::from_utf8_lossy(&ss.stdout).trim().is_empty() {
            return server;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the HTTPS server does not listen on {port} in {netns}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The browser works in the lab before any dashboard exists: chromedriver and
/// Chromium start in the controller's namespace, load a page served there
/// over HTTPS with the lab controller's certificate (trusted by its key: a
/// secure context), refuse a page whose certificate has another key, take a
/// screenshot and leave no process behind.
#[test]
fn browser_reaches_the_lab_controller_namespace() {
    let lab = lab_or_skip!(1, 1);
    let netns = lab.paths["CONTROLLER_NETNS"].clone();
    let ip = lab.paths["CONTROLLER_IP"].clone();
    let pki = lab.path("PKI_DIR");
    let b = browser_or_skip!(lab);
    println!("browser started (chromedriver + a Chromium session in {netns}) in {:?}", b.started_in);

    let site = tempfile::tempdir().unwrap();
    std::fs::write(
        site.path().join("index.html"),
        "<!doctype html><title>lab check</title><h1 id=\"hello\">Lifeboat lab: Chromium runs in lb-ctl</h1>",
    )
    .unwrap();
    let _good = https_server(&netns, site.path(), &pki.join("controller.pem"), &pki.join("controller.key"), 8444);
    let t = Instant::now();
    b.goto(&format!("https://{ip}:8444/"));
    b.wait_css("#hello", Duration::from_secs(10));
    println!("first page over HTTPS loaded in {:?}", t.elapsed());
    assert_eq!(b.text("#hello"), "Lifeboat lab: Chromium runs in lb-ctl");
    assert_eq!(b.exec_js("return [location.protocol, window.isSecureContext];", vec![]), json!(["https:", true]));
    let shot = b.screenshot("lab-browser-check");
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "{}", shot.display());

    // Another key: refused, so the browser trusts the lab controller's key only.
    let other = tempfile::tempdir().unwrap();
    let (cert, key) = (other.path().join("other.pem"), other.path().join("other.key"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", &format!("/CN={ip}"), "-addext", &format!("subjectAltName=IP:{ip}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl req");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let _bad = https_server(&netns, site.path(), &cert, &key, 8445);
    match b.try_goto(&format!("https://{ip}:8445/")) {
        Err(e) => println!("a certificate with another key is refused: {e}"),
        Ok(()) => {
            assert_eq!(b.count("#hello"), 0, "a page with an untrusted certificate was shown");
            let title = b.exec_js("return document.title;", vec![]);
            println!("a certificate with another key is refused: Chromium shows its error page ({}, {title})", b.url());
        }
    }

    let left = b.close();
    assert!(left.is_empty(), "browser processes left: {left:?}");
    let strays = browser_pids_in(&netns);
    assert!(strays.is_empty(), "chromedriver/Chromium processes left in {netns}: {strays:?}");
}

/// Signs the browser in as `role` with a one-time link from
/// `lifeboat dashboard login --output json` run with that role's
/// certificate; returns the link's JSON once the browser is on /hosts.
fn sign_in(lab: &Lab, b: &lifeboat_e2e::browser::Browser, base: &str, role: &str) -> Value {
    let (code, out, err) = lab.cli_as(role, &["dashboard", "login", "--output", "json"]);
    assert_eq!(code, 0, "dashboard login as {role}: {err}");
    let link: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("dashboard login JSON ({e}): {out}"));
    let url = link["url"].as_str().expect("url");
    let token = url.strip_prefix(&format!("{base}/login?token=")).unwrap_or_else(|| panic!("link for {base}: {url}"));
    assert!(token.len() == 64 && token.bytes().all(|c| c.is_ascii_hexdigit()), "token of {role}");
    assert_eq!(link["role"], role, "{link}");
    assert_eq!(link["name"], role, "the lab's {role} certificate is named {role}: {link}");
    let now = lifeboat_common::now_unix_ms();
    let expires = link["expires_unix_ms"].as_i64().expect("expires_unix_ms");
    assert!(expires > now && expires <= now + 61_000, "the link works within 60 s: {link}");
    let t = Instant::now();
    b.goto(url);
    b.wait_js(Duration::from_secs(10), &format!("signed in as {role}: on /hosts"), "location.pathname === '/hosts'");
    b.wait_css("table#hosts", Duration::from_secs(5));
    println!("signed in as {role} in {:?}", t.elapsed());
    // HttpOnly: the page's scripts cannot read the session cookie.
    let cookies = b.exec_js("return document.cookie;", vec![]);
    assert!(!cookies.as_str().unwrap_or_default().contains("__Host-lifeboat"), "{cookies}");
    link
}

/// POSTs `body` (form-encoded) to `path` from the page with `fetch`, with
/// the given extra headers; returns (HTTP status, body text).
fn post(b: &lifeboat_e2e::browser::Browser, path: &str, body: &str, headers: Value) -> (u64, String) {
    let r = b.exec_async_js(
        "const [path, body, headers, done] = arguments;\n\
         headers['Content-Type'] = 'application/x-www-form-urlencoded';\n\
         fetch(path, {method: 'POST', body, headers, credentials: 'same-origin', redirect: 'manual'})\n\
           .then(r => r.text().then(t => done([r.status, t])))\n\
           .catch(e => done([0, String(e)]));",
        vec![json!(path), json!(body), headers],
    );
    (r[0].as_u64().unwrap_or(0), r[1].as_str().unwrap_or_default().to_string())
}

/// The page's CSRF token.
fn csrf(b: &lifeboat_e2e::browser::Browser) -> String {
    b.attr("meta[name=lifeboat-csrf]", "content").filter(|t| !t.is_empty()).expect("<meta name=lifeboat-csrf>")
}

/// Opens `path` and waits until its live stream is open.
fn open_live(b: &lifeboat_e2e::browser::Browser, base: &str, path: &str) {
    b.goto(&format!("{base}{path}"));
    b.wait_css("body[data-live-state=open]", Duration::from_secs(10));
}

fn badge(host: &str) -> String {
    format!("tr[data-host=\"{host}\"] .status-badge")
}

/// Waits (at most 5 s) until `expr` holds on the open page; prints and
/// asserts that it took under 1 s from `since`.
fn shown_within_a_second(b: &lifeboat_e2e::browser::Browser, since: Instant, what: &str, expr: &str) {
    b.wait_js(Duration::from_secs(5), what, expr);
    let took = since.elapsed();
    println!("{what} after {took:?}");
    assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
}

/// [`shown_within_a_second`] for `host`'s badge reading `status`.
fn badge_turns(b: &lifeboat_e2e::browser::Browser, host: &str, status: &str, since: Instant, what: &str) {
    let sel = badge(host);
    shown_within_a_second(
        b,
        since,
        &format!("{what}: {host} reads {status} on the open page"),
        &format!("document.querySelector('{sel}')?.classList.contains('status-{status}')"),
    );
}

/// Moves `vm` from `from` to `to` the way an operator does on the open
/// guests page of `from`: the row's Move button, the target drop-down
/// (`to` NOT ACCEPTING, marked so), Plan (every check passes, nothing
/// changes), Confirm → the job page, live until SUCCEEDED; then the lab
/// says the guest runs on `to`, once.
fn move_from_the_page(lab: &Lab, b: &lifeboat_e2e::browser::Browser, vm: &str, from: &str, to: &str) {
    let g = lab.vm(vm).unwrap_or_else(|| panic!("{vm}"));
    assert_eq!(g["host_id"], from, "{g}");
    let uuid = g["uuid"].as_str().expect("uuid").to_string();
    b.click(&format!("tr[data-uuid=\"{uuid}\"] [data-action=move-guest]"));
    b.wait_css("dialog[open] select[name=target][data-loaded=true]", Duration::from_secs(5));
    let option = b.text(&format!("dialog[open] select[name=target] option[value=\"{to}\"]"));
    assert!(option.contains("NOT ACCEPTING"), "{to} is offered and marked NOT ACCEPTING: {option:?}");
    assert_eq!(
        b.count(&format!("dialog[open] select[name=target] option[value=\"{from}\"]")),
        0,
        "the source is not a target"
    );
    b.select("dialog[open] select[name=target]", to);
    b.click("dialog[open] [data-action=plan-move]");
    b.wait_css("dialog[open] .result .plan[data-plan-id]", Duration::from_secs(10));
    assert_eq!(b.count("dialog[open] .plan .check.failed"), 0, "a failed check:\n{}", b.text("dialog[open] .result"));
    assert_eq!(b.attr("dialog[open] .plan", "data-executable").as_deref(), Some("true"));
    assert_eq!(b.text(&format!("dialog[open] .plan-guests tr[data-uuid=\"{uuid}\"] td.target")).trim(), to);
    assert_eq!(lab.vm(vm).expect(vm)["host_id"], from, "a plan moves nothing");
    b.screenshot("move-plan");
    b.click("dialog[open] [data-action=confirm-move]");
    b.wait_js(Duration::from_secs(10), "on the move's job page", "location.pathname.startsWith('/jobs/')");
    b.wait_css("body[data-live-state=open]", Duration::from_secs(10));
    b.exec_js("window.__notReloaded = true; return null;", vec![]);
    let t = Instant::now();
    b.wait_js(
        Duration::from_secs(90),
        "the move SUCCEEDED on its open job page",
        "document.querySelector('#job')?.dataset.jobState === 'SUCCEEDED'",
    );
    assert_eq!(b.exec_js("return window.__notReloaded === true;", vec![]), json!(true), "shown live, no reload");
    println!("move of {vm} from the page: SUCCEEDED on the open job page after {:?}", t.elapsed());
    let row = format!("tr.move[data-uuid=\"{uuid}\"]");
    b.wait_js(
        Duration::from_secs(5),
        "the target reports the guest running",
        &format!("document.querySelector('{row} td.arrived')?.textContent.trim() === 'running'"),
    );
    assert_eq!(b.attr(&row, "data-move-state").as_deref(), Some("RUNNING"));
    assert_eq!(b.text(&format!("{row} td.target")).trim(), to);
    let g = lab.vm(vm).expect(vm);
    assert_eq!(g["host_id"], to, "{g}");
    assert_eq!(g["state"], "running", "{g}");
    assert_eq!(lab.copies(&uuid), 1, "{vm} runs exactly once");
}

/// Pool page, live updates and roles (design §6): the hosts page with its
/// colours; a CLI status change and a `virsh destroy` reach open pages
/// within 1 s; the operator's action POST needs the CSRF header and is
/// audited under the signed-in name; a viewer sees no action control and is
/// refused even with a valid CSRF token; a used link gives 410.
#[test]
fn dashboard_lab_pool_live_actions_and_roles() {
    let lab = lab_or_skip!(3, 2);
    let Some(base) = lab.paths.get("CONTROLLER_DASHBOARD_URL").cloned() else {
        skip_or_fail("the lab's controller has no dashboard (LAB_DASHBOARD=0, or a controller without [dashboard])");
        return;
    };
    let netns = lab.paths["CONTROLLER_NETNS"].clone();
    let b = browser_or_skip!(lab);
    println!("browser started in {:?}", b.started_in);
    lab.wait(Duration::from_secs(20), "6 running guests", || {
        let v = lab.vms();
        v.len() == 6 && v.iter().all(|g| g["state"] == "running")
    });
    lab.past_startup_grace();

    // Without a session: pages send to /signed-out.
    b.goto(&format!("{base}/hosts"));
    b.wait_js(Duration::from_secs(5), "redirected to /signed-out", "location.pathname === '/signed-out'");

    // 1. The operator's hosts page: three green AVAILABLE, reachable hosts.
    let op_link = sign_in(&lab, &b, &base, "operator");
    assert_eq!(b.count("table#hosts tr[data-host]"), 3);
    for h in ["host-a", "host-b", "host-c"] {
        let class = b.attr(&badge(h), "class").unwrap_or_default();
        assert!(class.split_whitespace().any(|c| c == "status-AVAILABLE"), "{h}: {class}");
        let bg = b.css_value(&badge(h), "background-color");
        assert!(bg.contains("46, 125, 50"), "{h} AVAILABLE is green #2e7d32: {bg}");
        let live = b.text(&format!("tr[data-host=\"{h}\"] .liveness"));
        assert!(live.trim().eq_ignore_ascii_case("reachable"), "{h}: {live}");
    }
    b.wait_css("body[data-live-state=open]", Duration::from_secs(10));
    b.screenshot("hosts");

    // A link to a page, followed from another site (the browser does not
    // send the SameSite=Strict cookie with it), opens that page signed in.
    b.goto(&format!("data:text/html,<a id=go href=\"{base}/hosts/host-b\">host-b</a>"));
    b.click("#go");
    b.wait_js(Duration::from_secs(10), "host-b's page from a foreign link", "!!document.querySelector('table#host')");
    assert_eq!(b.url(), format!("{base}/hosts/host-b"), "the page the link named");
    open_live(&b, &base, "/hosts");

    // 2. A status set with the CLI reaches the open page within 1 s.
    let (code, _, err) = lab.cli(&["hosts", "set-status", "host-c", "NOT_ACCEPTING", "--reason", "dashboard test"]);
    assert_eq!(code, 0, "set-status: {err}");
    badge_turns(&b, "host-c", "NOT_ACCEPTING", Instant::now(), "CLI set-status");
    let bg = b.css_value(&badge("host-c"), "background-color");
    assert!(bg.contains("249, 168, 37"), "NOT_ACCEPTING is yellow #f9a825: {bg}");

    // 3. A guest destroyed with virsh reads shutoff on an open /guests page within 1 s.
    let uuid = lab.vm("vm-b1").expect("vm-b1")["uuid"].as_str().expect("uuid").to_string();
    open_live(&b, &base, "/guests?host=host-b");
    let state = format!("tr[data-uuid=\"{uuid}\"] td.state");
    assert_eq!(b.text(&state).trim(), "running");
    lab.excuse("vm-b1", "destroyed on purpose (the dashboard shows it shut off)");
    lab.virsh("host-b", &["destroy", "vm-b1"]);
    shown_within_a_second(
        &b,
        Instant::now(),
        "virsh destroy: vm-b1 reads shutoff on the open /guests page, after virsh returned,",
        &format!("document.querySelector('{state}')?.textContent.trim() === 'shutoff'"),
    );
    b.screenshot("guests");

    // 4. Testing a repaired host: vm-b2 moved from the guests page to
    // host-c, which is NOT ACCEPTING; the drop-down offers it, marked.
    move_from_the_page(&lab, &b, "vm-b2", "host-b", "host-c");
    open_live(&b, &base, "/guests?host=host-c");
    let b2 = lab.vm("vm-b2").expect("vm-b2")["uuid"].as_str().expect("uuid").to_string();
    assert_eq!(b.text(&format!("tr[data-uuid=\"{b2}\"] td.state")).trim(), "running", "vm-b2 on host-c's list");

    // 5. The host page and its set-status dialog, clicked as an operator
    // would: the four statuses explained; AVAILABLE reaches the open page live.
    open_live(&b, &base, "/hosts/host-c");
    assert!(b.count("[data-action]") > 0, "an operator's host page has action controls");
    b.screenshot("host");
    // A live update while the operator types a "since" filter keeps the text and the focus.
    b.fill("#live form.since input[name=since]", "2026-12");
    let (code, _, err) = lab.cli(&["hosts", "set-status", "host-c", "MAINTENANCE", "--reason", "dashboard test"]);
    assert_eq!(code, 0, "set-status: {err}");
    b.wait_js(
        Duration::from_secs(5),
        "host-c MAINTENANCE on its open page",
        "document.querySelector('#live table#host .status-badge')?.classList.contains('status-MAINTENANCE')",
    );
    let kept = b.exec_js(
        "var i = document.querySelector('#live form.since input[name=since]');\n\
         return [i.value, document.activeElement === i];",
        vec![],
    );
    assert_eq!(kept, json!(["2026-12", true]), "the typed filter survives a live update");
    b.click("[data-action=set-status]");
    b.wait_css("dialog[open]", Duration::from_secs(5));
    assert_eq!(b.count("dialog[open] .status-help"), 4, "the dialog explains the four statuses");
    for st in ["AVAILABLE", "NOT_ACCEPTING", "MAINTENANCE", "OFFLINE"] {
        let sel = format!("dialog[open] .status-help[data-status={st}] .status-badge.status-{st}");
        assert_eq!(b.count(&sel), 1, "{sel}");
    }
    b.click("dialog[open] .status-help[data-status=AVAILABLE] input[type=radio]");
    b.fill("dialog[open] input[name=reason]", "dashboard test: back in the pool");
    // Plan first: the checks the change would meet, and nothing changed yet.
    b.click("dialog[open] [data-action=plan-status]");
    b.wait_css("dialog[open] .result .plan[data-status=AVAILABLE]", Duration::from_secs(5));
    assert_eq!(b.attr("dialog[open] .plan", "data-ok").as_deref(), Some("true"), "the plan passes");
    assert_eq!(b.count("dialog[open] .plan .check.failed"), 0);
    assert_eq!(lab.host("host-c").expect("host-c")["status"], "MAINTENANCE", "a plan changes nothing");
    b.screenshot("host-status-dialog");
    b.click("dialog[open] [data-action=confirm-status]");
    shown_within_a_second(
        &b,
        Instant::now(),
        "set-status dialog: host-c's page reads AVAILABLE, after the click,",
        "document.querySelector('#live table#host .status-badge')?.classList.contains('status-AVAILABLE')",
    );
    assert_eq!(lab.host("host-c").expect("host-c")["status"], "AVAILABLE");

    // 6. The used link: 410, and nothing signed in by it.
    let token = op_link["url"].as_str().unwrap().rsplit_once("token=").unwrap().1.to_string();
    let (status, text) = post(&b, "/login", &format!("token={token}"), json!({}));
    assert_eq!(status, 410, "a used link: {text}");
    assert!(text.contains("used or has expired"), "{text}");
    b.goto(op_link["url"].as_str().unwrap());
    b.wait_js(
        Duration::from_secs(10),
        "the used link's page",
        "document.body && document.body.innerText.includes('used or has expired')",
    );

    // 7. CSRF: the operator's POST without the header, or with a wrong one, is
    // refused and changes nothing; with it, it is done and audited as operator.
    open_live(&b, &base, "/hosts");
    let token = csrf(&b);
    let form = "status=NOT_ACCEPTING&reason=dashboard+csrf+test";
    let (status, text) = post(&b, "/hosts/host-a/status", form, json!({}));
    assert_eq!(status, 403, "no CSRF header: {text}");
    assert!(!text.trim().is_empty(), "a refusal names the failed check");
    let (status, text) = post(&b, "/hosts/host-a/status", form, json!({"X-Lifeboat-Csrf": "0".repeat(64)}));
    assert_eq!(status, 403, "a wrong CSRF token: {text}");
    assert_eq!(lab.host("host-a").expect("host-a")["status"], "AVAILABLE", "a refused POST changed host-a");
    let (status, text) = post(&b, "/hosts/host-a/status", form, json!({"X-Lifeboat-Csrf": token}));
    assert_eq!(status, 200, "the operator's POST with its CSRF token: {text}");
    badge_turns(&b, "host-a", "NOT_ACCEPTING", Instant::now(), "dashboard POST");
    assert_eq!(lab.host("host-a").expect("host-a")["status"], "NOT_ACCEPTING");
    let log = lab.cli_json(&["log", "--host", "host-a"]).expect("log --host host-a");
    let row = log
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|e| e["action"] == "host.status" && e["detail"].as_str().is_some_and(|d| d.contains("csrf test")))
        })
        .unwrap_or_else(|| panic!("no audit row of the dashboard's status change: {log}"));
    assert_eq!(row["actor"], "operator", "audited under the signed-in name: {row}");
    let (status, text) = post(
        &b,
        "/hosts/host-a/status",
        "status=AVAILABLE&reason=dashboard+test+done",
        json!({"X-Lifeboat-Csrf": csrf(&b)}),
    );
    assert_eq!(status, 200, "{text}");

    // 8. A viewer: no action control anywhere, and a POST with the viewer's
    // valid CSRF token is refused and changes nothing.
    sign_in(&lab, &b, &base, "viewer");
    for page in ["/hosts", "/hosts/host-a", "/guests?host=host-b"] {
        open_live(&b, &base, page);
        assert_eq!(b.count("[data-action]"), 0, "a viewer's {page} has an action control");
    }
    let before = lab.host("host-c").expect("host-c")["status"].clone();
    let (status, text) = post(
        &b,
        "/hosts/host-c/status",
        "status=MAINTENANCE&reason=viewer+tries",
        json!({"X-Lifeboat-Csrf": csrf(&b)}),
    );
    assert_eq!(status, 403, "a viewer's POST: {text}");
    assert!(text.contains("operator"), "the refusal says the operator role is needed: {text}");
    assert_eq!(lab.host("host-c").expect("host-c")["status"], before, "a viewer changed host-c");

    // Without the session cookie a POST is 401.
    let r = b.exec_async_js(
        "const done = arguments[0];\n\
         fetch('/hosts/host-c/status', {method: 'POST', credentials: 'omit', body: 'status=MAINTENANCE&reason=x',\n\
           headers: {'Content-Type': 'application/x-www-form-urlencoded'}})\n\
           .then(r => done(r.status), e => done(String(e)));",
        vec![],
    );
    assert_eq!(r, json!(401), "a POST without a session");

    let left = b.close();
    assert!(left.is_empty(), "browser processes left: {left:?}");
    assert!(browser_pids_in(&netns).is_empty(), "browser processes left in {netns}");
}

/// A forced migration started from the failed host's page (design §6): the
/// page shows the host go unreachable live; the dialog's plan names the
/// fencing evidence and each guest's target, and changes nothing; Confirm
/// starts exactly that plan; the job page shows, live and without a reload,
/// the job succeed and each guest running on its target. Cross-checked
/// against the lab: each guest runs once, where the page said; the BMC reads
/// Off; the audit log names the signed-in operator.
#[test]
fn dashboard_lab_forced_migration_from_the_page() {
    let lab = lab_or_skip!(3, 2);
    if !lab.has_bmcs() {
        return;
    }
    let Some(base) = lab.paths.get("CONTROLLER_DASHBOARD_URL").cloned() else {
        skip_or_fail("the lab's controller has no dashboard (LAB_DASHBOARD=0, or a controller without [dashboard])");
        return;
    };
    let netns = lab.paths["CONTROLLER_NETNS"].clone();
    let b = browser_or_skip!(lab);
    lab.wait(Duration::from_secs(20), "6 running guests", || {
        let v = lab.vms();
        v.len() == 6 && v.iter().all(|g| g["state"] == "running")
    });
    lab.past_startup_grace();
    let before: Vec<(String, String)> = lab
        .vms()
        .into_iter()
        .filter(|g| g["host_id"] == "host-a")
        .map(|g| (g["name"].as_str().unwrap().to_string(), g["uuid"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(before.len(), 2, "host-a's guests");

    sign_in(&lab, &b, &base, "operator");
    open_live(&b, &base, "/hosts/host-a");
    let liveness = "#live table#host .liveness";
    assert_eq!(b.text(liveness).trim(), "reachable");

    // A live host: the plan refuses, naming the check, and nothing changes.
    b.click("[data-action=migrate]");
    b.wait_css("dialog[open]#migrate-dialog", Duration::from_secs(5));
    b.click("dialog[open] input[name=power][value=fence]");
    b.fill("dialog[open] input[name=reason]", "dashboard test: host-a failed");
    b.click("dialog[open] [data-action=plan-migrate]");
    b.wait_css("dialog[open] .result .plan[data-plan-id]", Duration::from_secs(10));
    assert_eq!(b.attr("dialog[open] .plan", "data-executable").as_deref(), Some("false"));
    let refused = b.text("dialog[open] .plan .check.failed");
    assert!(refused.contains("still talking"), "a host that talks is alive: {refused}");
    b.click("dialog[open] [data-close=migrate-dialog]");

    // host-a hangs: the open page shows it unreachable as soon as the controller says so.
    lab.ok(&["host-kill", "host-a"]);
    lab.wait(Duration::from_secs(15), "host-a unreachable", || {
        lab.host("host-a").is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    shown_within_a_second(
        &b,
        Instant::now(),
        "host-a reads unreachable on its open page, after the controller said so,",
        &format!("document.querySelector('{liveness}')?.textContent.trim() === 'unreachable'"),
    );
    // Past the lab's force grace (5 s of silence).
    std::thread::sleep(Duration::from_millis(5500));
    assert_eq!(String::from_utf8_lossy(&lab.ok(&["bmc-state", "host-a"]).stdout).trim(), "On", "a hung host reads On");

    // The plan: fencing evidence, a target for each guest, every check passing; nothing changed.
    b.click("[data-action=migrate]");
    b.wait_css("dialog[open]#migrate-dialog", Duration::from_secs(5));
    assert_eq!(b.count("dialog[open] .result *"), 0, "a reopened dialog starts without the old plan");
    b.click("dialog[open] input[name=power][value=fence]");
    b.fill("dialog[open] input[name=reason]", "dashboard test: host-a failed");
    b.click("dialog[open] [data-action=plan-migrate]");
    b.wait_css("dialog[open] .result .plan[data-plan-id]", Duration::from_secs(10));
    let plan_text = b.text("dialog[open] .result");
    assert_eq!(b.count("dialog[open] .plan .check.failed"), 0, "a failed check:\n{plan_text}");
    assert_eq!(b.attr("dialog[open] .plan", "data-executable").as_deref(), Some("true"), "{plan_text}");
    assert_eq!(b.text("dialog[open] .plan .power-evidence").trim(), "bmc-fence", "{plan_text}");
    let plan_id = b.attr("dialog[open] .plan", "data-plan-id").expect("plan id");
    let mut planned = Vec::new();
    for (name, uuid) in &before {
        let target =
            b.text(&format!("dialog[open] .plan-guests tr[data-uuid=\"{uuid}\"] td.target")).trim().to_string();
        assert!(target.starts_with("host-") && target != "host-a", "{name} planned to {target:?}:\n{plan_text}");
        planned.push((name.clone(), uuid.clone(), target));
    }
    assert_eq!(String::from_utf8_lossy(&lab.ok(&["bmc-state", "host-a"]).stdout).trim(), "On", "a plan fences nothing");
    assert!(lab.cli_json(&["jobs", "list"]).unwrap().as_array().unwrap().is_empty(), "a plan starts no job");
    b.screenshot("migrate-plan");

    // Confirm: exactly that plan runs; its job page shows the guests arrive, live.
    b.click("dialog[open] [data-action=confirm-migrate]");
    b.wait_js(Duration::from_secs(10), "on the job page", "location.pathname.startsWith('/jobs/')");
    b.wait_css("body[data-live-state=open]", Duration::from_secs(10));
    b.exec_js("window.__notReloaded = true; window.__seen = []; return null;", vec![]);
    // Every job state and move step the open page shows, as it shows them.
    b.exec_js(
        "setInterval(function () {\n\
           var j = document.querySelector('#job');\n\
           var s = (j ? j.dataset.jobState : '') + ':' + Array.from(document.querySelectorAll('tr.move'))\n\
             .map(function (r) { return r.dataset.moveState; }).join(',');\n\
           if (window.__seen[window.__seen.length - 1] !== s) window.__seen.push(s);\n\
         }, 20); return null;",
        vec![],
    );
    let t = Instant::now();
    b.wait_js(
        Duration::from_secs(90),
        "the job SUCCEEDED on its open page",
        "document.querySelector('#job')?.dataset.jobState === 'SUCCEEDED'",
    );
    println!("forced migration from the page: SUCCEEDED on the open job page after {:?}", t.elapsed());
    let seen = b.exec_js("return window.__seen;", vec![]);
    println!("states the open job page showed: {seen}");
    assert_eq!(b.exec_js("return window.__notReloaded === true;", vec![]), json!(true), "shown live, no reload");
    assert!(seen.as_array().is_some_and(|s| s.len() >= 2), "the page showed progress, not only the end: {seen}");
    assert_eq!(b.text("#job tr td code").trim(), plan_id, "the job carries the plan shown");
    for (name, uuid, target) in &planned {
        let row = format!("tr.move[data-uuid=\"{uuid}\"]");
        b.wait_js(
            Duration::from_secs(5),
            &format!("{name} reported running on its target"),
            &format!("document.querySelector('{row} td.arrived')?.textContent.trim() === 'running'"),
        );
        assert_eq!(b.attr(&row, "data-move-state").as_deref(), Some("RUNNING"), "{name}");
        assert_eq!(&b.text(&format!("{row} td.target")).trim().to_string(), target, "{name} went where planned");
    }
    b.screenshot("migrate-job");

    // The lab agrees with the page.
    assert_eq!(String::from_utf8_lossy(&lab.ok(&["bmc-state", "host-a"]).stdout).trim(), "Off");
    for (name, uuid, target) in &planned {
        // host-a's stale definition stays listed (it is off); the copy elsewhere is on the planned target.
        let copies: Vec<Value> =
            lab.vms().into_iter().filter(|g| g["uuid"] == uuid.as_str() && g["host_id"] != "host-a").collect();
        assert_eq!(copies.len(), 1, "{name}: {copies:?}");
        assert_eq!(copies[0]["host_id"], target.as_str(), "{name}: {copies:?}");
        assert_eq!(copies[0]["state"], "running", "{name}: {copies:?}");
        assert_eq!(lab.copies(uuid), 1, "{name} runs exactly once");
    }
    let log = lab.cli_json(&["log", "--host", "host-a"]).expect("log --host host-a");
    let requested = log
        .as_array()
        .and_then(|l| l.iter().find(|e| e["action"] == "migrate.requested"))
        .unwrap_or_else(|| panic!("no migrate.requested row: {log}"));
    assert_eq!(requested["actor"], "operator", "audited under the signed-in name: {requested}");
    let jobs = lab.cli_json(&["jobs", "list"]).expect("jobs list");
    assert_eq!(jobs[0]["state"], "SUCCEEDED", "{jobs}");
    assert_eq!(jobs[0]["plan_id"], plan_id.as_str(), "{jobs}");

    // The failed host's page says what happened to it: OFFLINE, no guest left running there.
    open_live(&b, &base, "/hosts/host-a");
    let badge = "#live table#host .status-badge";
    assert!(b.attr(badge, "class").unwrap_or_default().contains("status-OFFLINE"), "host-a OFFLINE after the fence");
    // Its stale definitions are known, but cannot be removed while it is off.
    b.click("#live [data-action=cleanup]");
    b.wait_css("dialog[open]#cleanup-dialog", Duration::from_secs(5));
    b.click("dialog[open] [data-action=plan-cleanup]");
    b.wait_js(
        Duration::from_secs(10),
        "a cleanup plan or refusal",
        "!!document.querySelector('dialog[open] .result #cleanup-plan, dialog[open] .result .refusal')",
    );
    let refused = b.text("dialog[open] .result");
    println!("cleanup while host-a is off: {refused}");
    assert!(
        b.attr("dialog[open] #cleanup-plan", "data-executable").as_deref() != Some("true"),
        "a cleanup of a host that is off cannot be carried out: {refused}"
    );
    b.click("dialog[open] [data-close=cleanup-dialog]");

    // host-a is repaired and powered on: its open page shows it back, in
    // MAINTENANCE, with the two stale definitions and a Clean up button, live.
    lab.ok(&["bmc-power", "host-a", "on"]);
    b.wait_js(
        Duration::from_secs(90),
        "host-a reachable again, with a Clean up button, on its open page",
        &format!(
            "document.querySelector('{liveness}')?.textContent.trim() === 'reachable' && \
             !!document.querySelector('#live [data-action=cleanup]')"
        ),
    );
    assert!(b.attr(badge, "class").unwrap_or_default().contains("status-MAINTENANCE"), "quarantined on return");
    assert_eq!(b.text("#live td.stale").split_whitespace().next(), Some("2"), "two stale definitions");
    for (name, uuid, _) in &planned {
        assert_eq!(lab.virsh("host-a", &["domstate", name]).trim(), "shut off", "{name} must not run on host-a");
        assert_eq!(lab.copies(uuid), 1, "{name} runs once");
    }
    // The controller knows what host-a runs once its agent's inventory is in
    // (a cleanup planned before then is refused, not judged on old news).
    lab.wait(Duration::from_secs(20), "host-a's inventory: the moved guests shut off there", || {
        lab.vms().iter().filter(|g| g["host_id"] == "host-a").all(|g| g["state"] != "running")
    });

    // Cleanup from the page: the plan names exactly the moved guests, and
    // Confirm removes their definitions from host-a, nothing else.
    b.click("#live [data-action=cleanup]");
    b.wait_css("dialog[open]#cleanup-dialog", Duration::from_secs(5));
    b.click("dialog[open] [data-action=plan-cleanup]");
    b.wait_css("dialog[open] .result #cleanup-plan[data-plan-id]", Duration::from_secs(10));
    let cleanup_text = b.text("dialog[open] .result");
    assert_eq!(b.attr("dialog[open] #cleanup-plan", "data-executable").as_deref(), Some("true"), "{cleanup_text}");
    assert_eq!(b.count("dialog[open] .cleanup-items tr[data-uuid]"), planned.len(), "{cleanup_text}");
    for (name, uuid, _) in &planned {
        let action = b.attr(&format!("dialog[open] .cleanup-items tr[data-uuid=\"{uuid}\"]"), "data-cleanup-action");
        assert_eq!(action.as_deref(), Some("remove"), "{name}: {cleanup_text}");
    }
    let defined_before = lab.defined("host-a");
    assert!(planned.iter().all(|(n, _, _)| defined_before.contains(n)), "a plan removes nothing: {defined_before:?}");
    b.screenshot("cleanup-plan");
    b.click("dialog[open] [data-action=confirm-cleanup]");
    b.wait_css("dialog[open] .result #cleanup-plan[data-done=true]", Duration::from_secs(30));
    for (name, uuid, _) in &planned {
        let action = b.attr(&format!("dialog[open] .cleanup-items tr[data-uuid=\"{uuid}\"]"), "data-cleanup-action");
        assert_eq!(action.as_deref(), Some("removed"), "{name}: {}", b.text("dialog[open] .result"));
    }
    let defined = lab.defined("host-a");
    for (name, uuid, target) in &planned {
        assert!(!defined.contains(name), "{name} undefined on host-a: {defined:?}");
        assert_eq!(lab.copies(uuid), 1, "{name} runs once");
        let copies: Vec<Value> = lab.vms().into_iter().filter(|g| g["uuid"] == uuid.as_str()).collect();
        assert_eq!(copies.len(), 1, "{name}: {copies:?}");
        assert_eq!(copies[0]["host_id"], target.as_str(), "{name} still runs where it was moved");
    }
    let log = lab.cli_json(&["log", "--host", "host-a"]).expect("log --host host-a");
    let removed: Vec<&Value> =
        log.as_array().map(|l| l.iter().filter(|e| e["action"] == "cleanup.removed").collect()).unwrap_or_default();
    assert_eq!(removed.len(), planned.len(), "{log}");
    assert!(removed.iter().all(|e| e["actor"] == "operator"), "audited under the signed-in name: {removed:?}");

    let left = b.close();
    assert!(left.is_empty(), "browser processes left: {left:?}");
    assert!(browser_pids_in(&netns).is_empty(), "browser processes left in {netns}");
}

/// The controller leading an HA lab, per etcd (`lab.sh leader`).
fn ha_leader(lab: &Lab) -> Option<u32> {
    let o = lab.run(&["leader"]);
    if !o.status.success() {
        return None;
    }
    String::from_utf8_lossy(&o.stdout).split_whitespace().next().and_then(|n| n.parse().ok())
}

/// Signs in with a fresh operator link (whichever controller the CLI found
/// leading names it); returns the origin the browser landed on.
fn ha_sign_in(lab: &Lab, b: &lifeboat_e2e::browser::Browser) -> String {
    let (code, out, err) = lab.cli_as("operator", &["dashboard", "login", "--output", "json"]);
    assert_eq!(code, 0, "dashboard login: {err}");
    let link: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("dashboard login JSON ({e}): {out}"));
    b.goto(link["url"].as_str().expect("url"));
    b.wait_js(Duration::from_secs(10), "signed in: on /hosts", "location.pathname === '/hosts'");
    b.wait_css("table#hosts", Duration::from_secs(5));
    b.exec_js("return location.origin;", vec![]).as_str().expect("origin").to_string()
}

/// With three controllers on etcd (design §1, issue 16): a browser that opens
/// a follower's dashboard is sent to the leader's, same page, and an action
/// there is carried out by the leader. When the leader dies, another
/// controller's address sends the browser to the new leader, which asks it
/// to sign in again (sessions live in the leader's memory); a new link works.
#[test]
fn dashboard_lab_ha_a_follower_sends_the_browser_to_the_leader() {
    if !std::path::Path::new("/usr/bin/etcd").exists() {
        skip_or_fail("/usr/bin/etcd is missing: run scripts/install-deps.sh (Debian's etcd-server)");
        return;
    }
    if let Some(why) = lifeboat_e2e::browser::unavailable() {
        skip_or_fail(&why);
        return;
    }
    let lab = match Lab::up_with(2, 1, &["--ha", "--controllers", "3"]) {
        Ok(l) => l,
        Err(why) => {
            skip_or_fail(&why);
            return;
        }
    };
    let url = |n: u32| lab.paths.get(&format!("CTL_{n}_DASHBOARD_URL")).cloned();
    if url(1).is_none() {
        skip_or_fail("the HA lab's controllers have no dashboard (LAB_DASHBOARD=0)");
        return;
    }
    lab.wait(Duration::from_secs(30), "a leader", || ha_leader(&lab).is_some());
    lab.wait(Duration::from_secs(30), "2 running guests", || {
        let v = lab.vms();
        v.len() == 2 && v.iter().all(|g| g["state"] == "running")
    });
    let leader = ha_leader(&lab).expect("a leader");
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    let (leader_url, follower_url) = (url(leader).expect("leader URL"), url(follower).expect("follower URL"));
    // The browser runs in the third controller's namespace, which stays up
    // when the leader is killed.
    let survivor = (1..=3).find(|n| *n != leader && *n != follower).expect("a third controller");
    let netns = lab.paths[&format!("CTL_{survivor}_NETNS")].clone();
    let b = lifeboat_e2e::browser::Browser::start_in(&netns, &lab.path("PKI_DIR").join("controller.pem"));

    let origin = ha_sign_in(&lab, &b);
    assert_eq!(origin, leader_url, "the link names the leader");
    // A follower's address: the same page, on the leader, signed in.
    b.goto(&format!("{follower_url}/hosts/host-a?since=1"));
    b.wait_css("body[data-live-state=open]", Duration::from_secs(10));
    assert_eq!(b.url(), format!("{leader_url}/hosts/host-a?since=1"), "sent to the leader, same page and query");
    // An action from there is the leader's.
    b.click("[data-action=set-status]");
    b.wait_css("dialog[open]", Duration::from_secs(5));
    b.click("dialog[open] .status-help[data-status=NOT_ACCEPTING] input[type=radio]");
    b.fill("dialog[open] input[name=reason]", "dashboard HA test");
    b.click("dialog[open] [data-action=confirm-status]");
    b.wait_js(
        Duration::from_secs(5),
        "host-a NOT_ACCEPTING on its open page",
        "document.querySelector('#live table#host .status-badge')?.classList.contains('status-NOT_ACCEPTING')",
    );
    assert_eq!(lab.host("host-a").expect("host-a")["status"], "NOT_ACCEPTING");

    // The leader dies: a survivor's address leads to the new leader, which
    // does not know the old session.
    lab.ok(&["ctl-kill", &leader.to_string()]);
    lab.wait(Duration::from_secs(30), "a new leader", || ha_leader(&lab).is_some_and(|n| n != leader));
    let new = ha_leader(&lab).expect("new leader");
    let new_url = url(new).expect("new leader URL");
    let other = if new == follower { survivor } else { follower };
    let t = Instant::now();
    let entry = url(other).expect("URL");
    b.wait_js(
        Duration::from_secs(30),
        "the new leader's signed-out page through a follower",
        &format!(
            "(function () {{ if (location.pathname !== '/signed-out') {{ location.href = '{entry}/hosts'; return false; }} \
             return location.origin === '{new_url}'; }})()"
        ),
    );
    println!(
        "after the leader's SIGKILL, {entry} sent the browser to the new leader's sign-in page in {:?}",
        t.elapsed()
    );
    let origin = ha_sign_in(&lab, &b);
    assert_eq!(origin, new_url, "a new link names the new leader");
    assert_eq!(b.count("table#hosts tr[data-host]"), 2);
    let left = b.close();
    assert!(left.is_empty(), "browser processes left: {left:?}");
}
