//! `kvferry plan`: shows how a context instance's KV blocks map onto a generation instance.
//!
//! For every generation rank it builds the [`TransferPlan`] of one block and reports which
//! context rank sends which global (layer, kv head) ranges, how many contiguous copies that
//! takes and how many bytes move. It is the same planning code the transceiver runs, so what
//! the command prints is what a transfer will do.
//!
//! Definitions (also in `--help`):
//! - `fragments`: contiguous copy fragments needed to move ONE block from the context instance
//!   to ALL ranks of the generation instance (the sum of every generation rank's plan template
//!   length). This is the number of copy descriptors a batched copy or gather kernel reads.
//! - `bytes_per_block`: bytes one block occupies summed over the generation instance's ranks,
//!   i.e. what moves per block. Heads replicated on several generation ranks count once per
//!   replica: every replica receives its own copy.

use anyhow::Result;
use clap::Args;
use kvferry_core::layout::{CacheLayout, LayoutError};
use kvferry_core::plan::{PlanError, PlanPair, TransferPlan};
use serde::Serialize;
use std::fmt::Write as _;

const DEFINITIONS: &str = "\
Output:
  pairs            which global layer range [lo, hi) and kv head range [lo, hi) each
                   generation rank receives from which context rank, over all generation
                   ranks, sorted by gen_rank, ctx_rank, layer, head.
  fragments        number of contiguous copy fragments needed to move one block from the
                   context instance to all generation ranks.
  bytes_per_block  bytes one block occupies summed over the generation instance's ranks,
                   i.e. what moves per block (a head replicated on several generation ranks
                   counts once per replica).

Ranks are numbered rank = pp_rank * tp + tp_rank.";

/// Print which context ranks send which layers and kv heads to each generation rank.
///
/// Builds, for every generation rank, the same transfer plan the transceiver would run for one
/// KV block, and prints the (generation rank, context rank, layers, heads) pairs, the number of
/// contiguous copy fragments and the bytes that move per block.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
#[command(after_help = DEFINITIONS)]
pub struct PlanArgs {
    /// Tensor-parallel size of the context (prefill) instance.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub ctx_tp: u32,
    /// Pipeline-parallel size of the context instance.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub ctx_pp: u32,
    /// Tensor-parallel size of the generation (decode) instance.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub gen_tp: u32,
    /// Pipeline-parallel size of the generation instance.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub gen_pp: u32,
    /// Layers of the whole model.
    #[arg(long, value_name = "N")]
    pub layers: u32,
    /// KV heads of the whole model (may be fewer than TP: heads are then replicated).
    /// Defaults to 1, the latent head, with --mla.
    #[arg(long, value_name = "N", required_unless_present = "mla")]
    pub kv_heads: Option<u32>,
    /// Elements per head vector.
    #[arg(long, value_name = "N")]
    pub head_dim: u32,
    /// Tokens per KV block.
    #[arg(long, value_name = "N")]
    pub tokens_per_block: u32,
    /// Bytes per element (2 for bf16/fp16, 1 for fp8).
    #[arg(long, value_name = "N")]
    pub dtype_bytes: u32,
    /// Multi-head latent attention: one latent head replicated on every TP rank; exactly one
    /// context rank per pipeline stage serves each generation rank.
    #[arg(long)]
    pub mla: bool,
    /// Print one JSON object {"pairs": [...], "fragments": N, "bytes_per_block": B}, where
    /// fragments = contiguous copy fragments to move one block to all generation ranks and
    /// bytes_per_block = bytes one block occupies summed over the generation ranks.
    #[arg(long)]
    pub json: bool,
}

/// What `kvferry plan --json` prints. Field order is the output order.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct PlanSummaryJson {
    /// Over all generation ranks, sorted by (gen_rank, ctx_rank, layer, head).
    pub pairs: Vec<PlanPair>,
    /// Contiguous copy fragments that move one block to every generation rank.
    pub fragments: u64,
    /// Bytes of one block summed over the generation instance's ranks (what moves per block).
    pub bytes_per_block: u64,
}

