//! Property test of the native Redfish fencer against a scripted HTTPS BMC on
//! 127.0.0.1:0 (rustls, a throwaway CA): every answer to every request the
//! fencer makes (GET of the system, POST of the Reset action, the polls) is
//! generated: status codes, framing (Content-Length short/long/absent,
//! chunked, broken chunks), headers, and bodies from real sushy-tools answers
//! in `fuzz/corpus/redfish/`, mutated, arbitrary JSON or bytes.
//!
//! Properties: nothing panics or hangs; the fencer reports Off only when the
//! last system read was clearly Off (2xx, JSON, one `PowerState` that is
//! "Off") — invariant 1; it never sends a Reset for a read, never "On" while
//! fencing; its requests (and credentials) go to the configured origin only;
//! the audit log and reasons stay short and free of control characters.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifeboat_common::pki::{self, Leaf};
use lifeboat_controller::fence::{BmcConfig, FenceEvent, Fencer, PowerState};
use proptest::prelude::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::PrivateKeyDer, pki_types::pem::PemObject};

const SYSTEM_ID: &str = "27946b59-9e44-4fa7-8e91-f3527a1ef094";
/// Longest audit-log answer or reason accepted.
const MAX_TEXT: usize = 2000;

/// Bytes shown as text in failure reports.
#[derive(Clone)]
struct Bytes(Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() > 400 {
            write!(f, "{:?}... ({} bytes)", String::from_utf8_lossy(&self.0[..400]), self.0.len())
        } else {
            write!(f, "{:?}", String::from_utf8_lossy(&self.0))
        }
    }
}

/// How the body is delimited.
#[derive(Debug, Clone)]
enum Framing {
    Exact,
    /// Content-Length this much smaller than the body.
    Short(usize),
    /// Content-Length this much larger (the connection then closes).
    Long(usize),
    /// No length: the body ends when the connection closes.
    Close,
    Chunked,
    /// A chunk size that does not match.
    ChunkedBroken,
}

/// One answer of the scripted BMC.
#[derive(Debug, Clone)]
enum Answer {
    Http {
        status: u16,
        framing: Framing,
        headers: Vec<(String, String)>,
        junk_header: Option<Bytes>,
        body: Bytes,
    },
    /// Raw bytes instead of an HTTP response.
    Raw(Bytes),
    /// Close the connection without answering.
    Hangup,
}

impl Answer {
    fn clean(state: &str) -> Answer {
        Answer::Http {
            status: 200,
            framing: Framing::Exact,
            headers: vec![],
            junk_header: None,
            body: Bytes(format!("{{\"PowerState\": \"{state}\"}}").into_bytes()),
        }
    }

