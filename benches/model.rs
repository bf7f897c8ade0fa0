//! Model micro-benchmarks: vision encode per tile, prefill, one decode step at batch 1, 8
//! and 16, and at batch 8 with LoRA adapters (none, one, four mixed). The model is the committed tiny fixture unless OCELLUS_BENCH_MODEL names a folder
//! (e.g. the SmolVLM-256M-shaped model from `scripts/make_fixtures.py big`); the dtype is
//! OCELLUS_BENCH_DTYPE (f32); OCELLUS_BENCH_QUANTIZE=q8_0 quantizes the text model;
//! OCELLUS_BENCH_STORAGE=as-loaded keeps f32 weights in f32 even where they are exactly bf16.
//! Threads: RAYON_NUM_THREADS. scripts/bench_model.sh runs these next to transformers on the
//! same model.

use std::path::PathBuf;

/// As in the binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{Device, Tensor};
use clap::ValueEnum;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ocellus::config::{QuantizationArg, WeightDType};
use ocellus::engine::Prompt;
use ocellus::kv::{KvPool, SequenceKv, blocks_for};
use ocellus::model::lora::Adapter;
use ocellus::model::{ImageFeatures, Pixels, Quantization, SequenceInput};
use ocellus::processor::{ChatMessage, ContentPart, ImageInput, open_image};
use ocellus::runtime::Loaded;

mod decode;
use decode::{DECODE_CONTEXT, decode_inputs, prefilled_cache};

/// Tiles encoded together per iteration (a 640x480 photo has 13 on SmolVLM-256M; 4 keeps
/// a bench run short while still batching tiles as a request does).
const TILE_BATCH: usize = 4;

fn load() -> Loaded {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var("OCELLUS_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("tests/fixtures/models/tiny-idefics3"));
    let dtype = std::env::var("OCELLUS_BENCH_DTYPE").unwrap_or_else(|_| "f32".into());
    let dtype = WeightDType::from_str(&dtype, true).expect("OCELLUS_BENCH_DTYPE is f32, bf16 or f16");
    // OCELLUS_BENCH_STORAGE=as-loaded: every weight in f32, even those that are exactly bf16.
    let as_loaded = std::env::var("OCELLUS_BENCH_STORAGE").is_ok_and(|s| s == "as-loaded");
    let load = if as_loaded {
        ocellus::runtime::load_folder_as_stored
    } else {
        ocellus::runtime::load_folder
    };
    let mut loaded = load(&dir, dtype, &Device::Cpu).expect("bench model loads");
    if let Some(q) = std::env::var("OCELLUS_BENCH_QUANTIZE").ok().filter(|q| !q.is_empty()) {
        let QuantizationArg::Q8_0 = QuantizationArg::from_str(&q, true).expect("OCELLUS_BENCH_QUANTIZE is q8_0");
        loaded
            .model
            .quantize_text(Quantization::Q8_0)
            .expect("the text model quantizes");
    }
    loaded
}

/// One 640x480 photo and a question: 13 tiles on SmolVLM-256M.
fn photo_prompt(loaded: &Loaded) -> Prompt {
    let photo = open_image(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/photo.png")).unwrap();
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: vec![
            ContentPart::Image,
            ContentPart::Text {
                text: "Can you describe this image?".into(),
            },
        ],
        ..ChatMessage::default()
    }];
    loaded.processor.process(&messages, &[ImageInput::new(photo)]).unwrap()
}

