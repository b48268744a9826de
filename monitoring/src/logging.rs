//! tracing-subscriber set-up: human format by default, JSON on request, level from `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` sets the level (default `info`). Safe to call
/// twice: the second call is ignored (tests start several engines in one process).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
