//! Finding the leading controller among several URLs: each is asked in
//! order (a read-only first call), a follower's "leader is URL" answer is
//! followed when that URL is one of the configured ones, and every URL is
//! asked at most once. Only a follower's refusal (which did nothing) leads to
//! another controller; the command's own call is sent once, to the leader.

use std::future::Future;

use crate::client::CliError;

/// What one controller answered to the first call.
pub enum Answer<C> {
    /// It leads (or is the single SQLite controller): use this connection.
    Leader(C),
    /// A follower: it names the leader (`""`: no leader is elected).
    Follower {
        /// The leader's URL, as the follower gave it.
        leader: String,
        /// The follower's message.
        message: String,
    },
    /// Unreachable, refused our certificate, or anything else.
    Failed(CliError),
}

fn same(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Asks the controllers of `urls` with `ask` until one leads; returns its
/// connection and URL. With one URL that failed, its error is returned as
/// it is; otherwise the error lists each URL and what it answered.
pub async fn find<C, F, Fut>(urls: &[String], mut ask: F) -> Result<(C, String), CliError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Answer<C>>,
{
    let mut asked = vec![false; urls.len()];
    let mut lines: Vec<String> = Vec::new();
    let mut failures: Vec<CliError> = Vec::new();
    let mut followers = 0usize;
    let mut hint: Option<usize> = None;
    while let Some(i) = hint.take().filter(|i| !asked[*i]).or_else(|| asked.iter().position(|a| !a)) {
        asked[i] = true;
        let url = urls[i].clone();
        match ask(url.clone()).await {
            Answer::Leader(c) => return Ok((c, url)),
            Answer::Follower { leader, message } => {
                followers += 1;
                let line = if leader.is_empty() {
                    format!("{url}: not the leader, and it knows no leader ({message})")
                } else if let Some(j) = urls.iter().position(|u| same(u, &leader)) {
                    hint = Some(j);
                    format!("{url}: not the leader; leader is {leader}")
                } else {
                    format!(
                        "{url}: not the leader; leader is {}, which is not among the controller URLs given \
                         (add it: --controller-url, $LIFEBOAT_CONTROLLER or the CLI config file)",
                        crate::output::truncate(&crate::output::clean(&leader), 200)
                    )
                };
                lines.push(line);
            }
            Answer::Failed(e) => {
                lines.push(format!("{url}: {e}"));
                failures.push(e);
            }
        }
    }
    if urls.len() == 1
        && let Some(e) = failures.pop()
    {
        return Err(e);
    }
    let msg = format!("no controller answered as the leader:\n  {}", lines.join("\n  "));
    // One kind of failure everywhere (say, our certificate refused by all) keeps its exit code.
    match failures.first() {
        Some(first) if followers == 0 && failures.iter().all(|e| e.exit_code() == first.exit_code()) => {
            Err(first.with_message(msg))
        }
        _ => Err(CliError::Unreachable(msg)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("https://c{i}:7443")).collect()
    }

    /// Runs `find` against answers given per URL index; returns the result and the order asked.
    fn run(n: usize, answer: impl Fn(usize) -> Answer<usize>) -> (Result<(usize, String), CliError>, Vec<usize>) {
        let asked = RefCell::new(Vec::new());
        let u = urls(n);
        let r = futures_lite(find(&u, |url| {
            let i: usize = url["https://c".len()..].split(':').next().unwrap().parse().unwrap();
            asked.borrow_mut().push(i);
            let a = answer(i);
            async move { a }
        }));
        (r, asked.into_inner())
    }

    fn futures_lite<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    fn follower(leader: &str) -> Answer<usize> {
        Answer::Follower { leader: leader.into(), message: "not the leader".into() }
    }

    #[test]
    fn the_hint_is_followed_and_each_url_is_asked_once() {
        // c0 names c2 as the leader: c1 is skipped.
        let (r, asked) = run(3, |i| if i == 2 { Answer::Leader(2) } else { follower("https://c2:7443/") });
        assert_eq!(r.unwrap(), (2, "https://c2:7443".to_string()));
        assert_eq!(asked, [0, 2]);
        // Two followers naming each other (a stale hint): each asked once, then the rest of the list.
        let (r, asked) = run(3, |i| match i {
            0 => follower("https://c1:7443"),
            1 => follower("https://c0:7443"),
            _ => Answer::Leader(2),
        });
        assert_eq!(r.unwrap().0, 2);
        assert_eq!(asked, [0, 1, 2]);
    }

    #[test]
    fn no_leader_lists_every_url_and_its_answer() {
        let (r, asked) = run(3, |i| match i {
            0 => follower(""),
            1 => follower("https://elsewhere:7443"),
            _ => Answer::Failed(CliError::Unreachable("cannot reach the controller: refused".into())),
        });
        assert_eq!(asked, [0, 1, 2]);
        let e = r.unwrap_err();
        assert_eq!(e.exit_code(), 3);
        let m = e.to_string();
        for want in [
            "https://c0:7443: not the leader, and it knows no leader",
            "https://c1:7443: not the leader; leader is https://elsewhere:7443, which is not among",
            "https://c2:7443: cannot reach the controller: refused",
        ] {
            assert!(m.contains(want), "{want} not in {m}");
        }
        // The same refusal everywhere keeps its exit code; one URL keeps today's message.
        let (r, _) = run(2, |_| Answer::Failed(CliError::Refused("certificate rejected".into())));
        assert_eq!(r.unwrap_err().exit_code(), 4);
        let (r, _) = run(1, |_| Answer::Failed(CliError::Refused("certificate rejected: x".into())));
        assert_eq!(r.unwrap_err().to_string(), "certificate rejected: x");
        let (r, _) = run(1, |_| follower("https://c9:7443"));
        let e = r.unwrap_err();
        assert!(e.exit_code() == 3 && e.to_string().contains("leader is https://c9:7443"), "{e}");
    }
}
