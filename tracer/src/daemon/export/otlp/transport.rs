//! Posting an export: HTTP/1.1 over one kept connection (TLS when the endpoint is https),
//! reopened when the receiver closed it. A connection per export would show among the
//! host's own transitions at every interval.

use std::{sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, StatusCode,
    body::Bytes,
    client::conn::http1::SendRequest,
    header::{CONTENT_TYPE, HOST, HeaderValue},
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio_rustls::TlsConnector;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::Message as _;

use super::settings::{OtlpSettings, OtlpUrl};
use crate::bounded_body::{BoundedBody, read_at_most};

/// What a receiver's success answer said, as the OTLP specification has it: an
/// `ExportMetricsServiceResponse` whose `partial_success` counts the data points it rejected.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Landed {
    /// Data points the receiver said it rejected, and why.
    pub rejected_points: u64,
    pub rejection: Option<String>,
    /// An answer that was not one: longer than `MAX_ANSWER_BYTES`, or not the message.
    pub unreadable: Option<Unreadable>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unreadable {
    Oversized,
    Malformed,
}

impl Unreadable {
    pub(super) const REASONS: [&'static str; 2] = ["oversized", "malformed"];

    pub(super) const fn name(self) -> &'static str {
        Self::REASONS[self as usize]
    }
}

impl Landed {
    fn read(answer: &BoundedBody) -> Self {
        if answer.truncated {
            return Self { unreadable: Some(Unreadable::Oversized), ..Self::default() };
        }
        match ExportMetricsServiceResponse::decode(answer.bytes.as_slice()) {
            Ok(response) => {
                let partial = response.partial_success.unwrap_or_default();
                Self {
                    rejected_points: u64::try_from(partial.rejected_data_points).unwrap_or(0),
                    rejection: Some(partial.error_message).filter(|m| !m.is_empty()),
                    unreadable: None,
                }
            }
            Err(_) => Self { unreadable: Some(Unreadable::Malformed), ..Self::default() },
        }
    }
}

/// The most of an answer kept: enough for any error message or partial success; the rest of
/// a longer one is not read.
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// Why an export did not land; `reason()` is the failure counter's label.
#[derive(Debug)]
pub(super) enum ExportError {
    /// No connection: refused, no route, the name did not resolve.
    Unreachable(String),
    /// The TLS handshake failed (certificate not trusted, wrong name).
    Tls(String),
    /// No answer within `OTEL_EXPORTER_OTLP_TIMEOUT`.
    Timeout(Duration),
    /// 401 or 403: the headers' credentials were refused.
    Unauthorized(StatusCode, String),
    /// 429: the receiver asks to slow down.
    Throttled(String),
    /// Another 4xx: the receiver refused the request itself.
    Rejected(StatusCode, String),
    /// 5xx, or the connection broke during the exchange.
    ServerError(String),
}

impl ExportError {
    pub(super) const REASONS: [&'static str; 7] =
        ["unreachable", "tls", "timeout", "unauthorized", "throttled", "rejected", "server_error"];

    pub(super) const fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::Tls(_) => "tls",
            Self::Timeout(_) => "timeout",
            Self::Unauthorized(..) => "unauthorized",
            Self::Throttled(_) => "throttled",
            Self::Rejected(..) => "rejected",
            Self::ServerError(_) => "server_error",
        }
    }
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(why) => write!(f, "cannot connect: {why}"),
            Self::Tls(why) => write!(f, "TLS handshake failed: {why}"),
            Self::Timeout(after) => {
                write!(f, "no answer within {} ms (OTEL_EXPORTER_OTLP_TIMEOUT)", after.as_millis())
            }
            Self::Unauthorized(status, body) => write!(
                f,
                "answered {status}: the credentials in OTEL_EXPORTER_OTLP_HEADERS were refused{}",
                detail(body)
            ),
            Self::Throttled(body) => write!(f, "answered 429 Too Many Requests{}", detail(body)),
            Self::Rejected(status, body) => write!(f, "answered {status}{}", detail(body)),
            Self::ServerError(why) => write!(f, "{why}"),
        }
    }
}

