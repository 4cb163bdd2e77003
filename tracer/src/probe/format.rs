//! Checks the tracepoint's `format` file against the offsets the kernel program reads.
//!
//! The program reads `sock:inet_sock_set_state`'s record at fixed offsets (see
//! `tracer_common::tracepoint`). A kernel that lays the record out differently would make it
//! read garbage, so the loader refuses to attach unless every field matches.

use std::fmt;

use tracer_common::tracepoint::{self, Field};

/// A field of the program's layout that the kernel's `format` file disagrees with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatMismatch {
    Missing { field: &'static str },
    Moved { field: &'static str, expected: Field, offset: usize, size: usize },
}

impl FormatMismatch {
    /// The mismatch, for tracepoint `tracepoint` (`category:name`).
    fn describe(&self, tracepoint: &str) -> String {
        match self {
            Self::Missing { field } => {
                format!("field `{field}` is missing from {tracepoint}'s format")
            }
            Self::Moved { field, expected, offset, size } => format!(
                "field `{field}` is at offset {offset} (size {size}) in {tracepoint}'s format, \
                 but tcpstate reads it at offset {} (size {})",
                expected.offset, expected.size
            ),
        }
    }
}

impl fmt::Display for FormatMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(&format!("{}:{}", tracepoint::CATEGORY, tracepoint::NAME)))
    }
}

/// One `field:` line of a format file: name, offset, size.
fn parse_field_line(line: &str) -> Option<(&str, usize, usize)> {
    let mut declaration = None;
    let mut offset = None;
    let mut size = None;
    for part in line.trim().split(';') {
        let part = part.trim();
        if let Some(rest) = part.strip_prefix("field:") {
            declaration = Some(rest);
        } else if let Some(rest) = part.strip_prefix("offset:") {
            offset = rest.parse().ok();
        } else if let Some(rest) = part.strip_prefix("size:") {
            size = rest.parse().ok();
        }
    }
    // "const void * skaddr", "__u8 saddr[4]": the name is the last word, without array bounds.
    let name = declaration?.split_whitespace().last()?;
    let name = name.split('[').next()?.trim_start_matches('*');
    Some((name, offset?, size?))
}

/// Checks `format_text` (the content of the tracepoint's `format` file) against every field the
/// program reads. Returns the first disagreement.
pub(crate) fn check(format_text: &str) -> Result<(), FormatMismatch> {
    check_fields(format_text, &tracepoint::FIELDS)
}

fn check_fields(format_text: &str, expected_fields: &[Field]) -> Result<(), FormatMismatch> {
    let fields: Vec<_> = format_text.lines().filter_map(parse_field_line).collect();
    for &expected in expected_fields {
        match fields.iter().find(|(name, _, _)| *name == expected.name) {
            None => return Err(FormatMismatch::Missing { field: expected.name }),
            Some(&(_, offset, size)) if offset != expected.offset || size != expected.size => {
                return Err(FormatMismatch::Moved { field: expected.name, expected, offset, size });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format file of the 6.18 kernel this project was built on.
    pub(crate) const KERNEL_6_18: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s ...\"
";

    #[test]
    fn accepts_the_layout_the_program_reads() {
        assert_eq!(check(KERNEL_6_18), Ok(()));
    }

    #[test]
    fn rejects_a_moved_field_and_names_it() {
        let crafted = KERNEL_6_18.replace("__u16 dport;\toffset:26", "__u16 dport;\toffset:28");
        let error = check(&crafted).unwrap_err();
        assert_eq!(
            error,
            FormatMismatch::Moved {
                field: "dport",
                expected: tracepoint::DPORT,
                offset: 28,
                size: 2
            }
        );
        assert!(error.to_string().contains("`dport`"), "{error}");
    }

    #[test]
    fn rejects_a_resized_field() {
        let crafted = KERNEL_6_18
            .replace("saddr_v6[16];\toffset:40;\tsize:16", "saddr_v6[16];\toffset:40;\tsize:20");
        assert!(matches!(check(&crafted), Err(FormatMismatch::Moved { field: "saddr_v6", .. })));
    }

    #[test]
    fn rejects_a_missing_field() {
        let crafted: String = KERNEL_6_18
            .lines()
            .filter(|line| !line.contains(" protocol;"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(check(&crafted), Err(FormatMismatch::Missing { field: "protocol" }));
    }

    #[test]
    fn parses_pointer_and_array_declarations() {
        assert_eq!(
            parse_field_line("\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;"),
            Some(("skaddr", 8, 8))
        );
        assert_eq!(
            parse_field_line("\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;"),
            Some(("saddr", 32, 4))
        );
        assert_eq!(parse_field_line("print fmt: \"x\""), None);
    }
}
