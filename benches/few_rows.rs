//! The text model's projections at decode batch sizes, kernel by kernel: one Qwen3-VL-2B
//! decoder layer's four projections (fused QKV, output, fused gate/up, down) with random
//! weights, in each storage form the server uses (dense f32, f32 kept as exact bf16, Q8_0),
//! at 1 to 1024 rows, the forms taking turns; and `few_rows`' kernels for f32 and bf16 at
//! every row count, to place `Proj`'s switch to gemm. Two layers' weights are cycled so that
//! every step reads its weights from memory, as a decode step does.
//!   RAYON_NUM_THREADS=2 cargo bench --bench few_rows
//! (`OCELLUS_BENCH_ROWS=1,16` and `OCELLUS_BENCH_FORMS=f32,q8_0` to run some of them.)
//! Then the head over the vocabulary (bf16-kept and q8_0) at 1 and 16 rows.
//! Prints one JSON object: per rows and form, the median milliseconds for one layer and the
//! GFLOP/s it reached.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use ocellus::model::ops::{few_rows, proj::Proj};

/// One projection in one form: through `Proj` (the server's choice of kernel by rows) or
/// straight into `few_rows` at any rows (to compare its range with gemm's).
enum Layer {
    Proj(Proj),
    FewRowsF32(Tensor),
    FewRowsBf16(Tensor),
}

impl Layer {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Self::Proj(proj) => proj.forward(xs).unwrap(),
            Self::FewRowsF32(weight) => few_rows::linear(xs, weight).unwrap(),
            Self::FewRowsBf16(weight) => few_rows::linear_bf16(xs, weight).unwrap(),
        }
    }
}

/// `[out, in]` of Qwen3-VL-2B's projections: QKV (16 + 2x8 heads of 128), o, gate/up, down.
const SHAPES: [(usize, usize); 4] = [(4096, 2048), (2048, 2048), (12288, 2048), (2048, 6144)];
/// The tied head: the vocabulary by the hidden size.
const HEAD: (usize, usize) = (151936, 2048);
const LAYERS: usize = 2;
const TURNS: usize = 15;

fn layer(form: &str, shapes: &[(usize, usize)]) -> Vec<Layer> {
    shapes
        .iter()
        .map(|&(out, width)| {
            // bf16-valued weights, as a bf16 checkpoint loaded in f32 has.
            let weight = (Tensor::randn(0f32, 0.02, (out, width), &Device::Cpu).unwrap())
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            match form {
                "f32_few_rows" => return Layer::FewRowsF32(weight),
                "bf16_few_rows" => return Layer::FewRowsBf16(weight.to_dtype(DType::BF16).unwrap()),
                _ => {}
            }
            let mut proj = Proj::Dense(Linear::new(weight, None));
            match form {
                "f32" => {}
                "f32_exact_bf16" => assert!(proj.compact().unwrap()),
                "q8_0" => assert!(proj.quantize_q8_0().unwrap()),
                other => panic!("no form {other}"),
            }
            Layer::Proj(proj)
        })
        .collect()
}

/// `all`, or those of them named in `OCELLUS_BENCH_<what>` (commas between).
fn chosen(what: &str, all: Vec<&'static str>) -> Vec<&'static str> {
    match std::env::var(format!("OCELLUS_BENCH_{what}")) {
        Ok(names) => all.into_iter().filter(|a| names.split(',').any(|n| n == *a)).collect(),
        Err(_) => all,
    }
}

/// `cargo test --all-targets` runs this without `--bench`: then shapes an eighth as wide
/// and one turn, to check that it runs, not to time it.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// `shape` (outputs, inputs), narrowed in a smoke run.
fn sized((out, width): (usize, usize)) -> (usize, usize) {
    match smoke() {
        true => (out / 8, width / 8),
        false => (out, width),
    }
}

fn main() {
    let shapes = SHAPES.map(sized);
    let head = sized(HEAD);
    let turns = if smoke() { 1 } else { TURNS };
    let all_forms = ["f32", "f32_few_rows", "f32_exact_bf16", "bf16_few_rows", "q8_0"];
    let forms = chosen("FORMS", all_forms.to_vec());
    let layers: Vec<Vec<Vec<Layer>>> = forms
        .iter()
        .map(|f| (0..LAYERS).map(|_| layer(f, &shapes)).collect())
        .collect();
    let flops_per_row: f64 = shapes.iter().map(|&(o, i)| 2.0 * (o * i) as f64).sum();
    let mut report = BTreeMap::new();
    let all_rows = ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1024"];
    for rows in chosen("ROWS", all_rows.to_vec())
        .iter()
        .map(|r| r.parse::<usize>().unwrap())
    {
        let inputs: Vec<Tensor> = shapes
            .iter()
            .map(|&(_, width)| Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).unwrap())
            .collect();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); forms.len()];
        for _ in 0..turns {
            for (f, form_layers) in layers.iter().enumerate() {
                for layer in form_layers {
                    let start = Instant::now();
                    for (proj, xs) in layer.iter().zip(&inputs) {
                        std::hint::black_box(proj.forward(xs));
                    }
                    times[f].push(start.elapsed().as_secs_f64());
                }
            }
        }
        let mut per_form = BTreeMap::new();
        for (form, mut t) in forms.iter().zip(times) {
            t.sort_by(f64::total_cmp);
            let median = t[t.len() / 2];
            per_form.insert(
                *form,
                serde_json::json!({
                    "ms": median * 1e3,
                    "gflop_s": flops_per_row * rows as f64 / median / 1e9,
                }),
            );
        }
        report.insert(format!("rows_{rows}"), per_form);
    }
    head_report(&mut report, head, turns);
}

/// The tied head over Qwen3-VL's vocabulary, in the forms a bf16 checkpoint takes, at 1 and
/// 16 rows.
fn head_report(report: &mut BTreeMap<String, BTreeMap<&str, serde_json::Value>>, head: (usize, usize), turns: usize) {
    let head_forms = ["f32_exact_bf16", "q8_0"];
    let heads: Vec<Vec<Layer>> = head_forms.iter().map(|f| layer(f, &[head])).collect();
    for rows in [1usize, 16] {
        let xs = Tensor::randn(0f32, 1.0, (rows, head.1), &Device::Cpu).unwrap();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); head_forms.len()];
        for _ in 0..turns {
            for (head, times) in heads.iter().zip(&mut times) {
                let start = Instant::now();
                std::hint::black_box(head[0].forward(&xs));
                times.push(start.elapsed().as_secs_f64());
            }
        }
        let mut per_form = BTreeMap::new();
        for (form, mut t) in head_forms.iter().zip(times) {
            t.sort_by(f64::total_cmp);
            let median = t[t.len() / 2];
            let flops = 2.0 * (head.0 * head.1 * rows) as f64;
            per_form.insert(
                *form,
                serde_json::json!({"ms": median * 1e3, "gflop_s": flops / median / 1e9}),
            );
        }
        report.insert(format!("head_rows_{rows}"), per_form);
    }
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
