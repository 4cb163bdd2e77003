//! The file-level import graph of a crate's `src/`, and its cycles: every `use` and inline
//! path that starts with `crate::`, `super::` or `self::` is resolved to the file of its
//! longest module prefix (following one `pub use` re-export), so `daemon/shared.rs` importing
//! `daemon/leak_watch.rs`, which imports `daemon/shared.rs` back, is a cycle even though both
//! live in one top-level module. A file may use what its ancestors define (a room's
//! entrance, as aya's `maps/*` use `maps/mod.rs`'s `MapError`): only other edges can close a
//! cycle. Test code (from a file's first `#[cfg(test)]` on) is not read.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// A module path inside the crate: `["daemon", "reading"]` for `src/daemon/reading.rs`.
type ModulePath = Vec<String>;

/// A crate's files by module path, each with its non-test code, comments and literals removed.
pub struct Crate {
    files: BTreeMap<ModulePath, String>,
}

impl Crate {
    /// Reads every `.rs` file below `src`.
    pub fn read(src: &Path) -> std::io::Result<Self> {
        let mut sources = BTreeMap::new();
        read_dir(src, src, &mut sources)?;
        Ok(Self::from_sources(sources))
    }

    /// `sources`: relative file path (`daemon/mod.rs`) to its text.
    pub fn from_sources(sources: BTreeMap<String, String>) -> Self {
        let mut files: BTreeMap<ModulePath, String> = BTreeMap::new();
        for (path, text) in sources {
            let mut module: ModulePath =
                path.trim_end_matches(".rs").split('/').map(str::to_owned).collect();
            if module.last().is_some_and(|last| ["mod", "lib", "main"].contains(&last.as_str())) {
                module.pop();
            }
            // lib.rs and main.rs are both the crate root.
            files.entry(module).or_default().push_str(&code_of(&text));
        }
        Self { files }
    }

    /// The files each file imports, by module path.
    fn edges(&self) -> BTreeMap<&ModulePath, BTreeSet<&ModulePath>> {
        let mut reexports: BTreeMap<&ModulePath, BTreeMap<String, &ModulePath>> = BTreeMap::new();
        for (module, code) in &self.files {
            for tree in use_trees(code).filter(|(public, _)| *public).map(|(_, tree)| tree) {
                for path in expand(&tree) {
                    if let Some((target, _)) = self.resolve(&path, module)
                        && target != module
                        && let Some(name) = path.last()
                    {
                        reexports.entry(module).or_default().insert(name.clone(), target);
                    }
                }
            }
        }
        let mut edges = BTreeMap::new();
        for (module, code) in &self.files {
            let uses: &mut BTreeSet<&ModulePath> = edges.entry(module).or_default();
            let paths =
                use_trees(code).flat_map(|(_, tree)| expand(&tree)).chain(inline_paths(code));
            for path in paths {
                let Some((mut target, rest)) = self.resolve(&path, module) else { continue };
                if let Some(further) =
                    rest.first().and_then(|name| reexports.get(target)?.get(name).copied())
                {
                    target = further;
                }
                if target != module && !module.starts_with(target) {
                    uses.insert(target);
                }
            }
        }
        edges
    }

    /// The file `path` (as written in `module`) names, and the rest of the path inside it.
    fn resolve(&self, path: &[String], module: &ModulePath) -> Option<(&ModulePath, ModulePath)> {
        let mut full: ModulePath = match path.first()?.as_str() {
            "crate" => Vec::new(),
            "super" | "self" => module.clone(),
            _ => return None,
        };
        let mut rest = if path[0] == "crate" { &path[1..] } else { path };
        while let Some(first) = rest.first().filter(|f| *f == "super" || *f == "self") {
            if first == "super" {
                full.pop();
            }
            rest = &rest[1..];
        }
        full.extend(rest.iter().cloned());
        (0..=full.len()).rev().find_map(|k| {
            let (file, _) = self.files.get_key_value(&full[..k])?;
            Some((file, full[k..].to_vec()))
        })
    }

    /// Each set of files that import each other in a circle (a strongly connected component
    /// of more than one file), as paths like `daemon/shared`.
    pub fn cycles(&self) -> Vec<Vec<String>> {
        let edges = self.edges();
        let mut search = Tarjan {
            edges: &edges,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            components: Vec::new(),
        };
        for module in self.files.keys() {
            if !search.index.contains_key(module) {
                search.visit(module);
            }
        }
        search
            .components
            .into_iter()
            .filter(|component| component.len() > 1)
            .map(|component| {
                let mut names: Vec<String> = component
                    .into_iter()
                    .map(|m| if m.is_empty() { "(root)".to_owned() } else { m.join("/") })
                    .collect();
                names.sort();
                names
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }
}

fn read_dir(
    root: &Path,
    dir: &Path,
    sources: &mut BTreeMap<String, String>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            read_dir(root, &path, sources)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).expect("below root");
            sources
                .insert(relative.to_string_lossy().into_owned(), std::fs::read_to_string(&path)?);
        }
    }
    Ok(())
}

