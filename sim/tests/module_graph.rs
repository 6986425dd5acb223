//! The simulator's module graph, read from its sources: no two modules import each other (no
//! cycle of any length), and the layers hold: the world and its leaves (the fabric, the
//! mailboxes, the doorbell, the checker, the router, ...) import nothing that runs a rank or an
//! agent; the network and the agents import no executor; the executors (`rank`) import no
//! cluster. An edge is any `use` or inline `crate::`/`super::`/`self::` path from one module (a
//! file) to another; `mod` declarations are not edges.
//!
//! The source reader is the one of `cuda-backend/tests/module_graph.rs` (each crate's tests
//! stand alone; neither crate depends on the other).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;
type Graph = BTreeMap<Module, BTreeSet<Module>>;

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

/// `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let (head, inner) = (&tree[..open], &tree[open + 1..tree.len() - 1]);
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    let parts = parts.into_iter().filter(|p| !p.is_empty());
    parts.flat_map(|p| expand(&format!("{head}{p}"))).collect()
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

/// The paths one file names, each with whether it sits inside an inline `mod`.
fn paths(src: &str) -> Vec<(String, bool)> {
    let (mut out, mut depth, mut inline_at): (Vec<(String, bool)>, i32, Option<i32>) =
        (Vec::new(), 0, None);
    let mut stmt: Option<String> = None;
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or_default().trim();
        let inline = inline_at.is_some();
        if inline_at.is_none() && code.starts_with("mod ") && code.ends_with('{') {
            inline_at = Some(depth);
        }
        depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
        if inline_at.is_some_and(|d| depth <= d) {
            inline_at = None;
        }
        let use_at = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "]
            .into_iter()
            .find(|p| code.starts_with(p));
        if let Some(s) = stmt.as_mut() {
            s.push_str(code);
        } else if let Some(p) = use_at {
            stmt = Some(code[p.len()..].to_string());
        } else {
            out.extend(inline_paths(code).map(|p| (p, inline)));
        }
        if let Some(s) = stmt.take_if(|s| s.ends_with(';')) {
            let tree = s
                .trim_end_matches(';')
                .split(" as ")
                .next()
                .unwrap()
                .to_string();
            out.extend(expand(&tree).into_iter().map(|p| (p, inline)));
        }
    }
    out
}

/// `crate::a::b`, `super::c` and `self::d` paths in a line of code.
fn inline_paths(code: &str) -> impl Iterator<Item = String> + '_ {
    ["crate::", "super::", "self::"]
        .into_iter()
        .flat_map(move |root| {
            code.match_indices(root)
                .filter(move |(i, _)| {
                    !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
                })
                .map(move |(i, _)| {
                    code[i..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect::<String>()
                })
        })
}

fn graph() -> Graph {
    let mut files = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    modules(&src, &Vec::new(), &mut files);
    let known: BTreeSet<Module> = files.keys().cloned().collect();
    let mut g = Graph::new();
    for (m, text) in &files {
        let edges = g.entry(m.clone()).or_default();
        for (p, inline) in paths(text) {
            let to = resolve(&p, m, inline, &known);
            // External crates resolve to the crate root: not an edge.
            if !to.is_empty() && &to != m {
                edges.insert(to);
            }
        }
    }
    g
}

fn name(m: &Module) -> String {
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

fn module(s: &str) -> Module {
    s.split("::").map(String::from).collect()
}

#[test]
fn the_checker_sees_known_edges() {
    let g = graph();
    let edge = |a: &str, b: &str| g[&module(a)].contains(&module(b));
    // Plain `use`s and brace lists, and a pair that must not be an edge.
    assert!(edge("cluster", "rank"));
    assert!(edge("cluster", "world"));
    assert!(edge("cluster", "checker"));
    assert!(edge("rank", "agent"));
    assert!(edge("agent", "world"));
    assert!(!edge("rank", "rank"));
    assert!(!edge("world", "cluster"));
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let g = graph();
    for m in g.keys() {
        if let Some(c) = cycle_from(&g, m, &mut Vec::new()) {
            let c: Vec<String> = c.iter().map(name).collect();
            panic!("module cycle: {} -> {}", c.join(" -> "), c[0]);
        }
    }
}

/// Who may import what: a module of a layer imports only modules of lower layers (or of its
/// own layer, where listed as leaves that import no sibling of theirs above).
#[test]
fn layers_point_down() {
    let above = |m: &str| -> &[&str] {
        match m {
            // The world and its leaves: nothing that runs a rank, an agent or the network.
            "world" | "fabric" | "mailbox" | "wake" | "checker" | "router" | "attribution"
            | "faults" | "scenario" | "report" | "memory" | "hazard" | "transfer_mode" => {
                &["cluster", "rank", "agent", "net"]
            }
            // The network and the agents: no executor, no cluster.
            "net" | "agent" => &["cluster", "rank"],
            "rank" => &["cluster"],
            _ => &[],
        }
    };
    for (m, to) in graph() {
        for t in to {
            assert!(
                !above(&name(&m)).contains(&name(&t).as_str()),
                "{} imports {}, a layer above it",
                name(&m),
                name(&t)
            );
        }
    }
}
