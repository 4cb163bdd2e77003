//! BENCHMARKS.md: the method written by hand, then one section of current figures per tool
//! that measures (`cargo xtask bench`, `cargo xtask soak --record`). Each tool replaces its
//! own section and leaves the rest of the file as it is.

use std::{path::Path, process::Command, thread};

use crate::cmd::capture;

/// Replaces the section that starts with the line `heading` (up to the next `## ` heading or
/// the end of the file) with `section`, which starts with that heading; a section not there
/// yet is added at the end.
pub fn record_section(path: &Path, heading: &str, section: &str) -> anyhow::Result<()> {
    let existing = std::fs::read_to_string(path)?;
    std::fs::write(path, replace_section(&existing, heading, section))?;
    Ok(())
}

fn replace_section(existing: &str, heading: &str, section: &str) -> String {
    let lines: Vec<&str> = existing.lines().collect();
    let section = section.trim_end();
    let Some(start) = lines.iter().position(|line| *line == heading) else {
        return format!("{}\n\n{section}\n", existing.trim_end());
    };
    let end = lines[start + 1..]
        .iter()
        .position(|line| line.starts_with("## "))
        .map_or(lines.len(), |at| start + 1 + at);
    let before = lines[..start].join("\n");
    let after = lines[end..].join("\n");
    let mut out = String::new();
    if !before.is_empty() {
        out = format!("{}\n\n", before.trim_end());
    }
    out.push_str(section);
    out.push('\n');
    if !after.is_empty() {
        out = format!("{out}\n{after}\n");
    }
    out
}

/// The commit measured, as `git rev-parse --short HEAD` says.
pub fn commit() -> String {
    capture(Command::new("git").args(["rev-parse", "--short", "HEAD"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine measured on: CPUs, memory and kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kb| format!("{:.0} GiB", kb as f64 / 1_048_576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} × {cpu}, {memory}, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::replace_section;

    const FILE: &str = "# Benchmarks\n\n## Method\n\nBy hand.\n\n## Current figures\n\n| a |\n\n## Soak\n\nold soak\n";

    #[test]
    fn a_middle_section_is_replaced_and_the_others_kept() {
        let out = replace_section(FILE, "## Current figures", "## Current figures\n\n| b |\n");
        assert_eq!(
            out,
            "# Benchmarks\n\n## Method\n\nBy hand.\n\n## Current figures\n\n| b |\n\n## Soak\n\nold soak\n"
        );
    }

    #[test]
    fn the_last_section_is_replaced_to_the_end() {
        let out = replace_section(FILE, "## Soak", "## Soak\n\nnew soak\n");
        assert_eq!(
            out,
            "# Benchmarks\n\n## Method\n\nBy hand.\n\n## Current figures\n\n| a |\n\n## Soak\n\nnew soak\n"
        );
    }

    #[test]
    fn a_missing_section_is_added_at_the_end() {
        let file = "# Benchmarks\n\n## Method\n\nBy hand.\n";
        let out = replace_section(file, "## Soak", "## Soak\n\nfirst\n");
        assert_eq!(out, "# Benchmarks\n\n## Method\n\nBy hand.\n\n## Soak\n\nfirst\n");
    }

    /// A heading's words inside a line (or a longer heading) are not the heading.
    #[test]
    fn only_a_whole_heading_line_is_a_section() {
        let file = "# B\n\nSee ## Soak below.\n\n## Soaking\n\nx\n";
        let out = replace_section(file, "## Soak", "## Soak\n\ny\n");
        assert_eq!(out, "# B\n\nSee ## Soak below.\n\n## Soaking\n\nx\n\n## Soak\n\ny\n");
    }
}
