//! Debian's archives as apt sees them on this host, and private apt configurations that fetch
//! packages of other suites or architectures (stock kernels, newer test tools) without
//! touching the system's sources.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::arch::Arch;

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Where the host's apt finds Debian's main archive and its security archive.
pub struct Archives {
    pub main: String,
    security: Option<String>,
}

/// Finds the archives in the host's apt sources (one-line `.list` and deb822 `.sources`):
/// the kernels come from the same mirror the host already uses.
pub fn host_archives() -> anyhow::Result<Archives> {
    let mut entries: Vec<(String, String)> = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else { continue };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(deb822_entries(&text)),
            Some("list") | None => entries.extend(one_line_entries(&text)),
            _ => {}
        }
    }
    let debian = |security: bool| {
        entries
            .iter()
            .find(|(uri, suite)| {
                uri.contains("debian")
                    && suite.ends_with("-security") == security
                    && !suite.contains("backports")
            })
            .map(|(uri, _)| uri.clone())
    };
    let main = debian(false).context(
        "the host's apt sources name no Debian archive: the kernel matrix downloads Debian's \
         stock kernels through it (add a Debian mirror to /etc/apt/sources.list)",
    )?;
    Ok(Archives { main, security: debian(true) })
}

fn one_line_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "deb" {
                return None;
            }
            let mut uri = words.next()?;
            if uri.starts_with('[') {
                // Options, up to the closing bracket.
                while !uri.ends_with(']') {
                    uri = words.next()?;
                }
                uri = words.next()?;
            }
            Some((uri.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

fn deb822_entries(text: &str) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|line| line.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        if field("Types:").is_some_and(|t| !t.split_whitespace().any(|t| t == "deb"))
            || field("Enabled:").is_some_and(|e| e == "no")
        {
            continue;
        }
        let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else { continue };
        for uri in uris.split_whitespace() {
            for suite in suites.split_whitespace() {
                entries.push((uri.to_owned(), suite.to_owned()));
            }
        }
    }
    entries
}

/// A private apt configuration for some suites and one architecture: the system's sources
/// and state stay as they are.
pub struct PrivateApt {
    pub dir: PathBuf,
    arch: Arch,
}

impl PrivateApt {
    /// Keeps its lists and downloads in `dir`.
    pub fn new(
        dir: PathBuf,
        arch: Arch,
        suites: &[&str],
        archives: &Archives,
    ) -> anyhow::Result<Self> {
        let debian_arch = arch.debian();
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("archives/partial"))?;
        let mut list = String::new();
        for suite in suites {
            let uri = if suite.ends_with("-security") {
                let Some(security) = &archives.security else {
                    eprintln!(
                        "xtask: no Debian security archive in the host's apt sources; {suite} left out"
                    );
                    continue;
                };
                security
            } else {
                &archives.main
            };
            list.push_str(&format!(
                "deb [arch={debian_arch} signed-by={KEYRING}] {uri} {suite} main\n"
            ));
        }
        fs::write(dir.join("sources.list"), list)?;
        Ok(Self { dir, arch })
    }

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let option = |name: &str, value: &Path| format!("{name}={}", value.display());
        let arch = self.arch.debian();
        command
            .arg("-o")
            .arg(option("Dir::Etc::SourceList", &self.dir.join("sources.list")))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null", "-o"])
            .arg(option("Dir::State::Lists", &self.dir.join("lists")))
            .arg("-o")
            .arg(option("Dir::Cache::Archives", &self.dir.join("archives")))
            .args(["-o", &format!("APT::Architecture={arch}")])
            .args(["-o", &format!("APT::Architectures={arch}")])
            // Files are written by root into the project's tree, not by apt's sandbox user.
            .args(["-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-q"]);
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_source_formats() {
        let list = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main\n\
                    deb-src http://m/debian bookworm main\ndeb http://m/debian-security bookworm-security main\n";
        assert_eq!(
            one_line_entries(list),
            [
                ("http://m/debian".to_owned(), "bookworm".to_owned()),
                ("http://m/debian-security".to_owned(), "bookworm-security".to_owned())
            ]
        );
        let sources = "Types: deb\nURIs: http://m/debian\nSuites: bookworm bookworm-updates\n\
                       Components: main\n\nTypes: deb-src\nURIs: http://x/debian\nSuites: sid\n";
        assert_eq!(deb822_entries(sources).len(), 2);
        assert_eq!(deb822_entries(sources)[1].1, "bookworm-updates");
    }
}
