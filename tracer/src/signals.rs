//! Stopping cleanly: Ctrl-C (SIGINT) from a terminal, SIGTERM from systemd or Kubernetes.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves when SIGINT or SIGTERM arrives. The handlers are installed when this is called,
/// so call it before doing work that a signal should interrupt.
pub(crate) fn shutdown() -> anyhow::Result<impl Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
