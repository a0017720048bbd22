//! Dashboard sign-in: one-time links minted over gRPC (`CreateDashboardLogin`)
//! and the sessions they open, both in this process's memory only.
//!
//! Secrets (tokens, session ids) are 32 random bytes, hex-encoded; the maps
//! are keyed by their SHA-256 so a lookup leaks no timing about the secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use lifeboat_common::identity::Role;
use ring::rand::SecureRandom;
use sha2::{Digest, Sha256};

use crate::ports::clock::Clock;

/// How long a sign-in link works.
pub const LINK_TTL_MS: i64 = 60_000;
/// Links waiting to be used at once (past it new links are refused).
pub const MAX_LINKS: usize = 100;
/// Sessions at once (expired ones are swept first; past it new sign-ins are refused).
pub const MAX_SESSIONS: usize = 1000;
/// Links waiting per certificate name (a new one drops that name's oldest).
pub const MAX_LINKS_PER_NAME: usize = 3;
/// Sessions per certificate name (a new one ends that name's oldest).
pub const MAX_SESSIONS_PER_NAME: usize = 10;
/// The session cookie's name (`__Host-`: Secure, Path=/, no Domain).
pub const COOKIE: &str = "__Host-lifeboat";
/// Hex characters of a token or session id.
pub const SECRET_HEX: usize = 64;

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The certificate name the link was minted for.
    pub name: String,
    /// Its role at mint time.
    pub role: Role,
    /// The per-session CSRF token (hex), sent back in `X-Lifeboat-Csrf`.
    pub csrf: String,
    /// When the session ends (absolute), ms since the epoch.
    pub expires_ms: i64,
}

#[derive(Debug, Clone)]
struct Link {
    name: String,
    role: Role,
    expires_ms: i64,
    minted_ms: i64,
    /// The latest a session it opens may last (the certificate's expiry).
    session_until_ms: i64,
}

