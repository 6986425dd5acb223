//! The crate's module graph, read from its sources (`kvferry-module-graph`): no two modules
//! import each other (no cycle of any length), and the host data plane never imports the node
//! or the CUDA agent (`host` sits under `node`), nor does the CUDA agent import either.

use kvferry_module_graph::{assert_acyclic, imports, name, of_crate, Graph};

fn graph() -> Graph {
    of_crate(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_checker_sees_known_edges() {
    let g = graph();
    let edge = |a: &str, b: &str| imports(&g, a, b);
    // One plain `use`, one inside braces, one inline path, one from a test module.
    assert!(edge("node::ctx", "node::rank"));
    assert!(edge("node::ctx", "node"));
    assert!(edge("node::link", "host::route"));
    assert!(edge("node::writer", "host::kv"));
    assert!(!edge("node::ctx", "node::ctx"));
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    assert_acyclic(&graph());
}

#[test]
fn host_and_cuda_never_import_the_node() {
    for (m, to) in graph() {
        for t in to {
            let (from, into) = (m[0].as_str(), t[0].as_str());
            let allowed = match from {
                "host" => into != "node" && into != "cuda",
                "cuda" => into != "node" && into != "host",
                _ => true,
            };
            assert!(allowed, "{} imports {}", name(&m), name(&t));
        }
    }
}