fn detail(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() { String::new() } else { format!(": {}", truncate(body, 200)) }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// The receiver, and the connection kept to it.
pub(super) struct Transport {
    url: OtlpUrl,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    headers: Vec<(hyper::header::HeaderName, HeaderValue)>,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Transport {
    /// Reads the trust store and certificate files once; an error names the variable.
    pub(super) fn new(settings: &OtlpSettings) -> anyhow::Result<Self> {
        let tls = settings.endpoint.https.then(|| tls_connector(settings)).transpose()?;
        Ok(Self {
            url: settings.endpoint.clone(),
            tls,
            headers: settings.headers.clone(),
            timeout: settings.timeout,
            sender: None,
        })
    }

    pub(super) const fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Posts one encoded request; connection, TLS and answer all within the timeout.
    pub(super) async fn post(&mut self, body: Bytes) -> Result<Landed, ExportError> {
        match tokio::time::timeout(self.timeout, self.exchange(body)).await {
            Ok(result) => result,
            Err(_) => {
                // Whatever the connection was doing, it is not reused.
                self.sender = None;
                Err(ExportError::Timeout(self.timeout))
            }
        }
    }

    async fn exchange(&mut self, body: Bytes) -> Result<Landed, ExportError> {
        let kept = self.sender.take().filter(|sender| !sender.is_closed());
        let reused = kept.is_some();
        let mut sender = match kept {
            Some(sender) => sender,
            None => self.connect().await?,
        };
        let response = match sender.send_request(self.request(body.clone())).await {
            Ok(response) => response,
            // The receiver closed the kept connection just as it was used: once more, fresh.
            Err(_) if reused => {
                sender = self.connect().await?;
                sender
                    .send_request(self.request(body))
                    .await
                    .map_err(|e| ExportError::ServerError(format!("sending: {e}")))?
            }
            Err(error) => return Err(ExportError::ServerError(format!("sending: {error}"))),
        };
        let status = response.status();
        let answer = read_at_most(response.into_body(), MAX_ANSWER_BYTES)
            .await
            .map_err(|e| ExportError::ServerError(format!("reading the answer: {e}")))?;
        // The rest of an oversized answer is left unread: the connection goes with it.
        if !answer.truncated {
            self.sender = Some(sender);
        }
        if status.is_success() {
            return Ok(Landed::read(&answer));
        }
        let text = String::from_utf8_lossy(&answer.bytes).into_owned();
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                ExportError::Unauthorized(status, text)
            }
            StatusCode::TOO_MANY_REQUESTS => ExportError::Throttled(text),
            status if status.is_client_error() => ExportError::Rejected(status, text),
            status => ExportError::ServerError(format!("answered {status}{}", detail(&text))),
        })
    }

    fn request(&self, body: Bytes) -> Request<Full<Bytes>> {
        let host = if self.url.host.contains(':') {
            format!("[{}]:{}", self.url.host, self.url.port)
        } else {
            format!("{}:{}", self.url.host, self.url.port)
        };
        let mut request = Request::post(self.url.path.as_str())
            .header(HOST, host)
            .header(CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))
            .expect("the path and headers were checked at start");
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        request
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ExportError> {
        let address = (self.url.host.as_str(), self.url.port);
        let tcp = tokio::net::TcpStream::connect(address).await.map_err(|e| {
            ExportError::Unreachable(format!("{}:{}: {e}", self.url.host, self.url.port))
        })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| ExportError::Tls(e.to_string()))?;
                handshake(TokioIo::new(stream)).await
            }
            None => handshake(TokioIo::new(tcp)).await,
        }
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, ExportError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ExportError::ServerError(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            log::debug!("OTLP connection closed: {error}");
        }
    });
    Ok(sender)
}

/// The host's trust store, or only `OTEL_EXPORTER_OTLP_CERTIFICATE` when given; the client
/// certificate when given.
fn tls_connector(settings: &OtlpSettings) -> anyhow::Result<(TlsConnector, ServerName<'static>)> {
    use anyhow::Context as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &settings.tls.ca {
        Some(ca) => {
            let pem = std::fs::read(ca).with_context(|| {
                format!("OTEL_EXPORTER_OTLP_CERTIFICATE: reading {}", ca.display())
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.with_context(|| {
                    format!("OTEL_EXPORTER_OTLP_CERTIFICATE: {} is not PEM", ca.display())
                })?;
                roots
                    .add(cert)
                    .with_context(|| format!("OTEL_EXPORTER_OTLP_CERTIFICATE {}", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "no trusted certificate to verify {} with: set OTEL_EXPORTER_OTLP_CERTIFICATE to the \
         receiver's CA (PEM)",
        settings.endpoint
    );
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match (&settings.tls.client_cert, &settings.tls.client_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .with_context(|| {
                    format!("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE: {} is not PEM", cert.display())
                })?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
                format!("OTEL_EXPORTER_OTLP_CLIENT_KEY: {} is not a PEM private key", key.display())
            })?;
            builder.with_client_auth_cert(certs, key).context(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY",
            )?
        }
        _ => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(settings.endpoint.host.clone()).with_context(|| {
        format!("`{}` is not a host name TLS can verify", settings.endpoint.host)
    })?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsPartialSuccess;

    use super::*;

    fn answer(bytes: Vec<u8>, truncated: bool) -> BoundedBody {
        BoundedBody { bytes, truncated }
    }

    #[test]
    fn a_success_answer_is_read_as_the_specification_says() {
        let partial = ExportMetricsServiceResponse {
            partial_success: Some(ExportMetricsPartialSuccess {
                rejected_data_points: 3,
                error_message: "bad points".to_owned(),
            }),
        };
        let landed = Landed::read(&answer(partial.encode_to_vec(), false));
        assert_eq!(landed.rejected_points, 3);
        assert_eq!(landed.rejection.as_deref(), Some("bad points"));
        assert_eq!(landed.unreadable, None);
        // An empty body is the empty message: everything accepted.
        assert_eq!(Landed::read(&answer(Vec::new(), false)), Landed::default());
    }

    #[test]
    fn an_answer_that_is_not_one_is_told_apart() {
        let oversized = Landed::read(&answer(vec![0; 10], true));
        assert_eq!(oversized.unreadable, Some(Unreadable::Oversized));
        let malformed = Landed::read(&answer(b"<html>OK</html>".to_vec(), false));
        assert_eq!(malformed.unreadable, Some(Unreadable::Malformed));
    }
}
