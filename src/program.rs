//! What every long-running side program (`meshlet inject`, `meshlet identity`) starts with:
//! its logs, its runtime, and a stop on SIGTERM or SIGINT.

use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON lines.
pub fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        logs.json().try_init()
    } else {
        logs.try_init()
    };
}

/// A two-thread runtime, or the exit code after saying why there is none.
pub fn runtime(program: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("meshlet {program}: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// Cancels `stop` on the first SIGTERM or SIGINT, `delay` after it (a program that must keep
/// serving a moment while endpoints move on).
pub async fn stop_on_signal(stop: CancellationToken, delay: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    if !delay.is_zero() {
        tracing::info!(delay = ?delay, "shutting down: still serving until endpoints have moved on");
        tokio::time::sleep(delay).await;
    }
    tracing::info!("shutting down: no new connections");
    stop.cancel();
}
