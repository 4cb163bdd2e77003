//! What a process's command line may show. Leak reports get pasted into tickets and logs ship
//! to shared systems, while programs still take passwords as arguments: by default, values
//! whose name looks secret, and passwords in URLs, are masked.

/// How much of a command line reports and logs show (`--cmdline`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CmdlinePolicy {
    /// Every argument as the process has it.
    Full,
    /// Secret-looking values masked as `***`.
    #[default]
    Redacted,
    /// No command line at all.
    Off,
}

const MASK: &str = "***";

/// Parts of a name that mark its value as secret (`--db-password`, `API_TOKEN=`, `--keyfile`).
const SECRET_WORDS: [&str; 7] =
    ["password", "passwd", "secret", "token", "key", "credential", "auth"];

impl CmdlinePolicy {
    /// The command line to show, `None` when it is off.
    pub(crate) fn render(self, args: &[String]) -> Option<String> {
        match self {
            Self::Full => Some(args.join(" ")),
            Self::Redacted => Some(redact(&words(args)).join(" ")),
            Self::Off => None,
        }
    }
}

/// The command line's words: each argument split at whitespace too. A process that renamed
/// itself (`exec -a "app --password x"`, `setproctitle`) or a `sh -c "..."` wrapper carries
/// a whole command line in one argument, and its secrets with it.
fn words(args: &[String]) -> Vec<String> {
    args.iter().flat_map(|arg| arg.split_whitespace()).map(str::to_owned).collect()
}

fn looks_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|word| name.contains(word))
}

/// Masks `NAME=value` and `--NAME value` where NAME looks secret, and the password of every
/// `scheme://user:password@host` anywhere in an argument.
fn redact(args: &[String]) -> Vec<String> {
    let mut shown = Vec::with_capacity(args.len());
    let mut value_follows = false;
    for arg in args {
        if std::mem::take(&mut value_follows) && !arg.starts_with('-') {
            shown.push(MASK.to_owned());
            continue;
        }
        match arg.split_once('=') {
            Some((name, _)) if looks_secret(name) => shown.push(format!("{name}={MASK}")),
            Some(_) => shown.push(mask_url_passwords(arg)),
            None => {
                value_follows = arg.starts_with('-') && looks_secret(arg);
                shown.push(mask_url_passwords(arg));
            }
        }
    }
    shown
}

/// `postgres://app:hunter2@db/x` becomes `postgres://app:***@db/x`.
fn mask_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        out.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];
        let authority_end = rest.find(['/', '?', '#', ' ']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@').and_then(|at| authority[..at].find(':').map(|colon| (colon, at)))
        {
            Some((colon, at)) => {
                out.push_str(&authority[..=colon]);
                out.push_str(MASK);
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &rest[authority_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(line: &str, policy: CmdlinePolicy) -> Option<String> {
        let args: Vec<String> = line.split(' ').map(str::to_owned).collect();
        policy.render(&args)
    }

    #[test]
    fn secrets_are_masked_and_the_rest_kept() {
        let line = "java -Xmx2g --db-password=hunter2 --api-token sk_live_SECRET123 \
                    --url=postgres://app:pw@db:5432/x AWS_SECRET_ACCESS_KEY=abc --port 8080 \
                    --keyfile /etc/k.pem -v";
        assert_eq!(
            shown(line, CmdlinePolicy::Redacted).unwrap(),
            "java -Xmx2g --db-password=*** --api-token *** --url=postgres://app:***@db:5432/x \
             AWS_SECRET_ACCESS_KEY=*** --port 8080 --keyfile *** -v"
        );
        assert_eq!(shown(line, CmdlinePolicy::Full).unwrap(), line);
        assert_eq!(shown(line, CmdlinePolicy::Off), None);
    }

    /// A whole command line in one argument, as `exec -a` titles, programs that rename
    /// themselves and `sh -c` wrappers have it: its secrets are masked word by word.
    #[test]
    fn secrets_inside_one_argument_are_masked() {
        let args = vec![
            "myapp --password s3cr3tpw --token tok999".to_owned(),
            "-c".to_owned(),
            "psql postgres://u:pw@db/x && run\tAPI_KEY=k1 --db-password=p1".to_owned(),
        ];
        let shown = CmdlinePolicy::Redacted.render(&args).unwrap();
        for secret in ["s3cr3tpw", "tok999", ":pw@", "k1", "p1"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert_eq!(
            shown,
            "myapp --password *** --token *** -c psql postgres://u:***@db/x && run API_KEY=*** \
             --db-password=***"
        );
    }

    #[test]
    fn a_secret_flag_without_a_value_masks_nothing_after_it() {
        assert_eq!(
            shown("tool --no-auth --verbose", CmdlinePolicy::Redacted).unwrap(),
            "tool --no-auth --verbose"
        );
        assert_eq!(
            shown("curl https://user@host/ http://h/a:b@c", CmdlinePolicy::Redacted).unwrap(),
            "curl https://user@host/ http://h/a:b@c",
            "no password, or an @ outside the authority"
        );
    }
}
