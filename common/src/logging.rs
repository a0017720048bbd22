//! Logging setup shared by the daemons: human-readable by default,
//! JSON lines when asked (`LIFEBOAT_LOG_FORMAT=json`), level from `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Initialises the global tracing subscriber, writing to stderr.
pub fn init(default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let json = std::env::var("LIFEBOAT_LOG_FORMAT").map(|v| v == "json").unwrap_or(false);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}
