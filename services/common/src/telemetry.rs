//! Logging: `tracing` to stderr, level from `ORLY_LOG_LEVEL` (a level or an EnvFilter directive).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is e.g. "info", "debug", or
/// "info,orly_db=trace". Calling it twice is harmless (the second call is ignored).
pub fn init_tracing(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("ORLY_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colour only on a terminal: logs collected by systemd or a container runtime stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(true);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
