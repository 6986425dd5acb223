//! A crate's module graph, read from its sources, for tests that keep it acyclic and layered
//! (`core/tests/module_graph.rs`, `sim/tests/module_graph.rs`,
//! `cuda-backend/tests/module_graph.rs`). A module is a file under `src/` (binaries in
//! `src/bin/` are crates of their own); an edge is any `use` or inline
//! `crate::`/`super::`/`self::` path from one module to another; `mod` declarations are not
//! edges, and paths into other crates resolve to the crate root, which is no edge either. A
//! module's `pub use` of its own descendant's items (a facade) is no edge; so a parent that
//! only re-exports a child may be used by that child. The reader sees paths, not names: a name
//! brought in by a glob or a re-export and used bare is not seen, which is why each test first
//! checks edges it knows are there.

mod parse;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module path, `["node", "ctx"]` for `node::ctx`; the crate root is empty.
pub type Module = Vec<String>;
/// Each module and the modules it imports.
pub type Graph = BTreeMap<Module, BTreeSet<Module>>;

/// The module graph of the crate whose sources are in `src`.
pub fn graph(src: &Path) -> Graph {
    let mut files = BTreeMap::new();
    modules(src, &Vec::new(), &mut files);
    let known: BTreeSet<Module> = files.keys().cloned().collect();
    let mut g = Graph::new();
    for (m, text) in &files {
        let edges = g.entry(m.clone()).or_default();
        for n in parse::paths(text) {
            let to = resolve(&n.path, m, n.inline, &known);
            // A module re-exporting its own child's items is that child's public face, not a
            // user of it: the child may still use its parent without a cycle.
            let facade = n.reexport && to.starts_with(m);
            if !to.is_empty() && &to != m && !facade {
                edges.insert(to);
            }
        }
    }
    g
}

/// The module graph of the crate whose manifest is in `manifest_dir` (a test passes
/// `env!("CARGO_MANIFEST_DIR")`).
pub fn of_crate(manifest_dir: &str) -> Graph {
    graph(&Path::new(manifest_dir).join("src"))
}

/// Whether module `from` imports module `to` (both as `a::b` paths).
pub fn imports(g: &Graph, from: &str, to: &str) -> bool {
    g.get(&module(from))
        .is_some_and(|e| e.contains(&module(to)))
}

/// Panics naming the modules along the first cycle of `g`, if there is one.
pub fn assert_acyclic(g: &Graph) {
    if let Some(c) = cycle(g) {
        let c: Vec<String> = c.iter().map(name).collect();
        panic!("module cycle: {} -> {}", c.join(" -> "), c[0]);
    }
}

/// `node::ctx` as a `Module`.
pub fn module(s: &str) -> Module {
    s.split("::").map(String::from).collect()
}

/// The first cycle of `g`, if any, as the modules along it.
pub fn cycle(g: &Graph) -> Option<Vec<Module>> {
    g.keys().find_map(|m| cycle_from(g, m, &mut Vec::new()))
}

pub fn name(m: &Module) -> String {
    m.join("::")
}

/// A cycle through `at`, if any, found depth first.
fn cycle_from(g: &Graph, at: &Module, trail: &mut Vec<Module>) -> Option<Vec<Module>> {
    if let Some(i) = trail.iter().position(|m| m == at) {
        return Some(trail[i..].to_vec());
    }
    trail.push(at.clone());
    for next in g.get(at).into_iter().flatten() {
        if let Some(c) = cycle_from(g, next, trail) {
            return Some(c);
        }
    }
    trail.pop();
    None
}

/// Every module file under `src/` (binaries are crates of their own), by module path.
fn modules(dir: &Path, prefix: &Module, out: &mut BTreeMap<Module, String>) {
    for e in std::fs::read_dir(dir).expect("readable src") {
        let p = e.expect("dir entry").path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            if prefix.is_empty() && name == "bin" {
                continue;
            }
            let mut m = prefix.clone();
            m.push(name);
            modules(&p, &m, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let mut m = prefix.clone();
            if !matches!(name.as_str(), "mod" | "lib") {
                m.push(name);
            }
            out.insert(m, std::fs::read_to_string(&p).expect("readable source"));
        }
    }
}

/// The module a path names from `here` (`in_inline`: inside an inline `mod`, where `super` is
/// the file's own module): its longest prefix that is a module file.
fn resolve(path: &str, here: &Module, in_inline: bool, known: &BTreeSet<Module>) -> Module {
    let segs: Vec<&str> = path.split("::").collect();
    let (mut base, mut i) = (here.clone(), 0);
    match segs[0] {
        "crate" => (base, i) = (Vec::new(), 1),
        "self" => i = 1,
        "super" => {
            while segs.get(i) == Some(&"super") {
                if !(in_inline && i == 0) {
                    base.pop();
                }
                i += 1;
            }
        }
        _ => {}
    }
    for s in &segs[i..] {
        let mut next = base.clone();
        next.push(s.to_string());
        if !known.contains(&next) {
            break;
        }
        base = next;
    }
    base
}
