//! Pointers from the tree into the docs, held true: a comment that sends the reader to
//! `docs/daemon.md, "OTLP export"` (or `README, "..."`) names a section that exists, and the
//! lists of xtask's tasks name every task.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use clap::CommandFactory as _;

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("in the workspace").to_path_buf()
    }

    fn files_below(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                files_below(&path, out);
            } else {
                out.push(path);
            }
        }
    }

    /// `(file, section)` for each `README, "Section"` or `docs/x.md, "Section"` in `text`.
    fn pointers(text: &str) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for (at, _) in text.match_indices(", \"") {
            let before = &text[..at];
            let file =
                before.rsplit(|c: char| c.is_whitespace() || c == '(').next().unwrap_or_default();
            let file = match file {
                "README" | "README.md" => "README.md".to_owned(),
                f if f.starts_with("docs/") && f.ends_with(".md") => f.to_owned(),
                _ => continue,
            };
            let rest = &text[at + 3..];
            if let Some(end) = rest.find('"') {
                found.push((file, rest[..end].to_owned()));
            }
        }
        found
    }

    #[test]
    fn every_pointer_into_the_docs_names_a_section_that_exists() {
        let root = workspace();
        let mut files = vec![root.join("Cargo.toml")];
        files_below(&root.join("deploy"), &mut files);
        let mut checked = 0;
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else { continue };
            for (doc, section) in pointers(&text) {
                let headings = std::fs::read_to_string(root.join(&doc)).unwrap();
                let exists = headings.lines().any(|line| {
                    line.starts_with('#') && line.trim_start_matches('#').trim() == section
                });
                assert!(
                    exists,
                    "{} points at {doc}, \"{section}\", which has no such heading",
                    file.display()
                );
                checked += 1;
            }
        }
        assert!(checked >= 3, "only {checked} pointers found: the pattern no longer matches");
    }

    #[test]
    fn pointers_are_read_as_written() {
        let text = "# see docs/daemon.md, \"OTLP export\" and (README, \"Install\"); x, \"y\"";
        assert_eq!(
            pointers(text),
            [
                ("docs/daemon.md".to_owned(), "OTLP export".to_owned()),
                ("README.md".to_owned(), "Install".to_owned())
            ]
        );
    }

    /// xtask's own summary and docs/development.md list every task a user may run.
    #[test]
    fn the_task_lists_name_every_task() {
        let tasks: Vec<String> = crate::Cli::command()
            .get_subcommands()
            .filter(|task| !task.is_hide_set())
            .map(|task| task.get_name().to_owned())
            .collect();
        assert!(tasks.len() >= 9, "{tasks:?}");
        let summary = std::fs::read_to_string(workspace().join("xtask/src/main.rs")).unwrap();
        let summary: String = summary.lines().take_while(|l| l.starts_with("//!")).collect();
        let development = std::fs::read_to_string(workspace().join("docs/development.md")).unwrap();
        for task in &tasks {
            assert!(summary.contains(task.as_str()), "xtask/src/main.rs's summary misses `{task}`");
            let listed = development.lines().any(|l| {
                l.contains("cargo xtask setup |") && l.contains(&format!(" {task} "))
                    || l.contains(&format!("| {task}`"))
            });
            assert!(listed, "docs/development.md's list of tasks misses `{task}`");
        }
    }
}
