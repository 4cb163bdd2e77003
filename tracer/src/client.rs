//! Reading the daemon's HTTP endpoints, for the commands that show what a running daemon
//! knows (`tcpstate leaks`, `tcpstate top`): one plain HTTP/1.1 GET per call, with timeouts.

use std::time::Duration;

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, StatusCode, body::Bytes, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;

use crate::cli::DaemonUrl;

/// How long to wait for the daemon to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for the whole answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why an answer could not be had.
#[derive(Debug)]
pub enum FetchError {
    /// Nothing answers there.
    Unreachable(String),
    /// Something answered, but not with what was asked: a real error.
    Failed(anyhow::Error),
}

/// GETs `path` from the daemon over a connection of its own; the body of a 200 answer.
pub async fn get(url: &DaemonUrl, path: &str) -> Result<Bytes, FetchError> {
    Connection::new(url.clone()).get(path).await
}

/// A connection to the daemon kept open between requests, and reopened when the daemon
/// closed it. For repeated reads (`top`), which would otherwise open, and so show among the
/// host's transitions, new connections every second.
pub struct Connection {
    url: DaemonUrl,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Connection {
    pub const fn new(url: DaemonUrl) -> Self {
        Self { url, sender: None }
    }

    pub const fn url(&self) -> &DaemonUrl {
        &self.url
    }

    /// GETs `path`; the body of a 200 answer. A kept connection the daemon has meanwhile
    /// closed (idle, or evicted for a newcomer) is replaced once.
    pub async fn get(&mut self, path: &str) -> Result<Bytes, FetchError> {
        let kept = self.sender.take().filter(|sender| !sender.is_closed());
        let reused = kept.is_some();
        let sender = match kept {
            Some(sender) => sender,
            None => connect(&self.url).await?,
        };
        match self.exchange(sender, path).await {
            Err(FetchError::Failed(_)) if reused => {
                let sender = connect(&self.url).await?;
                self.exchange(sender, path).await
            }
            result => result,
        }
    }

    async fn exchange(
        &mut self,
        mut sender: SendRequest<Empty<Bytes>>,
        path: &str,
    ) -> Result<Bytes, FetchError> {
        let url = &self.url;
        let exchange = async {
            let request = Request::get(path)
                .header(hyper::header::HOST, format!("{}:{}", url.host, url.port))
                .body(Empty::<Bytes>::new())?;
            let response = sender.send_request(request).await.context("sending the request")?;
            let status = response.status();
            let body =
                response.into_body().collect().await.context("reading the response")?.to_bytes();
            if status != StatusCode::OK {
                bail!("{url}{path} answered {status}: {}", String::from_utf8_lossy(&body));
            }
            Ok(body)
        };
        let body = match tokio::time::timeout(RESPONSE_TIMEOUT, exchange).await {
            Ok(result) => result.map_err(FetchError::Failed)?,
            Err(_) => {
                return Err(FetchError::Failed(anyhow::anyhow!(
                    "{url}{path} did not answer within {} s",
                    RESPONSE_TIMEOUT.as_secs()
                )));
            }
        };
        self.sender = Some(sender);
        Ok(body)
    }
}

async fn connect(url: &DaemonUrl) -> Result<SendRequest<Empty<Bytes>>, FetchError> {
    let connect = tokio::net::TcpStream::connect((url.host.as_str(), url.port));
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(FetchError::Unreachable(error.to_string())),
        Err(_) => {
            let waited = CONNECT_TIMEOUT.as_secs();
            return Err(FetchError::Unreachable(format!("no answer within {waited} s")));
        }
    };
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")
        .map_err(FetchError::Failed)?;
    tokio::spawn(connection);
    Ok(sender)
}