/// Tarjan's strongly connected components over the import edges.
struct Tarjan<'a> {
    edges: &'a BTreeMap<&'a ModulePath, BTreeSet<&'a ModulePath>>,
    index: BTreeMap<&'a ModulePath, usize>,
    low: BTreeMap<&'a ModulePath, usize>,
    stack: Vec<&'a ModulePath>,
    components: Vec<Vec<&'a ModulePath>>,
}

impl<'a> Tarjan<'a> {
    fn visit(&mut self, module: &'a ModulePath) {
        let number = self.index.len();
        self.index.insert(module, number);
        self.low.insert(module, number);
        self.stack.push(module);
        for &next in self.edges.get(module).into_iter().flatten() {
            if !self.index.contains_key(next) {
                self.visit(next);
                let low = self.low[module].min(self.low[next]);
                self.low.insert(module, low);
            } else if self.stack.contains(&next) {
                let low = self.low[module].min(self.index[next]);
                self.low.insert(module, low);
            }
        }
        if self.low[module] == self.index[module] {
            let at = self.stack.iter().rposition(|m| *m == module).expect("on the stack");
            self.components.push(self.stack.split_off(at));
        }
    }
}

/// The code before the first `#[cfg(test)]`, without comments, string and character
/// literals (a path inside a string or a doc comment is no import).
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    let chars: Vec<char> = text.chars().collect();
    let mut code = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        match rest {
            ['/', '/', ..] => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ['/', '*', ..] => {
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
            }
            ['r', '#' | '"', ..]
                if !chars
                    .get(i.wrapping_sub(1))
                    .is_some_and(|c| c.is_alphanumeric() || *c == '_') =>
            {
                let hashes = rest[1..].iter().take_while(|c| **c == '#').count();
                if rest.get(1 + hashes) != Some(&'"') {
                    code.push('r');
                    i += 1;
                    continue;
                }
                i += 2 + hashes;
                while i < chars.len()
                    && !(chars[i] == '"'
                        && chars[i + 1..].iter().take(hashes).filter(|c| **c == '#').count()
                            == hashes)
                {
                    i += 1;
                }
                i += 1 + hashes;
                code.push_str("\"\"");
            }
            ['"', ..] => {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
                code.push_str("\"\"");
            }
            ['\'', '\\', ..] => {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            }
            ['\'', _, '\'', ..] => i += 3,
            [c, ..] => {
                code.push(*c);
                i += 1;
            }
            [] => break,
        }
    }
    code
}

/// The trees of every `use` item: whether it is a re-export (`pub use`, `pub(crate) use`),
/// and the tree as written, whitespace removed.
fn use_trees(code: &str) -> impl Iterator<Item = (bool, String)> + '_ {
    code.match_indices("use ").filter_map(move |(at, _)| {
        let before = code[..at].trim_end();
        let word_start = code[..at].chars().last().is_none_or(|c| !c.is_alphanumeric() && c != '_');
        if !word_start {
            return None;
        }
        let public = before.ends_with("pub") || before.ends_with(')') && before.contains("pub(");
        let tree = code[at + 4..].split(';').next()?;
        Some((public, without_renames(tree)))
    })
}

/// A use tree without whitespace and without its renames (`a as b` is `a`).
fn without_renames(tree: &str) -> String {
    let mut out = String::new();
    let mut tokens = tree.split_whitespace();
    while let Some(token) = tokens.next() {
        if token == "as" {
            let alias = tokens.next().unwrap_or_default();
            out.extend(alias.chars().skip_while(|c| c.is_alphanumeric() || *c == '_'));
        } else {
            out.push_str(token);
        }
    }
    out
}

