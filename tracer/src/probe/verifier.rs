//! Why the kernel refused a program, in one line a person can act on.

use aya::programs::ProgramError;

/// Why the kernel refused a program, in a line: the verifier's verdict, not its whole log
/// (thousands of lines, whose first lines are notes, not the reason). The log goes to the
/// debug log.
pub(super) fn refusal(program: &str, error: &ProgramError) -> String {
    match error {
        ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            log::debug!("verifier log of program `{program}`:\n{log}");
            if io_error.raw_os_error() == Some(libc::EPERM) {
                // Refused before verification: not a bug to report, a policy to know about.
                return format!(
                    "{io_error}: a security policy (kernel lockdown, an LSM) or missing \
                     CAP_BPF/CAP_PERFMON forbids it"
                );
            }
            match verifier_verdict(&log) {
                Some(verdict) => format!("{io_error}; the verifier says: {verdict}"),
                None => io_error.to_string(),
            }
        }
        other => crate::error_chain::one_line(other),
    }
}

/// The last line of a verifier log that is not statistics: where the verifier gave up.
fn verifier_verdict(log: &str) -> Option<&str> {
    const STATISTICS: [&str; 4] = ["verification time", "stack depth", "processed ", "max_states"];
    log.lines()
        .map(str::trim)
        .rev()
        .find(|line| !line.is_empty() && !STATISTICS.iter().any(|s| line.starts_with(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_the_last_line_before_the_statistics() {
        let log = "arg#0 type is not a struct\nUnrecognized arg#0 type PTR\n0: (bf) r6 = r1\n\
                   Unreleased reference id=15 alloc_insn=767\nverification time 97610 usec\n\
                   stack depth 344+0\nprocessed 2032 insns (limit 1000000) max_states_per_insn 2\n";
        assert_eq!(verifier_verdict(log), Some("Unreleased reference id=15 alloc_insn=767"));
        assert_eq!(verifier_verdict("\n"), None);
    }
}