    /// The bytes sent, with `{PORT}` / `{FOREIGN}` filled in.
    fn render(&self, port: u16, foreign: u16) -> Vec<u8> {
        let fill = |b: &[u8]| -> Vec<u8> {
            String::from_utf8_lossy(b)
                .replace("{PORT}", &port.to_string())
                .replace("{FOREIGN}", &foreign.to_string())
                .into_bytes()
        };
        match self {
            Answer::Hangup => vec![],
            Answer::Raw(b) => fill(&b.0),
            Answer::Http { status, framing, headers, junk_header, body } => {
                let body = fill(&body.0);
                let mut out = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n").into_bytes();
                for (k, v) in headers {
                    out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                }
                if let Some(j) = junk_header {
                    out.extend_from_slice(&j.0);
                    out.extend_from_slice(b"\r\n");
                }
                let len = body.len();
                match framing {
                    Framing::Exact => out.extend_from_slice(format!("Content-Length: {len}\r\n").as_bytes()),
                    Framing::Short(k) => {
                        out.extend_from_slice(format!("Content-Length: {}\r\n", len.saturating_sub(*k)).as_bytes())
                    }
                    Framing::Long(k) => out.extend_from_slice(format!("Content-Length: {}\r\n", len + k).as_bytes()),
                    Framing::Close => {}
                    Framing::Chunked | Framing::ChunkedBroken => {
                        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n")
                    }
                }
                out.extend_from_slice(b"\r\n");
                match framing {
                    Framing::Chunked => {
                        for c in body.chunks(700) {
                            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                            out.extend_from_slice(c);
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    Framing::ChunkedBroken => {
                        out.extend_from_slice(format!("{:x}\r\n", len + 3).as_bytes());
                        out.extend_from_slice(&body);
                        out.extend_from_slice(b"\r\nzz\r\n");
                    }
                    _ => out.extend_from_slice(&body),
                }
                out
            }
        }
    }

    /// Over-approximation of "an honest client may read Off from this":
    /// a 2xx whose body (whole, or the prefix a short Content-Length shows)
    /// is a JSON object with exactly one PowerState, a string that is "Off".
    fn may_read_off(&self, port: u16, foreign: u16) -> bool {
        match self {
            Answer::Hangup => false,
            Answer::Raw(_) => {
                let b = self.render(port, foreign);
                b.windows(3).any(|w| w == b"Off")
            }
            Answer::Http { status, framing, body, .. } => {
                if !(200..300).contains(status) {
                    return false;
                }
                let b = Answer::Raw(body.clone()).render(port, foreign);
                let prefix = match framing {
                    Framing::Short(k) => &b[..b.len().saturating_sub(*k)],
                    _ => &b[..],
                };
                clearly_off(&b) || clearly_off(prefix)
            }
        }
    }
}

fn clearly_off(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct System {
        #[serde(rename = "PowerState")]
        power_state: String,
    }
    // serde's derived struct refuses a duplicated field
    serde_json::from_slice::<System>(body).is_ok_and(|s| s.power_state.trim() == "Off")
}

/// What the BMC saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    host: String,
    body: String,
    may_read_off: bool,
}

#[derive(Default)]
struct Script {
    answers: VecDeque<Answer>,
    after: Option<Answer>,
    seen: Vec<Seen>,
}

/// The scripted BMC and a "foreign" HTTPS listener that must never be contacted.
struct Bmc {
    dir: tempfile::TempDir,
    port: u16,
    foreign: u16,
    script: Arc<Mutex<Script>>,
    foreign_hits: Arc<AtomicUsize>,
}

fn tls_acceptor(dir: &std::path::Path) -> TlsAcceptor {
    lifeboat_common::tls::install_crypto_provider();
    let (cert, key) = pki::issue(dir, dir, &Leaf::Controller(vec!["127.0.0.1".into()])).unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&cert).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let cfg = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
    TlsAcceptor::from(Arc::new(cfg))
}

async fn serve_one(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    script: Arc<Mutex<Script>>,
    port: u16,
    foreign: u16,
) {
    let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await else { return };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 && buf.len() < 65536 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, path) = (first.next().unwrap_or("").to_string(), first.next().unwrap_or("").to_string());
    let mut host = String::new();
    let mut len = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "host" => host = v.trim().to_string(),
                "content-length" => len = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    while buf.len() < head_end + len {
        match tls.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    let answer = {
        let mut s = script.lock().unwrap();
        let a = s.answers.pop_front().or_else(|| s.after.clone()).unwrap_or(Answer::Hangup);
        let may_read_off = a.may_read_off(port, foreign);
        s.seen.push(Seen { method, path, host, body, may_read_off });
        a
    };
    let _ = tls.write_all(&answer.render(port, foreign)).await;
    let _ = tls.shutdown().await;
}

impl Bmc {
    async fn start() -> Bmc {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pki::init(d).unwrap();
        let acceptor = tls_acceptor(d);
        let cred = d.join("bmc.cred");
        std::fs::write(&cred, "username = \"lifeboat\"\npassword = \"Fuzz-Pw-7\"\n").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let foreign_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let foreign = foreign_listener.local_addr().unwrap().port();
        let script = Arc::new(Mutex::new(Script::default()));
        let foreign_hits = Arc::new(AtomicUsize::new(0));
        let s = script.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve_one(acceptor.clone(), tcp, s.clone(), port, foreign));
            }
        });
        let hits = foreign_hits.clone();
        tokio::spawn(async move {
            while let Ok((_tcp, _)) = foreign_listener.accept().await {
                hits.fetch_add(1, Ordering::SeqCst);
            }
        });
        Bmc { dir, port, foreign, script, foreign_hits }
    }

    fn config(&self) -> BmcConfig {
        BmcConfig::Redfish {
            url: format!("https://127.0.0.1:{}", self.port),
            system_id: SYSTEM_ID.into(),
            credentials_file: self.dir.path().join("bmc.cred"),
            ca: Some(self.dir.path().join("ca.pem")),
            power_off_timeout_s: 1,
            poll_interval_ms: 10,
        }
    }
}

