//! The simulator's module graph, read from its sources: no two modules import each other (no
//! cycle of any length), and the layers hold: the world and its leaves (the fabric, the
//! mailboxes, the doorbell, the checker, the router, ...) import nothing that runs a rank or an
//! agent; the network and the agents import no executor; the executors (`rank`) import no
//! cluster. An edge is any `use` or inline `crate::`/`super::`/`self::` path from one module (a
//! file) to another; `mod` declarations are not edges.
//! The graph is read by `kvferry-module-graph`.

use kvferry_module_graph::{assert_acyclic, imports, name, of_crate, Graph};

fn graph() -> Graph {
    of_crate(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_checker_sees_known_edges() {
    let g = graph();
    let edge = |a: &str, b: &str| imports(&g, a, b);
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
    assert_acyclic(&graph());
}

/// Who may import what: a module of a layer imports only modules of lower layers (or of its
/// own layer, where listed as leaves that import no sibling of theirs above).
#[test]
fn layers_point_down() {
    let above = |m: &str| -> &[&str] {
        match m {
            // The world and its leaves: nothing that runs a rank, an agent or the network.
            "world" | "fabric" | "mailbox" | "wake" | "checker" | "router" | "attribution"
            | "faults" | "scenario" | "report" | "memory" | "hazard" | "transfer_mode"
            | "coverage" | "schedule" | "horizon" | "growth" => {
                &["cluster", "rank", "agent", "net"]
            }
            // The network and the agents: no executor, no cluster.
            "net" | "agent" => &["cluster", "rank"],
            "rank" | "sampler" => &["cluster"],
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
