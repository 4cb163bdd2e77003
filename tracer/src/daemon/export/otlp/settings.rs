//! Where and how to push, read as the OpenTelemetry SDKs read it: `--otlp-endpoint`, then the
//! standard `OTEL_*` variables, each metrics-specific one (`OTEL_EXPORTER_OTLP_METRICS_*`)
//! before the general one. Every value is checked at start; a bad one is a usage error that
//! names the variable.

use std::{path::PathBuf, time::Duration};

use hyper::header::{HeaderName, HeaderValue};

/// The path of the metrics signal under a base endpoint.
const METRICS_PATH: &str = "/v1/metrics";
/// `OTEL_METRIC_EXPORT_INTERVAL`'s default.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// `OTEL_EXPORTER_OTLP_TIMEOUT`'s default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The service name unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` gives one.
const DEFAULT_SERVICE_NAME: &str = "tcpstate";

/// Everything the exporter needs, checked.
#[derive(Debug, Clone)]
pub(crate) struct OtlpSettings {
    /// Where the metrics are posted.
    pub(crate) endpoint: OtlpUrl,
    /// Extra request headers (authentication, tenant).
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// Longest an export may take, connection included.
    pub(crate) timeout: Duration,
    /// How often the metrics are pushed.
    pub(crate) interval: Duration,
    pub(crate) tls: OtlpTls,
    /// The resource's attributes, `service.name` among them.
    pub(crate) resource: Vec<(String, String)>,
}

/// Files that override the host's trust store and present a client certificate.
#[derive(Debug, Clone, Default)]
pub(crate) struct OtlpTls {
    pub(crate) ca: Option<PathBuf>,
    pub(crate) client_cert: Option<PathBuf>,
    pub(crate) client_key: Option<PathBuf>,
}

/// A setting that does not hold: which variable (or flag), and why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SettingError {
    pub(crate) name: String,
    pub(crate) reason: String,
}

impl std::fmt::Display for SettingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