/// What the BMC answers once the scripted answers are used up.
#[derive(Debug, Clone, Copy)]
enum After {
    Settle,
    Opposite,
    Hangup,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    State,
    Off,
    On,
}

/// Real answers: (request-status-description file name, body).
fn seeds() -> Vec<(String, Vec<u8>)> {
    harness::corpus("redfish")
}

fn status_of(name: &str) -> u16 {
    name.split('-').find_map(|p| p.parse().ok()).expect("corpus file name holds a status")
}

fn power_word() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Off".to_string()),
        Just("On".to_string()),
        Just("off".to_string()),
        Just("OFF".to_string()),
        Just(" Off ".to_string()),
        Just("Off\u{0}".to_string()),
        Just("\u{1b}[2JOff".to_string()),
        Just("PoweringOff".to_string()),
        Just("PoweringOn".to_string()),
        Just("Paused".to_string()),
        Just("Unknown".to_string()),
        Just(String::new()),
        ".{0,12}",
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("PowerState".to_string()),
        Just("Actions".to_string()),
        Just("#ComputerSystem.Reset".to_string()),
        Just("target".to_string()),
        Just("error".to_string()),
        Just("message".to_string()),
        Just("@Message.ExtendedInfo".to_string()),
        Just("Message".to_string()),
        "[a-zA-Z@#.]{0,10}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        power_word().prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Reset targets an answer may advertise.
fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(format!("/redfish/v1/Systems/{SYSTEM_ID}/Actions/ComputerSystem.Reset")),
        Just("https://127.0.0.1:{FOREIGN}/redfish/v1/Systems/1/Actions/ComputerSystem.Reset".to_string()),
        Just("//127.0.0.1:{FOREIGN}/steal".to_string()),
        Just("http://127.0.0.1:{PORT}/plain-http".to_string()),
        Just("https://localhost:{PORT}/other-host-name".to_string()),
        Just("https://lifeboat@127.0.0.1:{FOREIGN}/".to_string()),
        Just("../../../../x".to_string()),
        Just("https://127.0.0.1:{PORT}@127.0.0.1:{FOREIGN}/x".to_string()),
        Just("file:///etc/passwd".to_string()),
        (1usize..3).prop_map(|n| format!("/{}", "a".repeat(n * 40_000))),
        any::<String>(),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Truncate(usize),
    PowerState(String),
    PowerStateValue(Value),
    /// A second PowerState before the real one.
    Duplicate(String),
    Target(String),
    /// Padding (spaces) of this many bytes before the closing brace.
    Pad(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(p, x)| Edit::Flip(p, x)),
        any::<usize>().prop_map(Edit::Truncate),
        power_word().prop_map(Edit::PowerState),
        json().prop_map(Edit::PowerStateValue),
        power_word().prop_map(Edit::Duplicate),
        target().prop_map(Edit::Target),
        prop_oneof![1usize..100, Just(200_000usize), Just(1_200_000usize)].prop_map(Edit::Pad),
    ]
}

fn apply(body: &mut Vec<u8>, e: &Edit) {
    let text = || String::from_utf8_lossy(body).into_owned();
    match e {
        Edit::Flip(p, x) => {
            if !body.is_empty() {
                let i = p % body.len();
                body[i] ^= x;
            }
        }
        Edit::Truncate(p) => body.truncate(p % (body.len() + 1)),
        Edit::PowerState(w) => {
            let v = serde_json::to_string(w).unwrap();
            *body = replace_value(&text(), &v).into_bytes();
        }
        Edit::PowerStateValue(v) => *body = replace_value(&text(), &v.to_string()).into_bytes(),
        Edit::Duplicate(w) => {
            let t = text();
            if let Some(i) = t.find('{') {
                let v = serde_json::to_string(w).unwrap();
                *body = format!("{}\"PowerState\": {v},{}", &t[..=i], &t[i + 1..]).into_bytes();
            }
        }
        Edit::Target(tg) => {
            let t = text();
            let v = serde_json::to_string(tg).unwrap();
            if let Some(i) = t.find("\"target\"") {
                let rest = &t[i + 8..];
                if let (Some(a), Some(b)) = (rest.find('"'), rest[rest.find('"').unwrap_or(0) + 1..].find('"')) {
                    let start = i + 8 + a;
                    let end = start + 1 + b + 1;
                    *body = format!("{}{v}{}", &t[..start], &t[end..]).into_bytes();
                }
            }
        }
        Edit::Pad(n) => {
            if let Some(i) = body.iter().rposition(|&c| c == b'}') {
                body.splice(i..i, std::iter::repeat_n(b' ', *n));
            }
        }
    }
}