impl PlanArgs {
    fn layout(&self, tp: u32, pp: u32) -> CacheLayout {
        CacheLayout {
            num_layers: self.layers,
            num_kv_heads: self.kv_heads.unwrap_or(1),
            head_dim: self.head_dim,
            tokens_per_block: self.tokens_per_block,
            dtype_bytes: self.dtype_bytes,
            tp_size: tp,
            tp_rank: 0,
            pp_size: pp,
            pp_rank: 0,
            mla: self.mla,
        }
    }
}

/// Builds every generation rank's plan for one block and sums them up. Pure: no output.
pub fn summarize(args: &PlanArgs) -> Result<PlanSummaryJson, PlanError> {
    let ctx = args.layout(args.ctx_tp, args.ctx_pp);
    let gen = args.layout(args.gen_tp, args.gen_pp);
    // Validate before `world_size()` is trusted: a zero size would make the loop below empty
    // and print an empty plan instead of an error.
    gen.validate().map_err(PlanError::Generation)?;
    let mut out = PlanSummaryJson {
        pairs: Vec::new(),
        fragments: 0,
        bytes_per_block: 0,
    };
    for rank in 0..gen.world_size() {
        let plan = TransferPlan::new(&ctx, &gen.with_rank(rank), &[(0, 0)])?;
        out.pairs.extend(plan.pairs());
        out.fragments += plan.template().len() as u64;
        out.bytes_per_block += plan.total_bytes();
    }
    // Each plan's pairs are already sorted and gen ranks ascend; sorting again keeps the
    // documented order independent of that.
    out.pairs
        .sort_by_key(|p| (p.gen_rank, p.ctx_rank, p.layers[0], p.heads[0]));
    Ok(out)
}

