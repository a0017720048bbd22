//! Native Redfish driver: `GET /redfish/v1/Systems/{id}` for the power state,
//! `POST .../Actions/ComputerSystem.Reset` for ForceOff / On. HTTPS only
//! (rustls, TLS 1.2 and 1.3), HTTP basic authentication with credentials read
//! from a file at every operation (so a rotated password needs no restart).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Certificate, Client, StatusCode, Url};
use serde_json::Value;
use tokio::time::Instant;

use super::FenceEvent;
use super::PowerState;
use super::common::{Credentials, describe, human, permission_warning, read_credentials, record, shorten};

/// Connect timeout of every request to a BMC.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Total timeout of every request to a BMC.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer body read from a BMC (a ComputerSystem document is a few KiB;
/// sushy-tools sends 2.8 KiB). A larger answer is not read further: Unknown.
pub(crate) const MAX_BODY: usize = 1024 * 1024;
/// Longest advertised Reset target accepted (it is logged with every POST).
const MAX_TARGET: usize = 1024;
/// Longest PowerState value considered (longer is neither On nor Off).
const MAX_STATE: usize = 64;

pub(crate) struct Redfish {
    /// Base URL without trailing `/`, e.g. `https://10.77.0.3:8001`.
    base: String,
    system_id: String,
    system_url: Url,
    credentials_file: PathBuf,
    ca: Option<PathBuf>,
    client: Client,
    timeout: Duration,
    poll: Duration,
}

/// The answer to a read: the state, and the Reset target the system advertises.
struct Reading {
    state: PowerState,
    reset_target: Option<Url>,
}

/// The answer to a Reset POST.
enum ResetAnswer {
    /// 2xx: the BMC took the request.
    Accepted,
    /// 400 / 409: may mean "already in that state", or a refusal: only a read decides.
    Refused(String),
    /// 401 / 403: the credentials were rejected.
    Denied(String),
    /// Transport error or another status: the BMC may or may not have acted.
    Failed(String),
}

/// Checks a configured BMC URL: https, a host, no credentials, no query.
pub(crate) fn parse_base_url(url: &str) -> Result<Url, String> {
    let u = Url::parse(url.trim()).map_err(|e| format!("url '{url}' is not a valid URL: {e}"))?;
    match u.scheme() {
        "https" => {}
        "http" => {
            return Err(format!(
                "url '{url}' uses http: refused, because the BMC password would cross the network in clear \
                 and a forged \"Off\" answer could make a running host's guests start twice; use https \
                 (with `ca` for a self-signed BMC certificate)"
            ));
        }
        s => return Err(format!("url '{url}': scheme '{s}' is not supported (use https://HOST[:PORT])")),
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("url '{url}' has no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!(
            "url '{}' contains credentials: put them in credentials_file instead",
            redact_userinfo(&u)
        ));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!("url '{url}' must not have a query or fragment"));
    }
    Ok(u)
}

fn redact_userinfo(u: &Url) -> String {
    let mut c = u.clone();
    let _ = c.set_username("");
    let _ = c.set_password(None);
    c.to_string()
}

/// Checks a system id: one non-empty path segment.
pub(crate) fn check_system_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("system_id is empty (it is the id under /redfish/v1/Systems/)".into());
    }
    if id.chars().any(|c| c == '/' || c == '?' || c == '#' || c == '%' || c.is_whitespace() || c.is_control()) {
        return Err(format!("system_id '{id}' must be a single path segment (no '/', '?', '#', '%', spaces)"));
    }
    Ok(())
}

/// Reads a CA bundle: every PEM block must be an X.509 certificate, at least one.
pub(crate) fn load_ca(path: &Path) -> Result<Vec<Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read CA bundle {}: {e}", path.display()))?;
    let mut n = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(&pem) {
        let block = block.map_err(|e| format!("CA bundle {} is not valid PEM: {e}", path.display()))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        block
            .parse_x509()
            .map_err(|e| format!("CA bundle {}: certificate {} is not valid X.509: {e}", path.display(), n + 1))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!("CA bundle {} holds no PEM CERTIFICATE block", path.display()));
    }
    Certificate::from_pem_bundle(&pem).map_err(|e| format!("CA bundle {}: {e}", path.display()))
}