/// The paths a use tree names: `a::{b, c::{d, e}}` is `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    fn split_top(list: &str) -> Vec<&str> {
        let (mut depth, mut start, mut parts) = (0, 0, Vec::new());
        for (i, c) in list.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&list[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&list[start..]);
        parts.into_iter().filter(|p| !p.is_empty()).collect()
    }
    fn walk(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
        for part in split_top(tree) {
            if let Some(open) = part.find('{') {
                let mut inner = prefix.to_vec();
                inner.extend(part[..open].split("::").filter(|s| !s.is_empty()).map(str::to_owned));
                walk(&inner, part[open + 1..].strip_suffix('}').unwrap_or(&part[open + 1..]), out);
            } else {
                let mut path = prefix.to_vec();
                path.extend(part.split("::").filter(|s| !s.is_empty()).map(str::to_owned));
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&[], tree, &mut out);
    out
}

/// Paths written in code rather than imported: `crate::clock::monotonic_ns()`, `super::X`.
fn inline_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for start in ["crate::", "super::", "self::"] {
        for (at, _) in code.match_indices(start) {
            if code[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            {
                continue;
            }
            let path: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            paths.push(path.split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect());
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Crate {
        Crate::from_sources(files.iter().map(|(p, t)| ((*p).to_owned(), (*t).to_owned())).collect())
    }

    fn workspace() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("in the workspace").to_path_buf()
    }

    /// Neither crate's files import each other in a circle, at any depth.
    #[test]
    fn no_file_imports_one_that_imports_it_back() {
        for src in ["tracer/src", "xtask/src"] {
            let krate = Crate::read(&workspace().join(src)).expect("readable sources");
            assert!(krate.len() > 10, "read only {} files of {src}", krate.len());
            let cycles = krate.cycles();
            assert!(cycles.is_empty(), "files of {src} import each other in a circle: {cycles:?}");
        }
    }

    /// A cycle between two siblings through `super::`, inside one top-level module, is found
    /// (the old test folded both into `daemon` and could not see it).
    #[test]
    fn a_cycle_through_super_between_siblings_is_found() {
        let krate = tree(&[
            ("lib.rs", "mod daemon;"),
            ("daemon/mod.rs", "mod shared; mod leaks; pub(crate) use self::shared::Shared;"),
            ("daemon/shared.rs", "use super::leaks::LeakState; pub struct Shared;"),
            ("daemon/leaks.rs", "use super::Shared; pub struct LeakState;"),
        ]);
        assert_eq!(krate.cycles(), [["daemon/leaks", "daemon/shared"]]);
    }

    /// Grouped imports, inline paths and `self::` all count; a child using its parent does
    /// not; comments, strings and test code do not.
    #[test]
    fn every_way_of_naming_a_file_counts_and_nothing_else() {
        let with = |extra: &str| {
            tree(&[
                ("main.rs", "mod a; mod b;"),
                ("a/mod.rs", "mod c; pub fn f() { self::c::g() }"),
                ("a/c.rs", &format!("use super::f; {extra}")),
                ("b.rs", "pub fn h() { crate::a::f() }"),
            ])
            .cycles()
        };
        assert!(with("").is_empty(), "a child may use its parent");
        assert!(with("// crate::b::h()\n let s = \"crate::b\";").is_empty());
        assert!(with("#[cfg(test)] mod t { use crate::b::h; }").is_empty());
        assert_eq!(with("use crate::{x, b::{h}};"), [["a", "a/c", "b"]]);
        assert_eq!(with("fn k() { crate::b::h() }"), [["a", "a/c", "b"]]);
    }

    /// The code map in docs/design.md names every file of tracer/src (a directory's `mod.rs`
    /// by the directory), and every `name.rs` it names exists.
    #[test]
    fn every_module_is_in_the_code_map() {
        let design = std::fs::read_to_string(workspace().join("docs/design.md")).unwrap();
        let map = design
            .split("## Code map")
            .nth(1)
            .and_then(|section| section.split("```").nth(1))
            .expect("docs/design.md has a code map in a fenced block under ## Code map");
        let words: BTreeSet<&str> = map
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
            .map(|word| word.trim_end_matches('.'))
            .collect();
        let mut sources = BTreeMap::new();
        let src = workspace().join("tracer/src");
        read_dir(&src, &src, &mut sources).unwrap();
        let mut missing = Vec::new();
        for path in sources.keys() {
            let parts: Vec<&str> = path.trim_end_matches(".rs").split('/').collect();
            let name = match parts.as_slice() {
                [.., dir, "mod"] => *dir,
                [.., file] => file,
                [] => continue,
            };
            if !words.contains(name) && !words.contains(format!("{name}.rs").as_str()) {
                missing.push(path.clone());
            }
        }
        assert!(missing.is_empty(), "docs/design.md's code map does not list {missing:?}");
        let names: BTreeSet<String> =
            sources.keys().filter_map(|path| path.rsplit('/').next()).map(str::to_owned).collect();
        let stale: Vec<&&str> =
            words.iter().filter(|w| w.ends_with(".rs") && !names.contains(**w)).collect();
        assert!(
            stale.is_empty(),
            "docs/design.md's code map names files that do not exist: {stale:?}"
        );
    }

    /// Two files of one crate never share a name in different rooms (`mod.rs` aside): a name
    /// says what a file holds, wherever it is.
    #[test]
    fn no_two_files_share_a_name() {
        for src in ["tracer/src", "xtask/src"] {
            let mut sources = BTreeMap::new();
            let root = workspace().join(src);
            read_dir(&root, &root, &mut sources).unwrap();
            let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
            for path in sources.keys() {
                let name = path.rsplit('/').next().unwrap_or(path);
                if ["mod.rs", "main.rs", "lib.rs"].contains(&name) {
                    continue;
                }
                if let Some(other) = seen.insert(name, path) {
                    panic!("{src}: {other} and {path} share a name");
                }
            }
        }
    }

    #[test]
    fn use_trees_expand_to_each_path() {
        let paths = expand(&without_renames("crate::{a::{b, c as d}, e}, super::f"));
        let joined: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
        assert_eq!(joined, ["crate::a::b", "crate::a::c", "crate::e", "super::f"]);
    }
}
