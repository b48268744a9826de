//! tracing-subscriber set-up: human format by default, JSON on request, level from `RUST_LOG`.
//! Logs go to standard error, so that command output (`gateway check`, `gateway clients`) on
//! standard output stays clean; colours only when standard error is a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` sets the level (default `info`). Safe to call
/// twice: the second call is ignored (tests start several engines in one process).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
