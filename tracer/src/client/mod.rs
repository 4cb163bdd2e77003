//! Reading the daemon's HTTP endpoints, for the commands that show what a running daemon
//! knows (`tcpstate leaks`, `tcpstate top`): HTTP/1.1 GETs with timeouts, over TLS and with
//! basic auth when the daemon's `--web-config` asks for them.

mod url;

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use http_body_util::Empty;
use hyper::{
    Request, StatusCode, body::Bytes, client::conn::http1::SendRequest, header::HeaderValue,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio_rustls::TlsConnector;

use crate::bounded_body::read_at_most;

pub(crate) use self::url::{DaemonTls, DaemonUrl};

/// Where the daemon answers and how to get in: TLS settings and credentials, read once.
#[derive(Clone)]
pub(crate) struct Endpoint {
    url: DaemonUrl,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    authorization: Option<HeaderValue>,
}

impl Endpoint {
    /// Plain HTTP, no credentials (a daemon this process runs itself).
    pub(crate) fn plain(url: DaemonUrl) -> Self {
        Self { url, tls: None, authorization: None }
    }

    /// Reads the CA and client certificate files, and the password from the URL or
    /// `TCPSTATE_DAEMON_PASSWORD`.
    pub(crate) fn new(url: DaemonUrl, tls: &DaemonTls) -> anyhow::Result<Self> {
        let authorization = url.user.as_ref().map(|user| {
            use base64::Engine as _;
            let password = url
                .password
                .clone()
                .or_else(|| std::env::var("TCPSTATE_DAEMON_PASSWORD").ok())
                .unwrap_or_default();
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            let mut value = HeaderValue::from_str(&format!("Basic {token}"))
                .expect("base64 is a valid header value");
            value.set_sensitive(true);
            value
        });
        let tls = match (&tls.ca, url.https) {
            (Some(ca), true) => Some(tls_connector(&url, ca, tls)?),
            _ => None,
        };
        Ok(Self { url, tls, authorization })
    }

    pub(crate) const fn url(&self) -> &DaemonUrl {
        &self.url
    }
}

fn read_pem(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// Trusts only `ca`, and presents the client certificate when one is given.
fn tls_connector(
    url: &DaemonUrl,
    ca: &Path,
    tls: &DaemonTls,
) -> anyhow::Result<(TlsConnector, ServerName<'static>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read_pem("--daemon-ca", ca)?) {
        let cert =
            cert.with_context(|| format!("--daemon-ca {}: not a PEM certificate", ca.display()))?;
        roots.add(cert).with_context(|| format!("--daemon-ca {}", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("--daemon-ca {} holds no certificate", ca.display());
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match &tls.client_cert {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(&read_pem("--daemon-cert", cert)?)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| {
                    format!("--daemon-cert {}: not PEM certificates", cert.display())
                })?;
            let key = PrivateKeyDer::from_pem_slice(&read_pem("--daemon-key", key)?).with_context(
                || format!("--daemon-key {}: not a PEM private key", key.display()),
            )?;
            builder.with_client_auth_cert(certs, key).context("--daemon-cert and --daemon-key")?
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(url.host.clone())
        .with_context(|| format!("`{}` is not a host name TLS can verify", url.host))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// How long to wait for the daemon to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for the whole answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// The most of an answer read: far above any report or scrape of the daemon's (its largest,
/// `/metrics` with `--group-by`, is bounded to some hundred KiB), so only another server
/// reaches it.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Why an answer could not be had.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// Nothing answers there.
    Unreachable(String),
    /// Something answered, but not with what was asked: a real error.
    Failed(anyhow::Error),
}

/// GETs `path` from the daemon over a connection of its own; the body of a 200 answer.
pub(crate) async fn get(endpoint: &Endpoint, path: &str) -> Result<Bytes, FetchError> {
    Connection::new(endpoint.clone()).get(path).await
}

/// A connection to the daemon kept open between requests, and reopened when the daemon
/// closed it. For repeated reads (`top`), which would otherwise open, and so show among the
/// host's transitions, new connections every second.
pub(crate) struct Connection {
    endpoint: Endpoint,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Connection {
    pub(crate) const fn new(endpoint: Endpoint) -> Self {
        Self { endpoint, sender: None }
    }

    pub(crate) const fn url(&self) -> &DaemonUrl {
        self.endpoint.url()
    }

    /// GETs `path`; the body of a 200 answer. A kept connection the daemon has meanwhile
    /// closed (idle, or evicted for a newcomer) is replaced once.
    pub(crate) async fn get(&mut self, path: &str) -> Result<Bytes, FetchError> {
        let kept = self.sender.take().filter(|sender| !sender.is_closed());
        let reused = kept.is_some();
        let sender = match kept {
            Some(sender) => sender,
            None => connect(&self.endpoint).await?,
        };
        match self.exchange(sender, path).await {
            Err(FetchError::Failed(_)) if reused => {
                let sender = connect(&self.endpoint).await?;
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
        let (url, authorization) = (&self.endpoint.url, &self.endpoint.authorization);
        let exchange = async {
            let mut request = Request::get(path)
                .header(hyper::header::HOST, format!("{}:{}", url.host, url.port));
            if let Some(authorization) = authorization {
                request = request.header(hyper::header::AUTHORIZATION, authorization.clone());
            }
            let request = request.body(Empty::<Bytes>::new())?;
            let response = sender.send_request(request).await.context("sending the request")?;
            let status = response.status();
            let body = read_at_most(response.into_body(), MAX_ANSWER_BYTES)
                .await
                .context("reading the response")?;
            if body.truncated {
                bail!(
                    "{url}{path} answered more than {} MiB: is it tcpstate's daemon? Check \
                     --daemon",
                    MAX_ANSWER_BYTES >> 20
                );
            }
            let body = Bytes::from(body.bytes);
            if status == StatusCode::UNAUTHORIZED {
                bail!(
                    "{url}{path} answered 401: the daemon wants a user and password (its \
                     --web-config has basic_auth_users){}",
                    if url.user.is_some() {
                        ", and these were refused"
                    } else {
                        ": give the user as https://USER@HOST:PORT and the password in \
                         TCPSTATE_DAEMON_PASSWORD"
                    }
                );
            }
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

async fn connect(endpoint: &Endpoint) -> Result<SendRequest<Empty<Bytes>>, FetchError> {
    let url = &endpoint.url;
    let connect = tokio::net::TcpStream::connect((url.host.as_str(), url.port));
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(FetchError::Unreachable(error.to_string())),
        Err(_) => {
            let waited = CONNECT_TIMEOUT.as_secs();
            return Err(FetchError::Unreachable(format!("no answer within {waited} s")));
        }
    };
    let Some((connector, name)) = &endpoint.tls else {
        return handshake(stream).await;
    };
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), stream))
        .await
        .map_err(|_| {
            anyhow::anyhow!("{url}: no TLS handshake within {} s", CONNECT_TIMEOUT.as_secs())
        })
        .and_then(|tls| {
            tls.with_context(|| format!("{url}: TLS handshake (is it served over https?)"))
        })
        .map_err(FetchError::Failed)?;
    handshake(tls).await
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Empty<Bytes>>, FetchError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")
        .map_err(FetchError::Failed)?;
    tokio::spawn(connection);
    Ok(sender)
}