/// The PowerState of a ComputerSystem document: On, Off, or why it is neither.
/// PoweringOn, PoweringOff and Paused count as On: not (yet) off.
pub(crate) fn parse_power_state(body: &[u8]) -> Result<(PowerState, String), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the answer is not JSON ({}): {}",
            printable(&e.to_string()),
            printable(&shorten(&String::from_utf8_lossy(body), 120))
        )
    })?;
    if !v.is_object() {
        return Err(format!("the answer is not a JSON object: {}", printable(&shorten(&v.to_string(), 40))));
    }
    // serde_json keeps the last of duplicated keys: {"PowerState":"On","PowerState":"Off"}
    // would read Off. An answer that says two things is not a clear Off.
    #[derive(serde::Deserialize)]
    struct OnePowerState {
        #[serde(rename = "PowerState")]
        _power_state: Option<serde::de::IgnoredAny>,
    }
    if let Err(e) = serde_json::from_slice::<OnePowerState>(body) {
        return Err(format!("the answer is ambiguous ({})", printable(&shorten(&e.to_string(), 80))));
    }
    match v.get("PowerState") {
        None | Some(Value::Null) => Err("the answer has no PowerState".into()),
        Some(Value::String(s)) if s.len() <= MAX_STATE => match s.trim() {
            "On" => Ok((PowerState::On, "On".into())),
            "Off" => Ok((PowerState::Off, "Off".into())),
            w @ ("PoweringOn" | "PoweringOff" | "Paused") => Ok((PowerState::On, w.into())),
            other => Err(format!("PowerState '{}' is neither On nor Off", printable(&shorten(other, 40)))),
        },
        Some(Value::String(s)) => Err(format!("PowerState '{}' is neither On nor Off", printable(&shorten(s, 40)))),
        Some(other) => Err(format!("PowerState is not a string: {}", printable(&shorten(&other.to_string(), 40)))),
    }
}

/// Text from a BMC made safe for one log line: whitespace runs become one
/// space, other control characters are escaped (`\u{1b}`).
pub(crate) fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads an answer's body, at most [`MAX_BODY`] bytes.
async fn read_body(resp: &mut reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| printable(&error_chain(&e).join(": ")))? {
        if out.len().saturating_add(chunk.len()) > MAX_BODY {
            return Err(format!("the answer is larger than {} KiB: not read further", MAX_BODY / 1024));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The Reset action target a ComputerSystem advertises (`Actions."#ComputerSystem.Reset".target`).
fn reset_target(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.pointer("/Actions/#ComputerSystem.Reset/target").and_then(Value::as_str).map(str::to_string)
}

/// The human message of a Redfish error body (`error.message`, extended info
/// messages), else the start of the body.
pub(crate) fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let mut parts: Vec<String> = Vec::new();
        if let Some(m) = v.pointer("/error/message").and_then(Value::as_str) {
            parts.push(m.trim().to_string());
        }
        if let Some(infos) = v.pointer("/error/@Message.ExtendedInfo").and_then(Value::as_array) {
            for i in infos {
                if let Some(m) = i.get("Message").and_then(Value::as_str) {
                    let m = m.trim().to_string();
                    if !parts.contains(&m) {
                        parts.push(m);
                    }
                }
            }
        }
        if !parts.is_empty() {
            return printable(&shorten(&parts.join("; "), 300));
        }
    }
    let text = printable(&String::from_utf8_lossy(body));
    if text.is_empty() { "(empty body)".into() } else { shorten(&text, 200) }
}

/// Every message of an error's source chain, without repeats.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let m = err.to_string();
        if !out.iter().any(|o| o.contains(&m)) {
            out.push(m);
        }
        cur = err.source();
    }
    out
}