/// Bytes one pair carries per block.
fn pair_bytes(args: &PlanArgs, p: &PlanPair) -> u64 {
    let kv = if args.mla { 1 } else { 2 };
    u64::from(p.layers[1] - p.layers[0])
        * u64::from(p.heads[1] - p.heads[0])
        * kv
        * u64::from(args.tokens_per_block)
        * u64::from(args.head_dim)
        * u64::from(args.dtype_bytes)
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// The human-readable form of a summary.
pub fn render_table(args: &PlanArgs, s: &PlanSummaryJson) -> String {
    let mut t = String::new();
    let ctx_world = args.ctx_tp * args.ctx_pp;
    let gen_world = args.gen_tp * args.gen_pp;
    let heads = if args.mla {
        "1 latent head (MLA)".to_string()
    } else {
        format!("{} kv heads", args.kv_heads.unwrap_or(1))
    };
    // `write!` to a String cannot fail.
    let _ = writeln!(
        t,
        "context TP{} PP{} ({ctx_world} ranks) -> generation TP{} PP{} ({gen_world} ranks)",
        args.ctx_tp, args.ctx_pp, args.gen_tp, args.gen_pp
    );
    let _ = writeln!(
        t,
        "model: {} layers, {heads}, head dim {}, {} tokens/block, {} bytes/element",
        args.layers, args.head_dim, args.tokens_per_block, args.dtype_bytes
    );
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "{:>8}  {:>8}  {:>12}  {:>12}  {:>14}",
        "gen_rank", "ctx_rank", "layers", "kv heads", "bytes/block"
    );
    for p in &s.pairs {
        let _ = writeln!(
            t,
            "{:>8}  {:>8}  {:>12}  {:>12}  {:>14}",
            p.gen_rank,
            p.ctx_rank,
            format!("[{}, {})", p.layers[0], p.layers[1]),
            format!("[{}, {})", p.heads[0], p.heads[1]),
            pair_bytes(args, p)
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "fragments per block: {} (contiguous copies to move one block to all {gen_world} \
         generation ranks)",
        s.fragments
    );
    let _ = writeln!(
        t,
        "bytes per block:     {} ({}, summed over the generation ranks)",
        s.bytes_per_block,
        human_bytes(s.bytes_per_block)
    );
    t
}

/// The command-line flags behind a layout error, since the core names struct fields
/// (`tp_size`) and the user typed flags (`--gen-tp`).
fn flags_of(e: &PlanError) -> Option<String> {
    let (side, le) = match e {
        PlanError::Context(le) => ("ctx", le),
        PlanError::Generation(le) => ("gen", le),
        _ => return None,
    };
    let flags = match le {
        LayoutError::Zero { field } | LayoutError::TooLarge { field, .. } => match *field {
            "num_layers" => "--layers".to_string(),
            "num_kv_heads" => "--kv-heads".to_string(),
            "head_dim" => "--head-dim".to_string(),
            "tokens_per_block" => "--tokens-per-block".to_string(),
            "dtype_bytes" => "--dtype-bytes".to_string(),
            "tp_size" => format!("--{side}-tp"),
            "pp_size" => format!("--{side}-pp"),
            _ => return None,
        },
        LayoutError::LayersNotDivisible { .. } => format!("--layers, --{side}-pp"),
        LayoutError::HeadsNotDivisible { .. } => format!("--kv-heads, --{side}-tp"),
        LayoutError::MlaHeads { .. } => "--kv-heads, --mla".to_string(),
        _ => return None,
    };
    Some(flags)
}

/// Runs `kvferry plan`: prints the summary as JSON (`--json`) or as a table.
pub fn run(args: &PlanArgs) -> Result<()> {
    // Flatten to one message: the layout errors already say which side and which field, and a
    // context chain would print over several lines.
    let summary = summarize(args).map_err(|e| match flags_of(&e) {
        Some(flags) => anyhow::anyhow!("invalid plan: {e} (check {flags})"),
        None => anyhow::anyhow!("invalid plan: {e}"),
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", render_table(args, &summary));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    #[command(name = "plan")]
    struct Cli {
        #[command(flatten)]
        args: PlanArgs,
    }

    fn parse(line: &str) -> PlanArgs {
        Cli::try_parse_from(std::iter::once("plan").chain(line.split_whitespace()))
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .args
    }

    fn llama70b(ctx_tp: u32, gen_tp: u32) -> String {
        format!(
            "--ctx-tp {ctx_tp} --gen-tp {gen_tp} --layers 80 --kv-heads 8 --head-dim 128 \
             --tokens-per-block 32 --dtype-bytes 2 --json"
        )
    }

    #[test]
    fn tp8_to_tp4_json() {
        let args = parse(&llama70b(8, 4));
        let s = summarize(&args).unwrap();
        // Each gen rank holds 2 heads from 2 context ranks: 2 pairs per gen rank.
        assert_eq!(s.pairs.len(), 8);
        assert_eq!(
            s.pairs[3],
            PlanPair {
                gen_rank: 1,
                ctx_rank: 3,
                layers: [0, 80],
                heads: [3, 4]
            }
        );
        // Per gen rank: 80 layers x K,V x 2 heads from different ranks = 320 fragments.
        assert_eq!(s.fragments, 4 * 320);
        // The full model's block: 80 layers x 2 x 8 heads x 32 tokens x 128 x 2 bytes.
        assert_eq!(s.bytes_per_block, 80 * 2 * 8 * 32 * 128 * 2);
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(
            v["pairs"][0],
            serde_json::json!({"gen_rank": 0, "ctx_rank": 0, "layers": [0, 80], "heads": [0, 1]})
        );
        assert_eq!(v["fragments"], 1280);
        assert_eq!(v["bytes_per_block"], 80 * 2 * 8 * 32 * 128 * 2);
    }

    #[test]
    fn same_parallelism_is_one_fragment_per_rank() {
        let s = summarize(&parse(&llama70b(4, 4))).unwrap();
        assert_eq!(s.fragments, 4);
        assert!(s.pairs.iter().all(|p| p.gen_rank == p.ctx_rank));
    }

    #[test]
    fn pp_split_and_replicated_heads() {
        // 2 kv heads on gen TP4: each head replicated twice, so 4 x 1 head received.
        let args = parse(
            "--ctx-tp 2 --ctx-pp 2 --gen-tp 4 --layers 8 --kv-heads 2 --head-dim 4 \
             --tokens-per-block 2 --dtype-bytes 1",
        );
        let s = summarize(&args).unwrap();
        // Gen rank 3 holds head 1, all 8 layers: from ctx tp rank 1 of both stages.
        let r3: Vec<_> = s.pairs.iter().filter(|p| p.gen_rank == 3).collect();
        assert_eq!(r3.len(), 2);
        assert_eq!(
            (r3[0].ctx_rank, r3[0].layers, r3[0].heads),
            (1, [0, 4], [1, 2])
        );
        assert_eq!(
            (r3[1].ctx_rank, r3[1].layers, r3[1].heads),
            (3, [4, 8], [1, 2])
        );
        // Replicas each receive their copy: 4 ranks x 8 layers x 2 x 1 head x 2 x 4 bytes.
        assert_eq!(s.bytes_per_block, 4 * 8 * 2 * 2 * 4);
        let keys: Vec<_> = s
            .pairs
            .iter()
            .map(|p| (p.gen_rank, p.ctx_rank, p.layers[0], p.heads[0]))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        assert!(render_table(&args, &s).contains("[4, 8)"));
    }

    #[test]
    fn mla_has_one_source_per_gen_rank() {
        let args = parse(
            "--ctx-tp 8 --gen-tp 2 --layers 4 --head-dim 8 --tokens-per-block 2 \
             --dtype-bytes 2 --mla",
        );
        let s = summarize(&args).unwrap();
        assert_eq!(s.pairs.len(), 2);
        assert_ne!(s.pairs[0].ctx_rank, s.pairs[1].ctx_rank);
        assert_eq!(s.fragments, 2);
        assert_eq!(s.bytes_per_block, 2 * 4 * 2 * 8 * 2);
    }

    #[test]
    fn invalid_layouts_are_one_line_errors() {
        let bad = [
            "--ctx-tp 4 --layers 8 --kv-heads 6 --head-dim 4 --tokens-per-block 2 --dtype-bytes 1",
            "--gen-pp 3 --layers 8 --kv-heads 2 --head-dim 4 --tokens-per-block 2 --dtype-bytes 1",
            "--ctx-pp 3 --layers 8 --kv-heads 2 --head-dim 4 --tokens-per-block 2 --dtype-bytes 1",
            "--gen-tp 0 --layers 8 --kv-heads 2 --head-dim 4 --tokens-per-block 2 --dtype-bytes 1",
            "--layers 8 --kv-heads 2 --head-dim 0 --tokens-per-block 2 --dtype-bytes 1",
            "--layers 8 --kv-heads 2 --head-dim 4 --tokens-per-block 2 --dtype-bytes 1 --mla",
        ];
        for line in bad {
            let err = run(&parse(line)).expect_err(line);
            let msg = format!("{err:#}");
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.starts_with("invalid plan: "), "{msg}");
        }
        let msg = format!("{:#}", run(&parse(bad[0])).unwrap_err());
        assert_eq!(
            msg,
            "invalid plan: context layout: num_kv_heads = 6 and tp_size = 4: one must divide \
             the other (check --kv-heads, --ctx-tp)"
        );
        let msg = format!("{:#}", run(&parse(bad[3])).unwrap_err());
        assert_eq!(
            msg,
            "invalid plan: generation layout: tp_size must be at least 1 (check --gen-tp)"
        );
    }

    #[test]
    fn kv_heads_required_without_mla() {
        let r = Cli::try_parse_from(
            "plan --layers 8 --head-dim 4 --tokens-per-block 2 --dtype-bytes 1".split(' '),
        );
        assert!(r.is_err());
    }

    #[test]
    fn help_defines_the_output() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("fragments"), "{help}");
        assert!(help.contains("contiguous copy fragments needed to move one block"));
        assert!(help.contains("summed over the generation instance's ranks"));
    }
}
