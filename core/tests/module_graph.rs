//! The core's module graph, read from its sources (`kvferry-module-graph`): no two modules
//! import each other (no cycle of any length), and the state machine sits on top: the pieces
//! it is built from (plans, layouts, frames, pools, requests, agents, the collective, the
//! config) never import the transceiver, and nothing but the crate root imports the loopback
//! harness, which drives the transceiver from outside as any driver does.

use kvferry_module_graph::{assert_acyclic, imports, name, of_crate, Graph};

fn graph() -> Graph {
    of_crate(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_checker_sees_known_edges() {
    let g = graph();
    let edge = |a: &str, b: &str| imports(&g, a, b);
    assert!(edge("transceiver::entry", "blocks"));
    assert!(edge("transceiver::legs", "transceiver::abort"));
    assert!(edge("transceiver", "agent"));
    assert!(edge("wire::data", "wire"));
    assert!(!edge("wire", "wire::data"));
    assert!(edge("loopback", "transceiver"));
    assert!(!edge("blocks", "blocks"));
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    assert_acyclic(&graph());
}

#[test]
fn the_transceiver_is_above_its_parts_and_below_its_drivers() {
    for (m, to) in graph() {
        for t in to {
            let (from, into) = (m[0].as_str(), t[0].as_str());
            let allowed = match from {
                "transceiver" | "loopback" => into != "loopback",
                _ => into != "transceiver" && into != "loopback",
            };
            assert!(allowed, "{} imports {}", name(&m), name(&t));
        }
    }
}
