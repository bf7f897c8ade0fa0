//! Contrastive models' throughput: images and texts embedded per second at a batch of
//! `OCELLUS_BENCH_BATCH` (32), through the model as the embedding engine calls it
//! (`embed_images`, `embed_texts`), on OCELLUS_BENCH_MODEL (the CLIP- or SigLIP-shaped folder
//! from `scripts/make_fixtures.py embeddings-big`; the tiny CLIP fixture otherwise). The
//! images are the fixture images preprocessed by the family's processor, cycled; the texts
//! are demo captions, tokenized as requests are. Prints one JSON line; threads:
//! RAYON_NUM_THREADS. `scripts/bench_embeddings.sh` runs it in turns with transformers'
//! `get_image_features` / `get_text_features` on the same model and inputs.

use std::path::PathBuf;
use std::time::Instant;

/// As in the binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::Device;
use ocellus::config::WeightDType;
use ocellus::model::Pixels;

/// The captions `ocellus demo-data` writes, a text per kind of question.
pub const CAPTIONS: &[&str] = &[
    "two red squares",
    "a blue triangle on the left",
    "the digit 7",
    "a small green circle at the top right of the picture",
    "three yellow stars next to each other",
    "a photo of a cat sitting on a wooden chair in the sun",
];

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn timed(repeats: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    median(
        (0..repeats)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model_dir = std::env::var_os("OCELLUS_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("tests/fixtures/models/tiny-clip"));
    let batch: usize = std::env::var("OCELLUS_BENCH_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(32);
    let repeats: usize = std::env::var("OCELLUS_BENCH_REPEATS")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(5);
    let loaded = ocellus::runtime::load_embedding_folder(&model_dir, WeightDType::F32, &Device::Cpu).unwrap();
    let images: Vec<Pixels> = (0..4)
        .map(|i| {
            let image = image::open(root.join(format!("tests/fixtures/images/embed-{i}.png"))).unwrap();
            loaded.processor.preprocess_image(&image).unwrap().0
        })
        .collect();
    let images: Vec<&Pixels> = (0..batch).map(|i| &images[i % images.len()]).collect();
    let texts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            loaded
                .processor
                .tokenize(CAPTIONS[i % CAPTIONS.len()], false)
                .unwrap()
                .ids
        })
        .collect();
    let texts: Vec<&[u32]> = texts.iter().map(|t| t.as_slice()).collect();
    let image_s = timed(repeats, || {
        loaded.model.embed_images(&images).unwrap();
    });
    let text_s = timed(repeats, || {
        loaded.model.embed_texts(&texts).unwrap();
    });
    println!(
        "{}",
        serde_json::json!({
            "impl": "ocellus",
            "batch": batch,
            "images_per_s": batch as f64 / image_s,
            "texts_per_s": batch as f64 / text_s,
        })
    );
}