/// Replaces the value after `"PowerState":` (a JSON string) with `v`.
fn replace_value(t: &str, v: &str) -> String {
    let Some(i) = t.find("\"PowerState\"") else { return t.to_string() };
    let after = i + "\"PowerState\"".len();
    let rest = &t[after..];
    let Some(q1) = rest.find('"') else { return t.to_string() };
    let Some(q2) = rest[q1 + 1..].find('"') else { return t.to_string() };
    format!("{}: {v}{}", &t[..after], &rest[q1 + 1 + q2 + 1..])
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        6 => Just(Framing::Exact),
        1 => (1usize..50).prop_map(Framing::Short),
        1 => (1usize..50).prop_map(Framing::Long),
        1 => Just(Framing::Close),
        1 => Just(Framing::Chunked),
        1 => Just(Framing::ChunkedBroken),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let h = prop_oneof![
        Just(("Content-Type".to_string(), "application/json".to_string())),
        Just(("Content-Type".to_string(), "text/html".to_string())),
        "[ -~]{0,200}".prop_map(|v| ("Location".to_string(), v.trim().to_string())),
        (1usize..3).prop_map(|n| ("Location".to_string(), "/x".repeat(n * 20_000))),
        Just(("Location".to_string(), "https://127.0.0.1:{FOREIGN}/redfish/v1/Systems/1".to_string())),
        "[A-Za-z-]{1,20}".prop_map(|k| (format!("X-{k}"), "1".to_string())),
    ];
    proptest::collection::vec(h, 0..3)
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => Just(200u16),
        1 => prop_oneof![Just(201u16), Just(202), Just(204), Just(206)],
        2 => prop_oneof![Just(301u16), Just(302), Just(307), Just(400), Just(401), Just(403), Just(404), Just(409), Just(500), Just(503)],
        1 => 100u16..1000,
    ]
}

fn answer(seeds: Arc<Vec<(String, Vec<u8>)>>) -> impl Strategy<Value = Answer> {
    let n = seeds.len();
    let body = prop_oneof![
        4 => (0..n, proptest::collection::vec(edit(), 0..3)).prop_map(move |(i, es)| {
            let mut b = seeds[i].1.clone();
            for e in &es {
                apply(&mut b, e);
            }
            Bytes(b)
        }),
        2 => json().prop_map(|v| Bytes(v.to_string().into_bytes())),
        1 => proptest::collection::vec(any::<u8>(), 0..600).prop_map(Bytes),
    ];
    let junk = proptest::option::weighted(0.1, proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes));
    prop_oneof![
        12 => (status(), framing(), headers(), junk, body).prop_map(|(status, framing, headers, junk_header, body)| {
            Answer::Http { status, framing, headers, junk_header, body }
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| Answer::Raw(Bytes(b))),
        1 => Just(Answer::Raw(Bytes(b"HTTP/1.0 200 OK\n\n{\"PowerState\":\"Off\"}".to_vec()))),
        1 => Just(Answer::Hangup),
    ]
}

fn check_text(what: &str, s: &str) -> Result<(), TestCaseError> {
    prop_assert!(s.chars().count() <= MAX_TEXT, "{what} of {} chars: {}...", s.len(), &s[..s.floor_char_boundary(300)]);
    prop_assert!(!s.chars().any(char::is_control), "control character in {what}: {s:?}");
    Ok(())
}

