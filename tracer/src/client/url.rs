//! Where the daemon answers and how to reach it: its URL (credentials included) and the TLS
//! options of a client.

use std::{fmt, path::PathBuf, str::FromStr};

/// A daemon's address: `http://HOST:PORT`, `https://HOST:PORT`, or just `HOST:PORT`; with
/// `USER@` (or `USER:PASSWORD@`) before the host when the daemon wants basic auth.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct DaemonUrl {
    pub host: String,
    pub port: u16,
    pub https: bool,
    pub user: Option<String>,
    /// From the URL; `TCPSTATE_DAEMON_PASSWORD` otherwise (kept out of `ps`).
    pub password: Option<String>,
}

impl DaemonUrl {
    /// Plain HTTP to a port on this host's loopback.
    pub(crate) fn loopback(port: u16) -> Self {
        Self { host: "127.0.0.1".to_owned(), port, https: false, user: None, password: None }
    }
}

impl FromStr for DaemonUrl {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        const EXPECTED: &str =
            "expected http://HOST:PORT or https://HOST:PORT, e.g. http://127.0.0.1:9977";
        let (https, rest) = match value.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            Some((scheme, _)) => return Err(format!("`{scheme}://` is not http:// or https://")),
            None => (false, value),
        };
        let rest = rest.trim_end_matches('/');
        // A password may hold an `@`; a host never does.
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((credentials, address)) => (Some(credentials), address),
            None => (None, rest),
        };
        let (user, password) = match credentials.map(|c| c.split_once(':').unwrap_or((c, ""))) {
            Some(("", _)) => return Err("an empty user name before `@`".to_owned()),
            Some((user, "")) => (Some(user.to_owned()), None),
            Some((user, password)) => (Some(user.to_owned()), Some(password.to_owned())),
            None => (None, None),
        };
        let (host, port) = address.rsplit_once(':').ok_or_else(|| EXPECTED.to_owned())?;
        let port = port.parse().map_err(|_| format!("`{port}` is not a port number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(EXPECTED.to_owned());
        }
        Ok(Self { host: host.to_owned(), port, https, user, password })
    }
}

/// Never shows the password.
impl fmt::Display for DaemonUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        let user = self.user.as_ref().map_or_else(String::new, |user| format!("{user}@"));
        if self.host.contains(':') {
            write!(f, "{scheme}://{user}[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{user}{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for DaemonUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DaemonUrl({self})")
    }
}

/// How to reach a daemon served over TLS (its `--web-config` has `tls_server_config`).
#[derive(Clone, Debug, Default)]
pub(crate) struct DaemonTls {
    /// The CA certificate (PEM) that signed the daemon's certificate: the only one trusted.
    pub ca: Option<PathBuf>,
    /// This client's certificate and its key (PEM), for a daemon that verifies clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl DaemonTls {
    /// Whether these options fit `url`: https needs a CA, plain HTTP takes none. The message
    /// names the flags, as a usage error.
    pub(crate) fn check(&self, url: &DaemonUrl) -> Result<(), String> {
        match (url.https, &self.ca) {
            (true, None) => Err(format!(
                "{url} needs --daemon-ca FILE: the CA certificate that signed the daemon's \
                 certificate (the client_ca_file or issuer of its tls_server_config)"
            )),
            (false, _) if self.is_given() => Err(format!(
                "--daemon-ca, --daemon-cert and --daemon-key are for an https:// daemon; {url} \
                 is plain HTTP"
            )),
            _ => Ok(()),
        }
    }

    /// Whether any option is set.
    pub(crate) const fn is_given(&self) -> bool {
        self.ca.is_some() || self.client_cert.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_urls_parse() {
        let url: DaemonUrl = "http://127.0.0.1:9977".parse().unwrap();
        assert_eq!(url, DaemonUrl::loopback(9977));
        assert_eq!("localhost:80/".parse::<DaemonUrl>().unwrap().port, 80);
        let v6: DaemonUrl = "http://[::1]:9977".parse().unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "http://[::1]:9977");
        let secure: DaemonUrl = "https://prom:p@ss:w@rd@example.org:9977/".parse().unwrap();
        assert!(secure.https);
        assert_eq!(
            (secure.user.as_deref(), secure.password.as_deref()),
            (Some("prom"), Some("p@ss:w@rd"))
        );
        assert_eq!(secure.host, "example.org");
        assert_eq!(secure.to_string(), "https://prom@example.org:9977", "no password shown");
        assert!(!format!("{secure:?}").contains("p@ss"));
        let user_only: DaemonUrl = "https://prom@[::1]:1".parse().unwrap();
        assert_eq!((user_only.user.as_deref(), user_only.password), (Some("prom"), None));
        assert!("ftp://x:1".parse::<DaemonUrl>().is_err());
        assert!("http://@x:1".parse::<DaemonUrl>().is_err());
        assert!("http://x".parse::<DaemonUrl>().is_err());
        assert!("http://x:99999".parse::<DaemonUrl>().is_err());
    }
}
