//! Shared driver of the `fuzz_*` property tests (included with `#[path]` by
//! the test files of the agent, controller and CLI crates).
//!
//! * `PROPTEST_CASES` (default: the target's small figure, so the normal
//!   `cargo test` stays fast) is the number of cases of one batch.
//! * `FUZZ_SECONDS`: when set, batches are run again until that many seconds
//!   have passed (`scripts/fuzz.sh` sets it).
//! * Failures are minimized by proptest and their seeds saved in
//!   `fuzz/proptest-regressions/<target>.txt` (committed); every run replays
//!   them first.
//! * Seeds: `fuzz/corpus/<target>/` is read by [`corpus`].

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestError, TestRunner};

/// The repository's `fuzz/` directory.
pub fn fuzz_dir() -> PathBuf {
    // every crate using this harness sits one level below the workspace root
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crate directory has a parent").join("fuzz")
}

/// The files of `fuzz/corpus/<target>/` as (file name, bytes), sorted by name.
/// Panics when the directory is missing or empty: the seeds are part of the test.
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} unreadable: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("corpus entry").path();
            let name = p.file_name().expect("file name").to_string_lossy().into_owned();
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("corpus file {} unreadable: {e}", p.display()));
            (name, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "corpus {} is empty", dir.display());
    out
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")))
}

/// Runs `test` on values of `strategy`: one batch of `PROPTEST_CASES` (or
/// `default_cases`) cases, repeated while `FUZZ_SECONDS` has not passed.
/// Prints `fuzz TARGET: N cases in S s (R cases/s)`; panics with the
/// minimized input and the regression file on a failure.
pub fn run<S, F>(target: &str, default_cases: u32, strategy: S, test: F)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(S::Value) -> Result<(), TestCaseError>,
{
    let cases = env_u64("PROPTEST_CASES").map_or(default_cases, |n| u32::try_from(n.max(1)).unwrap_or(u32::MAX));
    let budget = env_u64("FUZZ_SECONDS").map(Duration::from_secs);
    let regressions = fuzz_dir().join("proptest-regressions").join(format!("{target}.txt"));
    let leaked: &'static str = Box::leak(regressions.to_string_lossy().into_owned().into_boxed_str());
    let start = Instant::now();
    let deadline = budget.map(|b| start + b);
    // cases actually run (the rest of the batch after the deadline is skipped)
    let ran = std::cell::Cell::new(0u64);
    let counted = |v: S::Value| {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        ran.set(ran.get().saturating_add(1));
        test(v)
    };
    loop {
        let config = Config {
            cases,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(leaked))),
            // the persistence above ignores the file name, but proptest wants one
            source_file: Some(file!()),
            max_shrink_time: 60_000,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        match runner.run(&strategy, counted) {
            Ok(()) => {}
            Err(TestError::Fail(why, value)) => panic!(
                "fuzz {target}: FAILED ({} runs, shrinking included): {why}\nminimized input: {value:#?}\n\
                 seed saved in {} (replayed first by every run; commit it with the fix)",
                ran.get(),
                regressions.display()
            ),
            Err(TestError::Abort(why)) => panic!("fuzz {target}: aborted: {why}"),
        }
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    let total = ran.get();
    let secs = start.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { total as f64 / secs } else { 0.0 };
    println!("fuzz {target}: {total} cases in {secs:.1} s ({rate:.0} cases/s)");
}