/// Links and sessions of one controller process.
pub struct Auth {
    clock: Arc<dyn Clock>,
    ttl_ms: i64,
    rng: ring::rand::SystemRandom,
    links: Mutex<HashMap<[u8; 32], Link>>,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hex of `bytes` (lowercase).
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The map key of a secret, or `None` when it is not the right shape
/// (64 lowercase hex characters): garbage never reaches a map.
fn key_of(secret: &str) -> Option<[u8; 32]> {
    if secret.len() != SECRET_HEX || !secret.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    Some(Sha256::digest(secret.as_bytes()).into())
}

impl Auth {
    /// Links and sessions read the time from `clock`; a session lasts
    /// `session_ttl_s` from sign-in.
    pub fn new(clock: Arc<dyn Clock>, session_ttl_s: u32) -> Self {
        Auth {
            clock,
            ttl_ms: i64::from(session_ttl_s).saturating_mul(1000),
            rng: ring::rand::SystemRandom::new(),
            links: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `s` ends, rounded up (at least 1): `session_ttl_s` at
    /// sign-in, or less when the certificate expires sooner.
    pub fn seconds_left(&self, s: &Session) -> i64 {
        let left_ms = s.expires_ms.saturating_sub(self.clock.now_ms());
        (left_ms.saturating_add(999) / 1000).clamp(1, self.session_ttl_s().max(1))
    }

    /// The session lifetime, seconds.
    pub fn session_ttl_s(&self) -> i64 {
        self.ttl_ms / 1000
    }

    /// 32 random bytes as hex. The system's generator failing is not
    /// something a caller can mend; it is reported as `None`.
    fn secret(&self) -> Option<String> {
        let mut buf = [0u8; 32];
        self.rng.fill(&mut buf).ok()?;
        Some(hex(&buf))
    }

    /// A one-time link for `name` with `role`: its token and when it expires.
    pub fn mint(&self, name: &str, role: Role) -> Result<(String, i64), AuthError> {
        self.mint_until(name, role, i64::MAX)
    }

    /// [`Auth::mint`] for a certificate that expires at `until_ms`: the
    /// session the link opens ends then at the latest, whatever
    /// `session_ttl_s` says.
    pub fn mint_until(&self, name: &str, role: Role, until_ms: i64) -> Result<(String, i64), AuthError> {
        let token = self.secret().ok_or(AuthError::Random)?;
        let key = key_of(&token).ok_or(AuthError::Random)?;
        let now = self.clock.now_ms();
        let expires_ms = now.saturating_add(LINK_TTL_MS);
        let mut links = lock(&self.links);
        links.retain(|_, l| l.expires_ms > now);
        // One name's links make room among its own, never among others'.
        while links.values().filter(|l| l.name == name).count() >= MAX_LINKS_PER_NAME {
            let Some(oldest) =
                links.iter().filter(|(_, l)| l.name == name).min_by_key(|(_, l)| l.minted_ms).map(|(k, _)| *k)
            else {
                break;
            };
            links.remove(&oldest);
        }
        if links.len() >= MAX_LINKS {
            return Err(AuthError::Full { what: "sign-in links waiting", max: MAX_LINKS });
        }
        let link = Link { name: name.to_string(), role, expires_ms, minted_ms: now, session_until_ms: until_ms };
        links.insert(key, link);
        Ok((token, expires_ms))
    }

    /// Uses a link (once: it is gone after this, used or not) and opens a
    /// session: its id and the session. `None` for an unknown, used or
    /// expired token.
    pub fn redeem(&self, token: &str) -> Option<(String, Session)> {
        self.open_session(token).ok()
    }

    /// [`Auth::redeem`], saying why not: the link is gone, or the
    /// controller holds [`MAX_SESSIONS`] (then the link stays usable).
    pub fn open_session(&self, token: &str) -> Result<(String, Session), AuthError> {
        let key = key_of(token).ok_or(AuthError::Gone)?;
        let now = self.clock.now_ms();
        let link = lock(&self.links).get(&key).cloned().ok_or(AuthError::Gone)?;
        if link.expires_ms <= now {
            lock(&self.links).remove(&key);
            return Err(AuthError::Gone);
        }
        let id = self.secret().ok_or(AuthError::Random)?;
        let csrf = self.secret().ok_or(AuthError::Random)?;
        let skey = key_of(&id).ok_or(AuthError::Random)?;
        let expires_ms = now.saturating_add(self.ttl_ms).min(link.session_until_ms);
        if expires_ms <= now {
            lock(&self.links).remove(&key);
            return Err(AuthError::CertificateExpired { at_ms: link.session_until_ms });
        }
        let s = Session { name: link.name.clone(), role: link.role, csrf, expires_ms };
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, s| s.expires_ms > now);
        let mine = sessions.values().filter(|x| x.name == link.name).count();
        if mine < MAX_SESSIONS_PER_NAME && sessions.len() >= MAX_SESSIONS {
            return Err(AuthError::Full { what: "dashboard sessions", max: MAX_SESSIONS });
        }
        // Used once: whoever removes it opens the session.
        lock(&self.links).remove(&key).ok_or(AuthError::Gone)?;
        while sessions.values().filter(|x| x.name == link.name).count() >= MAX_SESSIONS_PER_NAME {
            let Some(oldest) =
                sessions.iter().filter(|(_, x)| x.name == link.name).min_by_key(|(_, x)| x.expires_ms).map(|(k, _)| *k)
            else {
                break;
            };
            sessions.remove(&oldest);
        }
        sessions.insert(skey, s.clone());
        Ok((id, s))
    }

    /// Drops an unused link (its minting could not be audited).
    pub fn forget_link(&self, token: &str) {
        if let Some(key) = key_of(token) {
            lock(&self.links).remove(&key);
        }
    }

    /// Whether `token` is a link that can still be used (without using it).
    pub fn pending(&self, token: &str) -> bool {
        let Some(key) = key_of(token) else { return false };
        let now = self.clock.now_ms();
        lock(&self.links).get(&key).is_some_and(|l| l.expires_ms > now)
    }

    /// The session with id `id`, while it lasts (an expired one is removed).
    pub fn session(&self, id: &str) -> Option<Session> {
        let key = key_of(id)?;
        let now = self.clock.now_ms();
        let mut sessions = lock(&self.sessions);
        match sessions.get(&key) {
            Some(s) if s.expires_ms > now => Some(s.clone()),
            Some(_) => {
                sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends every session and drops every unused link of `name` (of
    /// everybody when `None`): how many of each.
    pub fn end_all(&self, name: Option<&str>) -> (usize, usize) {
        let of = |n: &str| name.is_none_or(|want| want == n);
        // Both locks at once, in open_session's order: a link redeemed
        // meanwhile cannot leave a session behind.
        let mut sessions = lock(&self.sessions);
        let mut links = lock(&self.links);
        let before = sessions.len();
        sessions.retain(|_, s| !of(&s.name));
        let ended = before - sessions.len();
        let before = links.len();
        links.retain(|_, l| !of(&l.name));
        (ended, before - links.len())
    }

    /// Ends a session (sign-out).
    pub fn end(&self, id: &str) {
        if let Some(key) = key_of(id) {
            lock(&self.sessions).remove(&key);
        }
    }

    /// Links waiting and sessions open (tests, logs).
    pub fn counts(&self) -> (usize, usize) {
        // One lock at a time: holding links while taking sessions would be
        // the reverse of open_session's order.
        let links = lock(&self.links).len();
        let sessions = lock(&self.sessions).len();
        (links, sessions)
    }
}

/// Why a link cannot be minted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The system's random generator failed.
    #[error("the system's random number generator failed; try again")]
    Random,
    /// The link is unknown, used or expired.
    #[error("the sign-in link was used or has expired; run `lifeboat dashboard login` again")]
    Gone,
    /// The client certificate that asked for the link expired before it
    /// was used.
    #[error(
        "the client certificate that asked for this link expired at {at_ms} (unix ms): get a new certificate \
         (`lifeboat certs issue --client NAME --role ROLE`), then run `lifeboat dashboard login` again"
    )]
    CertificateExpired {
        /// When it expired, ms since the epoch.
        at_ms: i64,
    },
    /// The controller holds as many as it keeps.
    #[error("this controller already holds {max} {what} (the limit); try again when some expire or sign out")]
    Full {
        /// What is full.
        what: &'static str,
        /// The limit.
        max: usize,
    },
}

/// The session id in a `Cookie` header value, if one is there.
pub fn session_cookie(header: &str) -> Option<&str> {
    header.split(';').map(str::trim).find_map(|kv| kv.strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The `Set-Cookie` value that holds session `id` for `max_age_s`.
pub fn set_cookie(id: &str, max_age_s: i64) -> String {
    format!("{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age_s}")
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::clock::ManualClock;

    #[test]
    fn a_session_ends_at_the_certificates_expiry_if_that_comes_first() {
        let (c, a) = auth();
        let now = 1_000_000;
        let (t, _) = a.mint_until("olga", Role::Operator, now + 200_000).unwrap();
        let (id, s) = a.open_session(&t).unwrap();
        assert_eq!(s.expires_ms, now + 200_000, "capped at the certificate's expiry");
        assert_eq!(a.seconds_left(&s), 200);
        c.advance(200_000);
        assert!(a.session(&id).is_none(), "over when the certificate is");
        // A certificate that expires before the link is used opens nothing.
        let (t, _) = a.mint_until("olga", Role::Operator, now + 201_000).unwrap();
        c.advance(1_000);
        let e = a.open_session(&t).unwrap_err();
        assert!(matches!(e, AuthError::CertificateExpired { at_ms: 1_201_000 }), "{e}");
        assert!(e.to_string().contains("get a new certificate"), "{e}");
        assert!(!a.pending(&t), "and the link is gone");
        // Without an expiry, session_ttl_s.
        let (t, _) = a.mint("olga", Role::Operator).unwrap();
        let (_, s) = a.open_session(&t).unwrap();
        assert_eq!(a.seconds_left(&s), a.session_ttl_s());
    }

    #[test]
    fn ending_a_names_sessions_leaves_the_others_and_drops_its_links() {
        let (_, a) = auth();
        let open = |name: &str| a.open_session(&a.mint(name, Role::Viewer).unwrap().0).unwrap().0;
        let (o1, o2, v1) = (open("olga"), open("olga"), open("vera"));
        let (pending, _) = a.mint("olga", Role::Operator).unwrap();
        let (vpending, _) = a.mint("vera", Role::Viewer).unwrap();
        assert_eq!(a.end_all(Some("olga")), (2, 1));
        assert!(a.session(&o1).is_none() && a.session(&o2).is_none() && !a.pending(&pending));
        assert!(a.session(&v1).is_some() && a.pending(&vpending), "vera's are untouched");
        assert_eq!(a.end_all(Some("nobody")), (0, 0));
        assert_eq!(a.end_all(None), (1, 1));
        assert!(a.session(&v1).is_none() && !a.pending(&vpending));
    }

    fn auth() -> (ManualClock, Auth) {
        let c = ManualClock::new(1_000_000);
        let a = Auth::new(Arc::new(c.clone()), 300);
        (c, a)
    }

    #[test]
    fn a_link_works_once() {
        let (_, a) = auth();
        let (t, _) = a.mint("ann", Role::Operator).unwrap();
        assert_eq!(t.len(), SECRET_HEX);
        assert!(a.pending(&t));
        let (id, s) = a.redeem(&t).expect("first use");
        assert!(!a.pending(&t));
        assert_eq!((s.name.as_str(), s.role), ("ann", Role::Operator));
        assert!(a.redeem(&t).is_none(), "second use");
        assert_eq!(a.session(&id).unwrap(), s);
    }

    #[test]
    fn an_expired_link_is_refused_and_a_session_ends_at_its_ttl() {
        let (c, a) = auth();
        let (t, exp) = a.mint("ann", Role::Viewer).unwrap();
        assert_eq!(exp, 1_000_000 + LINK_TTL_MS);
        c.advance(LINK_TTL_MS + 1000);
        assert!(a.redeem(&t).is_none());
        let (t, _) = a.mint("ann", Role::Viewer).unwrap();
        let (id, _) = a.redeem(&t).unwrap();
        c.advance(299_000);
        assert!(a.session(&id).is_some());
        c.advance(1_000);
        assert!(a.session(&id).is_none(), "absolute expiry");
        assert_eq!(a.counts().1, 0);
    }

    #[test]
    fn garbage_tokens_and_cookies_are_refused() {
        let (_, a) = auth();
        for t in ["", "x", &"g".repeat(64), &"A".repeat(64), &"a".repeat(65), &"a".repeat(100_000)] {
            assert!(a.redeem(t).is_none());
            assert!(a.session(t).is_none());
            a.end(t);
        }
        assert_eq!(session_cookie("a=b; __Host-lifeboat=abc; c=d"), Some("abc"));
        assert_eq!(session_cookie("__Host-lifeboatx=abc"), None);
        assert_eq!(session_cookie(""), None);
    }

    #[test]
    fn the_maps_are_bounded_per_name_and_a_full_map_refuses_without_evicting_others() {
        let (c, a) = auth();
        let (first, _) = a.mint("olga", Role::Operator).unwrap();
        for _ in 0..(MAX_LINKS + 20) {
            a.mint("eve", Role::Viewer).unwrap();
            c.advance(1);
        }
        assert_eq!(a.counts().0, 1 + MAX_LINKS_PER_NAME, "eve keeps only her newest links");
        assert!(a.pending(&first), "another name's link survives");
        let (olga, _) = a.redeem(&first).unwrap();
        for _ in 0..(MAX_SESSIONS + 5) {
            let (t, _) = a.mint("eve", Role::Viewer).unwrap();
            a.redeem(&t).unwrap();
            c.advance(1);
        }
        assert_eq!(a.counts().1, 1 + MAX_SESSIONS_PER_NAME, "eve keeps only her newest sessions");
        assert!(a.session(&olga).is_some(), "eve's sign-ins do not sign olga out");
        // Many names fill the map: the next new name is refused, nobody is evicted.
        let mut n = 0;
        while a.counts().1 < MAX_SESSIONS {
            let (t, _) = a.mint(&format!("u{n}"), Role::Viewer).unwrap();
            a.redeem(&t).unwrap();
            n += 1;
        }
        let (t, _) = a.mint("late", Role::Viewer).unwrap();
        let e = a.open_session(&t).unwrap_err();
        assert!(matches!(e, AuthError::Full { max: MAX_SESSIONS, .. }), "{e}");
        assert!(e.to_string().contains("1000 dashboard sessions"), "{e}");
        assert!(a.pending(&t), "a refused sign-in keeps its link");
        assert!(a.session(&olga).is_some());
        assert_eq!(a.counts().1, MAX_SESSIONS);
        // Links: a full map refuses a new one.
        c.advance(LINK_TTL_MS + 1);
        for i in 0..MAX_LINKS {
            a.mint(&format!("l{i}"), Role::Viewer).unwrap();
        }
        let e = a.mint("one-more", Role::Viewer).unwrap_err();
        assert!(e.to_string().contains("100 sign-in links"), "{e}");
    }

    #[test]
    fn the_cookie_has_every_attribute() {
        let c = set_cookie("ab", 28800);
        assert_eq!(c, "__Host-lifeboat=ab; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=28800");
        assert!(clear_cookie().ends_with("Max-Age=0"));
    }
}