impl Redfish {
    pub(crate) fn new(
        url: &str,
        system_id: &str,
        credentials_file: &Path,
        ca: Option<&Path>,
        timeout: Duration,
        poll: Duration,
    ) -> Result<Self, String> {
        let base_url = parse_base_url(url)?;
        check_system_id(system_id)?;
        let base = base_url.as_str().trim_end_matches('/').to_string();
        let system_url = Url::parse(&format!("{base}/redfish/v1/Systems/{system_id}"))
            .map_err(|e| format!("url '{url}' with system_id '{system_id}' is not a valid URL: {e}"))?;
        read_credentials(credentials_file)?;
        if let Some(w) = permission_warning(credentials_file) {
            tracing::warn!("{w}");
        }
        lifeboat_common::tls::install_crypto_provider();
        let mut b = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .https_only(true)
            .tls_backend_rustls()
            .user_agent(concat!("lifeboat-controller/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = ca {
            b = b.tls_certs_only(load_ca(ca)?);
        }
        let client = b.build().map_err(|e| format!("cannot build the HTTPS client: {}", error_chain(&e).join(": ")))?;
        Ok(Redfish {
            base,
            system_id: system_id.to_string(),
            system_url,
            credentials_file: credentials_file.to_path_buf(),
            ca: ca.map(Path::to_path_buf),
            client,
            timeout,
            poll,
        })
    }

    fn creds(&self) -> Result<Credentials, String> {
        read_credentials(&self.credentials_file)
    }

    /// Why a request failed to get an answer, for an operator.
    fn transport_reason(&self, e: &reqwest::Error) -> String {
        let chain = error_chain(e);
        let lower = chain.join(": ").to_ascii_lowercase();
        // the innermost message says what happened ("Connection refused (os error 111)",
        // "invalid peer certificate: UnknownIssuer"); the outer ones repeat the URL
        let detail = chain.last().cloned().unwrap_or_default();
        let tls = ["certificate", "handshake", "tls", "alert", "ssl"].iter().any(|k| lower.contains(k));
        if tls {
            let hint = match &self.ca {
                Some(ca) => format!("is the BMC's certificate issued by the CA in {} for this address?", ca.display()),
                None => "no `ca` is configured, so the system's root certificates were used; set `ca` to the BMC's CA"
                    .into(),
            };
            format!("TLS with BMC {} failed: {detail} ({hint})", self.base)
        } else if e.is_timeout() {
            format!(
                "BMC {} did not answer in time (connect {} / request {}): {detail}",
                self.base,
                human(CONNECT_TIMEOUT),
                human(REQUEST_TIMEOUT)
            )
        } else if e.is_connect() {
            format!("BMC {} unreachable: {detail}", self.base)
        } else {
            format!("request to BMC {} failed: {detail}", self.base)
        }
    }

    fn denied_reason(&self, status: StatusCode, body: &[u8]) -> String {
        format!(
            "BMC {} rejected the credentials from {} (HTTP {}: {})",
            self.base,
            self.credentials_file.display(),
            status.as_u16(),
            error_message(body)
        )
    }

    /// One GET of the system.
    async fn read(&self, log: &mut Vec<FenceEvent>) -> Reading {
        let req = format!("GET {}", self.system_url);
        let unknown = |reason: String| Reading { state: PowerState::Unknown(reason), reset_target: None };
        let creds = match self.creds() {
            Ok(c) => c,
            Err(e) => {
                record(log, req, format!("not sent: {e}"));
                return unknown(e);
            }
        };
        let resp = self
            .client
            .get(self.system_url.clone())
            .basic_auth(&creds.username, Some(&creds.password))
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await;
        let mut resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let reason = self.transport_reason(&e);
                record(log, req, format!("error: {reason}"));
                return unknown(reason);
            }
        };
        let status = resp.status();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|l| printable(&shorten(l, 200)));
        let body = match read_body(&mut resp).await {
            Ok(b) => b,
            Err(e) => {
                let reason = format!("reading the answer of BMC {} failed: {e}", self.base);
                record(log, req, format!("HTTP {}: {reason}", status.as_u16()));
                return unknown(reason);
            }
        };
        if status.is_success() {
            match parse_power_state(&body) {
                Ok((state, raw)) => {
                    record(log, req, format!("HTTP {} PowerState={raw}", status.as_u16()));
                    let reset_target = reset_target(&body).and_then(|t| self.safe_target(&t));
                    Reading { state, reset_target }
                }
                Err(why) => {
                    record(log, req, format!("HTTP {}: {why}", status.as_u16()));
                    unknown(format!("BMC {} answered GET {} but {why}", self.base, self.system_url.path()))
                }
            }
        } else {
            let reason = match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => self.denied_reason(status, &body),
                StatusCode::NOT_FOUND => format!(
                    "BMC {} has no system '{}' (HTTP 404: {}): check system_id",
                    self.base,
                    self.system_id,
                    error_message(&body)
                ),
                s if s.is_redirection() => format!(
                    "BMC {} answered HTTP {} (redirect to {}): configure the final URL",
                    self.base,
                    s.as_u16(),
                    location.as_deref().unwrap_or("?")
                ),
                s => format!(
                    "BMC {} answered HTTP {} to GET {}: {}",
                    self.base,
                    s.as_u16(),
                    self.system_url.path(),
                    error_message(&body)
                ),
            };
            record(log, req, format!("HTTP {}: {}", status.as_u16(), error_message(&body)));
            unknown(reason)
        }
    }

    /// Accepts an advertised Reset target only on the same origin as the
    /// configured URL (the credentials go nowhere else).
    fn safe_target(&self, target: &str) -> Option<Url> {
        if target.len() > MAX_TARGET {
            return None;
        }
        let u = self.system_url.join(target).ok()?;
        (u.origin() == self.system_url.origin()).then_some(u)
    }

    fn default_reset_url(&self) -> Url {
        Url::parse(&format!("{}/Actions/ComputerSystem.Reset", self.system_url))
            .expect("system URL + a fixed path is a URL")
    }

    /// One POST of a ResetType.
    async fn reset(&self, reset_type: &str, target: Option<Url>, log: &mut Vec<FenceEvent>) -> ResetAnswer {
        let url = target.unwrap_or_else(|| self.default_reset_url());
        let body = serde_json::json!({ "ResetType": reset_type }).to_string();
        let req = format!("POST {url} {body}");
        let creds = match self.creds() {
            Ok(c) => c,
            Err(e) => {
                record(log, req, format!("not sent: {e}"));
                return ResetAnswer::Failed(e);
            }
        };
        let resp = self
            .client
            .post(url)
            .basic_auth(&creds.username, Some(&creds.password))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let reason = self.transport_reason(&e);
                record(log, req, format!("error: {reason}"));
                return ResetAnswer::Failed(reason);
            }
        };
        let mut resp = resp;
        let status = resp.status();
        // only for the message: an unreadable or oversized body leaves it empty
        let body = read_body(&mut resp).await.unwrap_or_default();
        let code = status.as_u16();
        if status.is_success() {
            record(log, req, format!("HTTP {code} (accepted)"));
            return ResetAnswer::Accepted;
        }
        let msg = error_message(&body);
        record(log, req, format!("HTTP {code}: {msg}"));
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ResetAnswer::Denied(self.denied_reason(status, &body)),
            StatusCode::BAD_REQUEST | StatusCode::CONFLICT => {
                ResetAnswer::Refused(format!("BMC {} refused {reset_type} (HTTP {code}: {msg})", self.base))
            }
            _ => ResetAnswer::Failed(format!("BMC {} answered HTTP {code} to {reset_type}: {msg}", self.base)),
        }
    }

    pub(crate) async fn power_state(&self, log: &mut Vec<FenceEvent>) -> PowerState {
        self.read(log).await.state
    }

    pub(crate) async fn power_off(&self, log: &mut Vec<FenceEvent>) -> PowerState {
        self.drive(PowerState::Off, "ForceOff", log).await
    }

    pub(crate) async fn power_on(&self, log: &mut Vec<FenceEvent>) -> PowerState {
        self.drive(PowerState::On, "On", log).await
    }

    /// Reads; if not yet `want`, POSTs `reset_type` and polls until a read says
    /// `want` or the timeout passes. Only a read can say "done".
    /// Sends one reset. `Ok(None)`: accepted; `Ok(Some(reason))`: unknown
    /// whether the BMC acted (poll, and send again while it is reachable);
    /// `Err(state)`: the outcome is decided.
    async fn send_reset(
        &self,
        want: &PowerState,
        reset_type: &str,
        target: Option<Url>,
        log: &mut Vec<FenceEvent>,
    ) -> Result<Option<String>, PowerState> {
        match self.reset(reset_type, target, log).await {
            ResetAnswer::Accepted => Ok(None),
            ResetAnswer::Denied(reason) => Err(PowerState::Unknown(reason)),
            ResetAnswer::Refused(reason) => {
                // 400/409 may mean "already in that state": believe only a read.
                let now = self.read(log).await.state;
                if &now == want {
                    return Err(now);
                }
                Err(PowerState::Unknown(format!("{reason}; it then read {}", describe(&now))))
            }
            ResetAnswer::Failed(reason) => Ok(Some(reason)),
        }
    }

    async fn drive(&self, want: PowerState, reset_type: &str, log: &mut Vec<FenceEvent>) -> PowerState {
        let start = Instant::now();
        // a configured timeout beyond what Instant can hold waits "forever" (a year), not panics
        let deadline = start.checked_add(self.timeout).unwrap_or(start + Duration::from_secs(365 * 86_400));
        let first = self.read(log).await;
        if first.state == want {
            record(log, format!("{reset_type} not sent"), format!("the BMC already reads {}", describe(&want)));
            return want;
        }
        let mut target = first.reset_target;
        let mut post_error = match self.send_reset(&want, reset_type, target.clone(), log).await {
            Ok(failed) => failed,
            Err(end) => return end,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(self.poll.min(left)).await;
            let r = self.read(log).await;
            if r.state == want {
                return want;
            }
            if Instant::now() >= deadline {
                let waited = human(start.elapsed());
                record(
                    log,
                    format!("{reset_type}: gave up"),
                    format!("not {} after {waited}; last read {}", describe(&want), describe(&r.state)),
                );
                return match (post_error, r.state) {
                    (Some(e), PowerState::Unknown(why)) if why == e => {
                        PowerState::Unknown(format!("{reset_type} did not go through: {e} (still after {waited})"))
                    }
                    (Some(e), last) => PowerState::Unknown(format!(
                        "{reset_type} did not go through ({e}); after {waited} the BMC reads {}",
                        describe(&last)
                    )),
                    (None, PowerState::Unknown(why)) => {
                        PowerState::Unknown(format!("{why} (after {reset_type} was accepted, {waited} ago)"))
                    }
                    (None, last) => last,
                };
            }
            if post_error.is_some() && matches!(r.state, PowerState::On | PowerState::Off) {
                // the BMC answers again: send the request that failed before
                if r.reset_target.is_some() {
                    target = r.reset_target;
                }
                match self.send_reset(&want, reset_type, target.clone(), log).await {
                    Ok(failed) => post_error = failed,
                    Err(end) => return end,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(parse_base_url("https://10.77.0.3:8001").is_ok());
        assert!(parse_base_url("https://bmc.example/").is_ok());
        let e = parse_base_url("http://10.0.0.5").unwrap_err();
        assert!(e.contains("use https"), "{e}");
        assert!(parse_base_url("ftp://x").unwrap_err().contains("not supported"));
        assert!(parse_base_url("not a url").unwrap_err().contains("not a valid URL"));
        let e = parse_base_url("https://root:calvin@10.0.0.5").unwrap_err();
        assert!(e.contains("credentials_file") && !e.contains("calvin"), "{e}");
        assert!(parse_base_url("https://x/?a=b").is_err());
    }

    #[test]
    fn system_ids() {
        assert!(check_system_id("System.Embedded.1").is_ok());
        assert!(check_system_id("27946b59-9e44-4fa7-8e91-f3527a1ef094").is_ok());
        assert!(check_system_id("").is_err());
        assert!(check_system_id("a/b").is_err());
        assert!(check_system_id("a b").is_err());
    }

    #[test]
    fn power_states() {
        let p = |s: &str| parse_power_state(s.as_bytes());
        assert_eq!(p(r#"{"PowerState":"On"}"#).unwrap().0, PowerState::On);
        assert_eq!(p(r#"{"PowerState":"Off"}"#).unwrap().0, PowerState::Off);
        assert_eq!(p(r#"{"PowerState":"PoweringOff"}"#).unwrap().0, PowerState::On);
        assert_eq!(p(r#"{"PowerState":"PoweringOn"}"#).unwrap().0, PowerState::On);
        assert!(p(r#"{"PowerState":"Weird"}"#).unwrap_err().contains("neither On nor Off"));
        assert!(p(r#"{"PowerState":null}"#).unwrap_err().contains("no PowerState"));
        assert!(p(r#"{"Name":"x"}"#).unwrap_err().contains("no PowerState"));
        assert!(p(r#"{"PowerState":1}"#).unwrap_err().contains("not a string"));
        assert!(p("<html>").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn redfish_error_messages() {
        let body = br#"{"error":{"code":"Base.1.0.GeneralError","message":"Can not request power off transition.","@Message.ExtendedInfo":[{"MessageId":"x","Message":"Power off is disabled"}]}}"#;
        assert_eq!(error_message(body), "Can not request power off transition.; Power off is disabled");
        assert_eq!(error_message(b""), "(empty body)");
        assert_eq!(error_message(b"<h1>Bad\n Request</h1>"), "<h1>Bad Request</h1>");
    }

    #[test]
    fn reset_targets() {
        let body = br##"{"Actions":{"#ComputerSystem.Reset":{"target":"/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"}}}"##;
        assert_eq!(reset_target(body).as_deref(), Some("/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"));
        assert_eq!(reset_target(b"{}"), None);
    }

    #[test]
    fn ca_bundles() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = lifeboat_common::pki::init(dir.path()).unwrap();
        assert_eq!(load_ca(&ca).unwrap().len(), 1);
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "hello\n").unwrap();
        assert!(load_ca(&bad).unwrap_err().contains("no PEM CERTIFICATE"));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        assert!(load_ca(&garbage).is_err());
        assert!(load_ca(&dir.path().join("missing.pem")).unwrap_err().contains("cannot read CA bundle"));
    }

    #[test]
    fn an_answer_that_says_two_things_is_not_off() {
        let p = |s: &str| parse_power_state(s.as_bytes());
        assert!(p(r#"{"PowerState":"On","PowerState":"Off"}"#).unwrap_err().contains("ambiguous"));
        assert!(p(r#"{"PowerState":"Off","PowerState":"Off"}"#).unwrap_err().contains("ambiguous"));
        assert!(p(r#"["PowerState","Off"]"#).unwrap_err().contains("not a JSON object"));
        assert!(p(&format!(r#"{{"PowerState":"Off{}"}}"#, " ".repeat(100))).unwrap_err().contains("neither"));
        assert_eq!(p(r#"{"PowerState":" Off "}"#).unwrap(), (PowerState::Off, "Off".to_string()));
        // a nested PowerState is not the system's
        assert!(p(r#"{"Status":{"PowerState":"Off"}}"#).is_err());
    }

    #[test]
    fn bmc_text_is_one_printable_line() {
        assert_eq!(printable("a\n\t b\u{1b}[2J"), "a b\\u{1b}[2J");
        let body = br#"{"error":{"message":"clear\u001b[2Jscreen\nnext"}}"#;
        assert_eq!(error_message(body), "clear\\u{1b}[2Jscreen next");
        let e = parse_power_state(b"\x1b]0;title\x07 not json").unwrap_err();
        assert!(!e.chars().any(char::is_control), "{e}");
    }
}
