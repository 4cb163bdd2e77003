//! The HTTP endpoint: its routes (`routes`), the connections it admits (`connections`), and
//! the streamed body of `/api/sockets` (`socket_listing`).

mod connections;
mod routes;
mod socket_listing;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;

pub(crate) use self::routes::bind;
use crate::{
    daemon::{
        Flush,
        core::{Diagnoses, Shared},
        export::exposition::Exporter,
    },
    web_config::WebConfig,
};

/// How long shutdown waits for HTTP connections to finish.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_millis(800);

/// The HTTP endpoint, served on a task of its own until stopped.
pub(crate) struct HttpServer {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl HttpServer {
    pub(crate) fn start(
        listener: tokio::net::TcpListener,
        shared: &Arc<Shared>,
        diagnoses: Diagnoses,
        web: Option<WebConfig>,
        exporter: Arc<Exporter>,
        flush: tokio::sync::mpsc::Sender<Flush>,
    ) -> Self {
        let state = routes::AppState {
            shared: shared.clone(),
            diagnoses,
            exporter,
            flush,
            listings: Arc::new(tokio::sync::Semaphore::new(routes::MAX_LISTINGS)),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let users = web.as_ref().and_then(|w| w.users.clone());
            let tls = web.and_then(|w| w.tls);
            connections::serve(listener, routes::router(state, users), tls, async {
                let _ = stopped.await;
            })
            .await;
        });
        Self { task, stop }
    }

    /// Stops accepting now; the future gives connections still open a moment to finish.
    pub(crate) fn stop(self) -> impl Future<Output = anyhow::Result<()>> {
        let _ = self.stop.send(());
        async move {
            match tokio::time::timeout(HTTP_SHUTDOWN_GRACE, self.task).await {
                Ok(Ok(())) => {}
                Ok(Err(join)) => return Err(join).context("HTTP server task"),
                Err(_elapsed) => log::debug!("closing HTTP connections still open"),
            }
            log::debug!("HTTP server stopped");
            Ok(())
        }
    }
}