impl OtlpSettings {
    /// The settings, or `None` when no endpoint is given (export off). `flag` is
    /// `--otlp-endpoint`; `var` reads the environment.
    pub(crate) fn read(
        flag: Option<&str>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, SettingError> {
        // A variable set to the empty string counts as unset, as the SDKs read it.
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        // The metrics-specific variable first, then the general one; the name for errors.
        let signal = |suffix: &str| {
            let specific = format!("OTEL_EXPORTER_OTLP_METRICS_{suffix}");
            let general = format!("OTEL_EXPORTER_OTLP_{suffix}");
            var(&specific).map(|v| (specific, v)).or_else(|| var(&general).map(|v| (general, v)))
        };
        let endpoint = match (flag, var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")) {
            (Some(flag), _) => Some(("--otlp-endpoint".to_owned(), base_or_full(flag))),
            // The metrics-specific endpoint is used as it is; the general one is a base.
            (None, Some(full)) => Some(("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT".to_owned(), full)),
            (None, None) => var("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|base| ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), with_metrics_path(&base))),
        };
        let Some((endpoint_name, endpoint)) = endpoint else { return Ok(None) };
        let error = |name: &str, reason: String| SettingError { name: name.to_owned(), reason };
        let endpoint = OtlpUrl::parse(&endpoint).map_err(|r| error(&endpoint_name, r))?;

        if let Some((name, protocol)) = signal("PROTOCOL")
            && protocol != "http/protobuf"
        {
            return Err(error(
                &name,
                format!(
                    "`{protocol}` is not supported: tcpstate exports OTLP over HTTP with \
                     protobuf bodies; set `http/protobuf` (the collector's port 4318) or unset it"
                ),
            ));
        }
        if let Some((name, compression)) = signal("COMPRESSION")
            && compression != "none"
        {
            return Err(error(
                &name,
                format!("`{compression}` is not supported: set `none` or unset it"),
            ));
        }
        if let Some(temporality) = var("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
            && !temporality.eq_ignore_ascii_case("cumulative")
        {
            return Err(error(
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                format!(
                    "`{temporality}` is not supported: tcpstate exports cumulative values \
                     (a failed export then loses nothing); set `cumulative` or unset it"
                ),
            ));
        }
        let headers = match signal("HEADERS") {
            Some((name, headers)) => parse_headers(&headers).map_err(|r| error(&name, r))?,
            None => Vec::new(),
        };
        let timeout = match signal("TIMEOUT") {
            Some((name, ms)) => parse_millis(&ms).map_err(|r| error(&name, r))?,
            None => DEFAULT_TIMEOUT,
        };
        let interval = match var("OTEL_METRIC_EXPORT_INTERVAL") {
            Some(ms) => parse_millis(&ms).map_err(|r| error("OTEL_METRIC_EXPORT_INTERVAL", r))?,
            None => DEFAULT_INTERVAL,
        };
        let file = |suffix: &str| -> Result<Option<PathBuf>, SettingError> {
            let Some((name, path)) = signal(suffix) else { return Ok(None) };
            let path = PathBuf::from(path);
            if !path.is_file() {
                return Err(error(&name, format!("{} is not a readable file", path.display())));
            }
            Ok(Some(path))
        };
        let tls = OtlpTls {
            ca: file("CERTIFICATE")?,
            client_cert: file("CLIENT_CERTIFICATE")?,
            client_key: file("CLIENT_KEY")?,
        };
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            return Err(error(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                "a client certificate and its key (OTEL_EXPORTER_OTLP_CLIENT_KEY) go together: \
                 set both or neither"
                    .to_owned(),
            ));
        }
        if !endpoint.https && (tls.ca.is_some() || tls.client_cert.is_some()) {
            return Err(error(
                &endpoint_name,
                format!("certificates are set for TLS but {endpoint} is http://: use https://"),
            ));
        }
        let resource = resource_attributes(
            var("OTEL_RESOURCE_ATTRIBUTES").as_deref(),
            var("OTEL_SERVICE_NAME"),
            host_name(),
        )
        .map_err(|r| error("OTEL_RESOURCE_ATTRIBUTES", r))?;
        Ok(Some(Self { endpoint, headers, timeout, interval, tls, resource }))
    }
}

/// `--otlp-endpoint` takes a base URL as `OTEL_EXPORTER_OTLP_ENDPOINT` does, and a URL that
/// already names the metrics path as it is.
fn base_or_full(url: &str) -> String {
    if url.trim_end_matches('/').ends_with(METRICS_PATH) {
        url.to_owned()
    } else {
        with_metrics_path(url)
    }
}

fn with_metrics_path(base: &str) -> String {
    format!("{}{METRICS_PATH}", base.trim_end_matches('/'))
}

/// An OTLP/HTTP endpoint: `http(s)://HOST[:PORT][/PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OtlpUrl {
    pub(crate) https: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The path posted to, from the first `/`.
    pub(crate) path: String,
}

impl OtlpUrl {
    fn parse(url: &str) -> Result<Self, String> {
        let expected =
            || format!("`{url}` is not an http:// or https:// URL, e.g. http://127.0.0.1:4318");
        let (https, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            _ => return Err(expected()),
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(format!(
                "`{url}` carries credentials: give them in OTEL_EXPORTER_OTLP_HEADERS \
                 (e.g. Authorization=Basic%20...), which stays out of the process list"
            ));
        }
        let default_port = if https { 443 } else { 80 };
        // `[v6]:port`, `[v6]`, `host:port`, `host`.
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (host, tail) = bracketed.split_once(']').ok_or_else(expected)?;
                match tail.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None if tail.is_empty() => (host, None),
                    None => return Err(expected()),
                }
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() || host.contains(['?', '#', ' ']) {
            return Err(expected());
        }
        let port = match port {
            Some(port) => port.parse().map_err(|_| format!("`{port}` in `{url}` is not a port"))?,
            None => default_port,
        };
        Ok(Self { https, host: host.to_owned(), port, path: path.to_owned() })
    }
}

impl std::fmt::Display for OtlpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// The host's name, as `host.name` reports it (the node's in a pod on the host's network).
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_owned()).filter(|name| !name.is_empty())
}

