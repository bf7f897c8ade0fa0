//! One decode step after 512 tokens of context, in the text model's storage forms — the
//! default f32 (bf16-valued f32 weights kept in 16 bits), every weight held in f32, and
//! `--quantize q8_0`, each with an f32 KV cache, and f32 and q8_0 with an f16 one (q8_0's
//! default) — at batch 1, 8 and 16, the forms taking turns a few steps at a time.
//! The ratios between forms are what scripts/bench_model.sh reports: measured one form
//! after another, minutes apart, they moved with this machine's memory bandwidth by more
//! than their margins (the same q8_0/f32 ratio came out 1.36 and 1.62 in two runs), and
//! turns of a few steps give every form the same machine.
//!   OCELLUS_BENCH_MODEL=DIR cargo bench --bench decode_forms
//! Prints one JSON object: per batch, each form's median seconds per step.

/// As in the binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use ocellus::config::WeightDType;
use ocellus::kv::{KvPool, KvSpec, SequenceKv, blocks_for};
use ocellus::model::{Quantization, VisionLanguageModel};

mod decode;
use decode::{DECODE_CONTEXT, decode_inputs, prefilled_cache};
/// Turns per batch size; each turn runs every form for `steps_per_turn` steps.
const TURNS: usize = 30;

struct Form {
    name: &'static str,
    model: std::rc::Rc<dyn VisionLanguageModel>,
    kv_dtype: DType,
}

fn forms(dir: &std::path::Path) -> Vec<Form> {
    let load = |as_stored: bool| {
        let load = if as_stored {
            ocellus::runtime::load_folder_as_stored
        } else {
            ocellus::runtime::load_folder
        };
        load(dir, WeightDType::F32, &Device::Cpu)
            .expect("bench model loads")
            .model
    };
    let mut quantized = load(false);
    quantized
        .quantize_text(Quantization::Q8_0)
        .expect("the text model quantizes");
    let (f32, held, q8): (std::rc::Rc<dyn VisionLanguageModel>, _, _) =
        (load(false).into(), load(true).into(), quantized.into());
    let form = |name, model: &std::rc::Rc<dyn VisionLanguageModel>, kv_dtype| Form {
        name,
        model: model.clone(),
        kv_dtype,
    };
    vec![
        form("f32", &f32, DType::F32),
        form("f32_held", &held, DType::F32),
        form("q8_0_kv_f32", &q8, DType::F32),
        form("f32_kv_f16", &f32, DType::F16),
        form("q8_0", &q8, DType::F16),
    ]
}

/// `batch` caches of `DECODE_CONTEXT` tokens of text, each with room for one more.
fn prefilled(model: &dyn VisionLanguageModel, kv_dtype: DType, batch: usize) -> (KvPool, Vec<SequenceKv>) {
    let spec = KvSpec {
        dtype: kv_dtype,
        ..model.kv_spec()
    };
    let mut pool = KvPool::new(&spec, batch * blocks_for(DECODE_CONTEXT + 1)).expect("pool");
    let caches = (0..batch)
        .map(|_| prefilled_cache(model, &mut pool, DECODE_CONTEXT))
        .collect();
    (pool, caches)
}

/// Seconds for one decode step of every cache, from `DECODE_CONTEXT` tokens.
fn step(model: &dyn VisionLanguageModel, pool: &mut KvPool, caches: &mut [SequenceKv]) -> f64 {
    let tokens: Vec<u32> = (0..caches.len() as u32).map(|i| 100 + i).collect();
    let start = Instant::now();
    let mut inputs = decode_inputs(caches, &tokens);
    std::hint::black_box(model.forward(&mut inputs, pool).expect("decode step"));
    start.elapsed().as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var("OCELLUS_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("tests/fixtures/models/tiny-idefics3"));
    let forms = forms(&dir);
    let mut report = serde_json::Map::new();
    for (batch, steps_per_turn) in [(1usize, 10usize), (8, 3), (16, 2)] {
        let mut state: Vec<(KvPool, Vec<SequenceKv>)> = forms
            .iter()
            .map(|form| prefilled(&*form.model, form.kv_dtype, batch))
            .collect();
        // A step of each, unmeasured: first touches of the step's buffers.
        for (form, (pool, caches)) in forms.iter().zip(&mut state) {
            step(&*form.model, pool, caches);
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); forms.len()];
        for _ in 0..TURNS {
            for ((form, (pool, caches)), times) in forms.iter().zip(&mut state).zip(&mut times) {
                times.extend((0..steps_per_turn).map(|_| step(&*form.model, pool, caches)));
            }
        }
        let medians: serde_json::Map<String, serde_json::Value> = forms
            .iter()
            .zip(times)
            .map(|(form, times)| (form.name.to_string(), median(times).into()))
            .collect();
        eprintln!("batch {batch}: {medians:?}");
        report.insert(format!("batch{batch}"), medians.into());
    }
    println!("{}", serde_json::Value::Object(report));
}