/// The machine's f32 GEMM roofline as candle reaches it (2048³, as the peer script measures
/// torch): the higher of the two is the hardware's figure.
fn gemm(c: &mut Criterion) {
    const N: usize = 2048;
    let a = Tensor::randn(0f32, 1.0, (N, N), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (N, N), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("gemm");
    group.sample_size(10);
    group.throughput(Throughput::Elements((2 * N * N * N) as u64));
    group.bench_function(BenchmarkId::new("f32", N), |bench| {
        bench.iter(|| ocellus::model::on_compute_pool(|| a.matmul(&b).unwrap()))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let loaded = load();
    let model = loaded.model.as_ref();
    let prompt = photo_prompt(&loaded);
    let photo = &prompt.images[0].pixels;
    let first_tiles = |n: usize| Pixels {
        values: photo.values.narrow(0, 0, n).unwrap(),
        grid: None,
    };

    let mut group = c.benchmark_group("vision");
    group.sample_size(10);
    let tile = first_tiles(1);
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_1_tile", |b| {
        b.iter(|| model.encode_images(&[&tile], None).unwrap())
    });
    let tiles = first_tiles(TILE_BATCH.min(photo.values.dim(0).unwrap()));
    let count = tiles.values.dim(0).unwrap();
    group.throughput(Throughput::Elements(count as u64));
    group.bench_function(BenchmarkId::new("encode_tiles", count), |b| {
        b.iter(|| model.encode_images(&[&tiles], None).unwrap())
    });
    group.finish();

    let features: ImageFeatures = model.encode_images(&[photo], None).unwrap().remove(0);
    let mut group = c.benchmark_group("prefill");
    group.sample_size(10);
    group.throughput(Throughput::Elements(prompt.token_ids.len() as u64));
    let n = prompt.token_ids.len();
    let mut pool = KvPool::new(&model.kv_spec(), blocks_for(n) + 16 * blocks_for(DECODE_CONTEXT + 1)).unwrap();
    let mut kv = SequenceKv::default();
    assert!(pool.grow(&mut kv, n));
    group.bench_function(BenchmarkId::new("photo_prompt_tokens", n), |b| {
        b.iter(|| {
            kv.truncate(0);
            let input = SequenceInput {
                tokens: &prompt.token_ids,
                positions: None,
                image_features: Some(features.clone()),
                kv: &mut kv,
                wants_logits: true,
                adapter: None,
            };
            model.forward(&mut [input], &mut pool).unwrap()
        })
    });
    group.finish();

    decode(c, model, &mut pool);
    decode_with_adapters(c, model, &mut pool);
}

/// One decode step after `DECODE_CONTEXT` tokens, at batch 1, 8 and 16.
fn decode(c: &mut Criterion, model: &dyn ocellus::model::VisionLanguageModel, pool: &mut KvPool) {
    let mut group = c.benchmark_group("decode_step");
    for batch in [1usize, 8, 16] {
        let mut caches: Vec<SequenceKv> = (0..batch)
            .map(|_| prefilled_cache(model, pool, DECODE_CONTEXT))
            .collect();
        let tokens: Vec<u32> = (0..batch as u32).map(|i| 100 + i).collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("batch", batch), |b| {
            b.iter(|| model.forward(&mut decode_inputs(&mut caches, &tokens), pool).unwrap())
        });
        for mut kv in caches {
            pool.release(&mut kv);
        }
    }
    group.finish();
}

/// Batch 8 with LoRA adapters (rank 8 on every projection): none, one for every row, and
/// four adapters two rows each: what serving several adapters at once costs.
fn decode_with_adapters(c: &mut Criterion, model: &dyn ocellus::model::VisionLanguageModel, pool: &mut KvPool) {
    let adapters: Vec<Adapter> = (0..4).map(|i| random_adapter(model, i)).collect();
    let mut group = c.benchmark_group("decode_step_lora_batch_8");
    let batch = 8;
    let mut caches: Vec<SequenceKv> = (0..batch)
        .map(|_| prefilled_cache(model, pool, DECODE_CONTEXT))
        .collect();
    let tokens: Vec<u32> = (0..batch as u32).map(|i| 100 + i).collect();
    group.throughput(Throughput::Elements(batch as u64));
    let mixes: [(&str, Vec<Option<&Adapter>>); 3] = [
        ("base", vec![None; batch]),
        ("one_adapter", vec![Some(&adapters[0]); batch]),
        ("four_adapters", (0..batch).map(|i| Some(&adapters[i / 2])).collect()),
    ];
    for (name, rows) in &mixes {
        group.bench_function(*name, |b| {
            b.iter(|| {
                let mut inputs = decode_inputs(&mut caches, &tokens);
                for (input, adapter) in inputs.iter_mut().zip(rows) {
                    input.adapter = *adapter;
                }
                model.forward(&mut inputs, pool).unwrap()
            })
        });
    }
    group.finish();
}

/// A rank-8 PEFT adapter on every projection of `model`, random weights, loaded as served.
fn random_adapter(model: &dyn ocellus::model::VisionLanguageModel, seed: u64) -> Adapter {
    let layout = model.adapter_layout();
    let dir = std::env::temp_dir().join(format!("ocellus-bench-lora-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for spec in layout.slots.iter().flatten() {
        let name = format!("base_model.model.{}", spec.name);
        let a = Tensor::randn(0f32, 0.02, (8, spec.in_features), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 0.02, (spec.out_features, 8), &Device::Cpu).unwrap();
        tensors.insert(format!("{name}.lora_A.weight"), a);
        tensors.insert(format!("{name}.lora_B.weight"), b);
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16}"#,
    )
    .unwrap();
    let adapter = Adapter::load("bench", &dir, &layout, 64, model.dtype(), model.device()).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    adapter
}

criterion_group!(model_benches, gemm, benches);
criterion_main!(model_benches);
