//! tcpstate: TCP state transitions from the kernel tracepoint `sock:inet_sock_set_state`,
//! streamed live (`watch`) or aggregated by a daemon (`run`) into Prometheus metrics.
//!
//! Data flows one way: the kernel program (`tracer-ebpf`) writes one record per transition to
//! a BPF ring buffer; [`probe`] loads and attaches it, [`reader`] drains the ring in batches,
//! and the commands consume the records.
//!
//! The public surface is what the `tcpstate` binary (the commands and their configuration)
//! and the integration tests (the probe, the reader, a record's accessors) use; everything
//! else is `pub(crate)`, which `unreachable_pub` keeps so.

pub mod capabilities;
pub mod cgroups;
pub mod check;
pub mod cli;
mod client;
mod clock;
mod cmdline;
mod container;
pub mod daemon;
mod error_chain;
pub mod event;
pub mod explain;
mod failure;
pub mod leaks;
mod netns;
mod owners;
pub mod probe;
pub mod reader;
mod signals;
mod sockdiag;
mod socket;
pub mod top;
pub mod watch;
mod web_config;

/// The modules' imports form no cycle, so the code map in docs/design.md can be read top to
/// bottom. Reads every `use crate::...` (and `crate::` path) of the non-test code.
#[cfg(test)]
mod module_graph {
    use std::{
        collections::{BTreeMap, BTreeSet},
        fs,
        path::Path,
    };

    /// The crate-level modules `text` names after `crate::`, grouped imports included.
    fn named_modules(text: &str) -> BTreeSet<String> {
        let leading_name = |text: &str| -> String {
            text.trim_start().chars().take_while(|c| *c == '_' || c.is_alphanumeric()).collect()
        };
        let mut named = BTreeSet::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let Some(group) = rest.strip_prefix('{') else {
                named.insert(leading_name(rest));
                continue;
            };
            // The top level of `{a, b::{c, d}, e}`: a, b and e.
            let (mut depth, mut item_start) = (0, 0);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth > 0 => depth -= 1,
                    ',' | '}' if depth == 0 => {
                        named.insert(leading_name(&group[item_start..i]));
                        item_start = i + 1;
                        if c == '}' {
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
        named.remove("");
        named
    }

    fn collect(dir: &Path, top: Option<&str>, graph: &mut BTreeMap<String, BTreeSet<String>>) {
        for entry in fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let module = top.map_or_else(|| name.clone(), str::to_owned);
            if path.is_dir() {
                collect(&path, Some(&module), graph);
            } else if path.extension().is_some_and(|e| e == "rs")
                && (top.is_some() || !["lib", "main"].contains(&name.as_str()))
            {
                let text = fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                let uses = graph.entry(module.clone()).or_default();
                uses.extend(named_modules(code).into_iter().filter(|m| *m != module));
            }
        }
    }

    /// A path from `from` back to itself, if any.
    fn cycle_through(
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        let last = path.last().unwrap().clone();
        for next in graph.get(&last).into_iter().flatten() {
            if *next == path[0] {
                return Some(path.clone());
            }
            if !path.contains(next) {
                path.push(next.clone());
                if let Some(cycle) = cycle_through(graph, path) {
                    return Some(cycle);
                }
                path.pop();
            }
        }
        None
    }

    #[test]
    fn the_module_graph_has_no_cycle() {
        let mut graph = BTreeMap::new();
        collect(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), None, &mut graph);
        assert!(graph.len() > 20 && graph["daemon"].contains("probe"), "read {graph:?}");
        for module in graph.keys() {
            if let Some(cycle) = cycle_through(&graph, &mut vec![module.clone()]) {
                panic!("the modules import each other in a cycle: {}", cycle.join(" -> "));
            }
        }
    }

    #[test]
    fn grouped_imports_name_each_top_level_module() {
        let text = "use crate::{a::{b, c}, d, e::f};\nlet x = crate::g::h();";
        let named: Vec<_> = named_modules(text).into_iter().collect();
        assert_eq!(named, ["a", "d", "e", "g"]);
    }
}