/// `key=value,key2=value2`, values percent-encoded (the W3C baggage form the specification
/// names): `Authorization=Basic%20dXNlcjpwYXNz`.
fn parse_headers(text: &str) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut headers = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{pair}` is not key=value (pairs are comma-separated)"))?;
        let name = HeaderName::try_from(name.trim())
            .map_err(|_| format!("`{}` is not a valid header name", name.trim()))?;
        let decoded = percent_decode(value.trim())
            .ok_or_else(|| format!("the value of {name} is not valid percent-encoded UTF-8"))?;
        let mut value = HeaderValue::try_from(decoded)
            .map_err(|_| format!("the value of {name} holds characters a header cannot"))?;
        value.set_sensitive(true);
        headers.push((name, value));
    }
    Ok(headers)
}

/// Whole milliseconds, at least 1.
fn parse_millis(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(format!("`{text}` is not a number of milliseconds (a whole number above 0)")),
    }
}

/// `OTEL_RESOURCE_ATTRIBUTES` (`key=value,...`, percent-encoded values), with `service.name`
/// from `OTEL_SERVICE_NAME` over it, and `service.version` and `host.name` unless given.
fn resource_attributes(
    text: Option<&str>,
    service_name: Option<String>,
    host_name: Option<String>,
) -> Result<Vec<(String, String)>, String> {
    let mut attributes: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: String, replace: bool| match attributes
        .iter_mut()
        .find(|(k, _)| k == key)
    {
        Some(existing) if replace => existing.1 = value,
        Some(_) => {}
        None => attributes.push((key.to_owned(), value)),
    };
    for pair in text.unwrap_or_default().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .filter(|(key, _)| !key.trim().is_empty())
            .ok_or_else(|| format!("`{pair}` is not key=value (pairs are comma-separated)"))?;
        let value = percent_decode(value.trim())
            .ok_or_else(|| format!("the value of {key} is not valid percent-encoded UTF-8"))?;
        set(key.trim(), value, true);
    }
    if let Some(name) = service_name {
        set("service.name", name, true);
    }
    set("service.name", DEFAULT_SERVICE_NAME.to_owned(), false);
    set("service.version", env!("CARGO_PKG_VERSION").to_owned(), false);
    if let Some(host) = host_name {
        set("host.name", host, false);
    }
    Ok(attributes)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(
        flag: Option<&str>,
        vars: &[(&str, &str)],
    ) -> Result<Option<OtlpSettings>, SettingError> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        OtlpSettings::read(flag, |name| vars.get(name).cloned())
    }

    #[test]
    fn nothing_given_is_export_off() {
        assert!(read(None, &[("OTEL_SERVICE_NAME", "x")]).unwrap().is_none());
        assert!(read(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).unwrap().is_none());
    }

    #[test]
    fn endpoints_are_read_as_the_sdks_read_them() {
        let path =
            |flag, vars: &[(&str, &str)]| read(flag, vars).unwrap().unwrap().endpoint.to_string();
        assert_eq!(
            path(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]),
            "http://collector:4318/v1/metrics"
        );
        assert_eq!(
            path(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://vm:8428/opentelemetry/")]),
            "http://vm:8428/opentelemetry/v1/metrics"
        );
        // The metrics-specific variable is used as it is, and wins over the general one.
        assert_eq!(
            path(
                None,
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
                    ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "https://b/otlp/metrics")
                ]
            ),
            "https://b:443/otlp/metrics"
        );
        // The flag wins; a full URL in it stays as it is.
        assert_eq!(
            path(
                Some("http://127.0.0.1:4318/v1/metrics"),
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318")]
            ),
            "http://127.0.0.1:4318/v1/metrics"
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        let name = |flag, vars: &[(&str, &str)]| read(flag, vars).unwrap_err().name;
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        assert_eq!(name(Some("collector:4318"), &[]), "--otlp-endpoint");
        assert_eq!(
            name(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")]),
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        );
        assert_eq!(
            name(None, &[base, ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization")]),
            "OTEL_EXPORTER_OTLP_HEADERS"
        );
        assert_eq!(
            name(None, &[base, ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "bad name=1")]),
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS"
        );
        assert_eq!(
            name(None, &[base, ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")]),
            "OTEL_EXPORTER_OTLP_TIMEOUT"
        );
        assert_eq!(
            name(None, &[base, ("OTEL_METRIC_EXPORT_INTERVAL", "0")]),
            "OTEL_METRIC_EXPORT_INTERVAL"
        );
        assert_eq!(
            name(None, &[base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            "OTEL_EXPORTER_OTLP_PROTOCOL"
        );
        assert_eq!(
            name(None, &[base, ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent.pem")]),
            "OTEL_EXPORTER_OTLP_CERTIFICATE"
        );
        assert_eq!(
            name(None, &[base, ("OTEL_RESOURCE_ATTRIBUTES", "a=%zz")]),
            "OTEL_RESOURCE_ATTRIBUTES"
        );
        assert_eq!(name(Some("http://u:p@collector:4318"), &[]), "--otlp-endpoint");
    }

    #[test]
    fn headers_are_percent_decoded() {
        let settings = read(
            Some("http://127.0.0.1:4318"),
            &[("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Basic%20dTpw, X-Scope-OrgID=team-a")],
        )
        .unwrap()
        .unwrap();
        let headers: Vec<_> =
            settings.headers.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(headers, [("authorization", "Basic dTpw"), ("x-scope-orgid", "team-a")]);
    }

    #[test]
    fn the_resource_names_the_service_and_the_host() {
        let attributes = resource_attributes(
            Some("k8s.node.name=node-1,service.name=edge"),
            None,
            Some("host-a".to_owned()),
        )
        .unwrap();
        let get = |key: &str| attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("service.name"), Some("edge"));
        assert_eq!(get("k8s.node.name"), Some("node-1"));
        assert_eq!(get("host.name"), Some("host-a"));
        assert_eq!(get("service.version"), Some(env!("CARGO_PKG_VERSION")));
        let named =
            resource_attributes(Some("service.name=edge"), Some("svc".to_owned()), None).unwrap();
        assert_eq!(named[0], ("service.name".to_owned(), "svc".to_owned()));
    }
}
