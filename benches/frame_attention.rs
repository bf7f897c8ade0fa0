//! The vision encoders' attention on one layer's shapes — Qwen3-VL-2B on a 1024x768 image
//! (3072 patches, 16 heads of 64) and SmolVLM-256M on one tile (1024 patches, 12 heads of
//! 64) — `ops::frame_attention` against the same computation composed of candle's ops (a
//! head and a block of queries per matmul, as the encoders did before), taking turns; ours
//! with 4 MB (the encoders'), 1 MB and 16 MB of scores per task.
//!   RAYON_NUM_THREADS=2 cargo bench --bench frame_attention
//! Prints one JSON object: each side's median seconds and GFLOP/s.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use ocellus::model::ops::{frame_attention, kernels};

/// (name, patches, heads)
const SHAPES: [(&str, usize, usize); 2] = [("qwen3vl_2b_1024x768", 3072, 16), ("smolvlm_256m_tile", 1024, 12)];
const HEAD_DIM: usize = 64;
const SCORES_BYTES: usize = 4 << 20;
const TURNS: usize = 7;

/// The encoders' former path: per head, blocks of queries through candle's matmul.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (patches, heads, _) = q.dims3()?;
    let (q, k, v) = (
        q.transpose(0, 1)?.contiguous()?,
        k.transpose(0, 1)?.contiguous()?,
        v.transpose(0, 1)?.contiguous()?,
    );
    let block = (SCORES_BYTES / (patches * 4)).min(patches);
    let mut per_head = Vec::new();
    for h in 0..heads {
        let (q, kt, v) = (q.narrow(0, h, 1)?, k.narrow(0, h, 1)?.t()?, v.narrow(0, h, 1)?);
        let mut blocks = Vec::new();
        for start in (0..patches).step_by(block) {
            let scores = q.narrow(1, start, block.min(patches - start))?.matmul(&kt)?;
            kernels::softmax_last_dim_in_place(&scores)?;
            blocks.push(scores.matmul(&v)?);
        }
        per_head.push(Tensor::cat(&blocks, 1)?);
    }
    Tensor::cat(&per_head, 0)?
        .transpose(0, 1)?
        .reshape((patches, heads * HEAD_DIM))
}

fn main() -> Result<()> {
    // `cargo test --all-targets` runs this without `--bench`: then an eighth of the patches
    // and one turn, to check that it runs, not to time it.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let mut report = serde_json::Map::new();
    for (name, patches, heads) in SHAPES {
        let (patches, turns) = if smoke { (patches / 8, 1) } else { (patches, TURNS) };
        report.insert(name.into(), measure(patches, heads, turns)?);
    }
    println!("{}", serde_json::Value::Object(report));
    Ok(())
}

fn measure(patches: usize, heads: usize, turns: usize) -> Result<serde_json::Value> {
    let qkv = Tensor::randn(0f32, 1.0, (patches, 3, heads, HEAD_DIM), &Device::Cpu)?;
    let part = |i| qkv.narrow(1, i, 1).and_then(|t| t.squeeze(1));
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let flops = 4.0 * (patches * patches * heads * HEAD_DIM) as f64;
    let sizes = [SCORES_BYTES, 1 << 20, 16 << 20];
    let (mut ours, mut theirs) = (vec![Vec::new(); sizes.len()], Vec::new());
    for _ in 0..turns {
        for (times, &bytes) in ours.iter_mut().zip(&sizes) {
            let start = Instant::now();
            std::hint::black_box(frame_attention::attention(&q, &k, &v, &[patches], bytes)?);
            times.push(start.elapsed().as_secs_f64());
        }
        let start = Instant::now();
        std::hint::black_box(composed(&q, &k, &v)?);
        theirs.push(start.elapsed().as_secs_f64());
    }
    let median = |mut t: Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let mut report = serde_json::Map::new();
    for (times, bytes) in ours.into_iter().zip(sizes) {
        let s = median(times);
        report.insert(
            format!("frame_attention_scores_{}k", bytes >> 10),
            serde_json::json!({"s": s, "gflop_s": flops / s / 1e9}),
        );
    }
    let s = median(theirs);
    report.insert(
        "candle_composed".into(),
        serde_json::json!({"s": s, "gflop_s": flops / s / 1e9}),
    );
    Ok(serde_json::Value::Object(report))
}
