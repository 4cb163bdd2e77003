//! `--web-config FILE`: TLS and basic authentication for the HTTP endpoint, in the
//! exporter-toolkit format node_exporter and the other Prometheus exporters read, so
//! operators reuse the files they already have. Read and checked whole at startup (bad files
//! are usage errors naming the key); relative paths are relative to the file, as there.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt
//!   key_file: server.key
//!   client_ca_file: ca.crt                       # optional
//!   client_auth_type: RequireAndVerifyClientCert # NoClientCert (default), VerifyClientCertIfGiven
//! basic_auth_users:
//!   prometheus: $2y$10$...                       # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':')
//! ```

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: ClientAuth,
}

/// The exporter-toolkit names; the two that accept any certificate unverified are left out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
enum ClientAuth {
    #[default]
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

/// What the endpoint enforces.
#[derive(Clone)]
pub(crate) struct WebConfig {
    pub path: PathBuf,
    pub tls: Option<Arc<ServerConfig>>,
    pub users: Option<Arc<BasicAuth>>,
}

impl fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebConfig")
            .field("path", &self.path)
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.as_ref().map(|u| u.hashes.len()))
            .finish()
    }
}

impl WebConfig {
    /// Reads and checks the file: every certificate and key loads, every hash is bcrypt.
    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("reading {}: {error}", path.display()))?;
        let file: File = serde_norway::from_str(&text)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = file.tls_server_config.map(|tls| tls_config(base, &tls)).transpose()?;
        for (user, hash) in &file.basic_auth_users {
            if bcrypt::verify("", hash).is_err() {
                return Err(format!(
                    "basic_auth_users.{user} is not a bcrypt hash (make one with `htpasswd -nBC 10 \
                     \"\" | tr -d ':'`)"
                ));
            }
        }
        let users = (!file.basic_auth_users.is_empty()).then(|| {
            Arc::new(BasicAuth { hashes: file.basic_auth_users, verified: Mutex::default() })
        });
        Ok(Self { path: path.to_owned(), tls, users })
    }
}

/// clap's parser for `--web-config`.
pub(crate) fn parse(value: &str) -> Result<WebConfig, String> {
    WebConfig::load(Path::new(value))
}

fn read_pem(base: &Path, key: &str, path: &Path) -> Result<(PathBuf, Vec<u8>), String> {
    let path = base.join(path);
    let bytes = std::fs::read(&path)
        .map_err(|error| format!("tls_server_config.{key} {}: {error}", path.display()))?;
    Ok((path, bytes))
}

fn tls_config(base: &Path, tls: &TlsFile) -> Result<Arc<ServerConfig>, String> {
    let (cert_path, pem) = read_pem(base, "cert_file", &tls.cert_file)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|error| format!("tls_server_config.cert_file {}: {error}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!("tls_server_config.cert_file {}: no certificate", cert_path.display()));
    }
    let (key_path, pem) = read_pem(base, "key_file", &tls.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|error| format!("tls_server_config.key_file {}: {error}", key_path.display()))?;
    let builder = ServerConfig::builder();
    let builder = match (tls.client_auth_type, &tls.client_ca_file) {
        (ClientAuth::NoClientCert, _) => builder.with_no_client_auth(),
        (_, None) => {
            return Err(format!(
                "tls_server_config.client_auth_type {:?} needs client_ca_file",
                tls.client_auth_type
            ));
        }
        (auth, Some(ca_file)) => {
            let (ca_path, pem) = read_pem(base, "client_ca_file", ca_file)?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| format!("client_ca_file {}: {e}", ca_path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("client_ca_file {}: {e}", ca_path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier = if auth == ClientAuth::VerifyClientCertIfGiven {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("client_ca_file {}: {e}", ca_path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|error| {
        format!("tls_server_config: {} and {}: {error}", cert_path.display(), key_path.display())
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Users and their bcrypt hashes. A bcrypt check costs tens of milliseconds by design, so
/// the credentials that passed are remembered (a scraper sends the same every time).
pub(crate) struct BasicAuth {
    hashes: HashMap<String, String>,
    verified: Mutex<Vec<String>>,
}

impl BasicAuth {
    /// Most remembered credentials; beyond, the oldest is forgotten.
    const REMEMBERED: usize = 16;

    /// Whether an `Authorization` header value names a user with the right password.
    pub(crate) fn allows(&self, authorization: Option<&str>) -> bool {
        use base64::Engine as _;
        let Some(encoded) = authorization.and_then(|value| value.strip_prefix("Basic ")) else {
            return false;
        };
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.iter().any(|known| known == encoded) {
            return true;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(text) = String::from_utf8(decoded) else { return false };
        let Some((user, password)) = text.split_once(':') else { return false };
        let ok = self
            .hashes
            .get(user)
            .is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false));
        if ok {
            if verified.len() >= Self::REMEMBERED {
                verified.remove(0);
            }
            verified.push(encoded.to_owned());
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tcpstate-webconfig-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn basic_auth_checks_the_password_and_remembers_what_passed() {
        use base64::Engine as _;
        let dir = scratch("auth");
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let path = write(&dir, "web.yml", &format!("basic_auth_users:\n  prom: '{hash}'\n"));
        let config = WebConfig::load(&path).unwrap();
        assert!(config.tls.is_none());
        let users = config.users.unwrap();
        let header = |creds: &str| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds))
        };
        assert!(users.allows(Some(&header("prom:s3cret"))));
        assert!(users.allows(Some(&header("prom:s3cret"))), "remembered");
        assert!(!users.allows(Some(&header("prom:wrong"))));
        assert!(!users.allows(Some(&header("other:s3cret"))));
        assert!(!users.allows(None));
        assert!(!users.allows(Some("Bearer x")));
    }

    #[test]
    fn bad_files_are_refused_naming_the_key() {
        let dir = scratch("bad");
        let unknown = write(
            &dir,
            "unknown.yml",
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_versionx: TLS13\n",
        );
        assert!(WebConfig::load(&unknown).unwrap_err().contains("min_versionx"));
        let not_bcrypt = write(&dir, "hash.yml", "basic_auth_users:\n  prom: plaintext\n");
        assert!(WebConfig::load(&not_bcrypt).unwrap_err().contains("basic_auth_users.prom"));
        let missing = write(
            &dir,
            "missing.yml",
            "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
        );
        let error = WebConfig::load(&missing).unwrap_err();
        assert!(error.contains("cert_file") && error.contains("nope.crt"), "{error}");
        assert!(WebConfig::load(&dir.join("absent.yml")).unwrap_err().contains("absent.yml"));
    }
}