#[test]
fn fuzz_redfish_answers() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let bmc = rt.block_on(Bmc::start());
    let seeds = Arc::new(seeds());
    for (name, body) in seeds.iter() {
        // the real answers parse as what their names say
        if name.contains("system-200-sushy-off") {
            assert!(clearly_off(body), "{name}");
        }
        status_of(name);
    }
    // once the script is used up: mostly the state the operation waits for (so a case ends
    // quickly), sometimes the other one or hang-ups (the operation polls until its timeout)
    let after = prop_oneof![12 => Just(After::Settle), 1 => Just(After::Opposite), 1 => Just(After::Hangup)];
    let op = prop_oneof![Just(Op::State), Just(Op::Off), Just(Op::On)];
    let strategy = (op, proptest::collection::vec(answer(seeds.clone()), 0..5), after);
    harness::run("redfish_answers", 24, strategy, |(op, answers, after)| {
        {
            let mut s = bmc.script.lock().unwrap();
            let (settled, other) = if matches!(op, Op::On) { ("On", "Off") } else { ("Off", "On") };
            let after = match after {
                After::Settle => Answer::clean(settled),
                After::Opposite => Answer::clean(other),
                After::Hangup => Answer::Hangup,
            };
            *s = Script { answers: answers.iter().cloned().collect(), after: Some(after), seen: vec![] };
        }
        let fencer = Fencer::new("host-f", &bmc.config()).expect("fencer");
        let mut log: Vec<FenceEvent> = Vec::new();
        let started = Instant::now();
        let state = rt.block_on(async {
            match op {
                Op::State => fencer.power_state(&mut log).await,
                Op::Off => fencer.power_off(&mut log).await,
                Op::On => fencer.power_on(&mut log).await,
            }
        });
        let took = started.elapsed();
        let seen = bmc.script.lock().unwrap().seen.clone();
        prop_assert!(took < Duration::from_secs(8), "{op:?} took {took:?}");
        // invariant 1: Off only from a clear Off, read last
        if state == PowerState::Off {
            let last_get = seen.iter().rev().find(|s| s.method == "GET");
            prop_assert!(
                last_get.is_some_and(|g| g.may_read_off),
                "read Off but the last GET was not clearly Off: {seen:#?}"
            );
        }
        // a read is a read; fencing never asks for On
        let resets: Vec<&Seen> = seen.iter().filter(|s| s.method == "POST").collect();
        match op {
            Op::State => prop_assert!(seen.len() == 1 && resets.is_empty(), "power_state sent {seen:#?}"),
            Op::Off => prop_assert!(resets.iter().all(|r| r.body.contains("\"ForceOff\"")), "{resets:#?}"),
            Op::On => prop_assert!(resets.iter().all(|r| r.body.contains("\"On\"")), "{resets:#?}"),
        }
        for s in &seen {
            prop_assert!(s.method == "GET" || s.method == "POST", "{s:?}");
            prop_assert_eq!(&s.host, &format!("127.0.0.1:{}", bmc.port));
            if s.method == "GET" {
                prop_assert_eq!(&s.path, &format!("/redfish/v1/Systems/{SYSTEM_ID}"));
            }
        }
        prop_assert_eq!(bmc.foreign_hits.load(Ordering::SeqCst), 0, "a request went to 127.0.0.1:{}", bmc.foreign);
        // the audit log and the reason stay readable
        for e in &log {
            check_text("audit request", &e.request)?;
            check_text("audit answer", &e.answer)?;
        }
        if let PowerState::Unknown(why) = &state {
            check_text("reason", why)?;
        }
        Ok(())
    });
}

#[test]
fn scripted_bmc_reads_a_clean_off_as_off() {
    // the harness itself can see Off: without this the properties above could pass vacuously
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let bmc = rt.block_on(Bmc::start());
    let fencer = Fencer::new("host-f", &bmc.config()).unwrap();
    let seeds = seeds();
    let real_off = seeds.iter().find(|(n, _)| n.contains("system-200-sushy-off")).unwrap().1.clone();
    let real_on = seeds.iter().find(|(n, _)| n.contains("system-200-sushy-on")).unwrap().1.clone();
    let http = |body: &[u8], status: u16| Answer::Http {
        status,
        framing: Framing::Exact,
        headers: vec![],
        junk_header: None,
        body: Bytes(body.to_vec()),
    };
    for (answers, want) in [
        (vec![http(&real_off, 200)], PowerState::Off),
        (vec![http(&real_on, 200)], PowerState::On),
        (vec![http(&real_on, 200), http(b"", 204), http(&real_off, 200)], PowerState::Off),
    ] {
        let fencing = answers.len() > 1;
        *bmc.script.lock().unwrap() = Script { answers: answers.into(), after: Some(Answer::Hangup), seen: vec![] };
        let mut log = Vec::new();
        let got = rt.block_on(async {
            if fencing { fencer.power_off(&mut log).await } else { fencer.power_state(&mut log).await }
        });
        assert_eq!(got, want, "{log:#?}");
    }
    let seen = bmc.script.lock().unwrap().seen.clone();
    assert_eq!(seen[1].method, "POST");
    assert_eq!(seen[1].path, format!("/redfish/v1/Systems/{SYSTEM_ID}/Actions/ComputerSystem.Reset"));
}
