//! `ocellus finetune --method contrastive`: the trainable CLIP and SigLIP compute what the
//! served ones compute (which the parity tests hold to transformers), training lowers the
//! loss on a small set of pairs, and the saved folder loads and serves.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use ocellus::config::{ContrastiveWeights, FinetuneMethod, WeightDType};
use ocellus::model::ModelFiles;
use ocellus::model::weights::SafetensorsWeights;
use ocellus::train::contrastive_model::{Params, TrainClip, TrainContrastive, TrainSiglip, Weights};

const CAPTIONS: [&str; 4] = [
    "a red circle",
    "two blue squares",
    "the digit 7",
    "a green triangle on the left",
];

fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn train_model(dir: &Path) -> TrainContrastive {
    let files = ModelFiles::locate(dir).unwrap();
    let vb = SafetensorsWeights::open(&files.weights)
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let mut params = Params::new(vb, Weights::Full, 0);
    match dir.file_name().unwrap().to_str().unwrap() {
        "tiny-clip" => TrainContrastive::Clip(
            TrainClip::new(
                &ocellus::model::clip::ClipConfig::load(&files.config).unwrap(),
                &mut params,
            )
            .unwrap(),
        ),
        _ => TrainContrastive::Siglip(
            TrainSiglip::new(
                &ocellus::model::siglip::SiglipConfig::load(&files.config).unwrap(),
                &mut params,
            )
            .unwrap(),
        ),
    }
}

#[test]
fn the_trainable_towers_compute_what_the_served_ones_do() {
    for name in ["tiny-clip", "tiny-siglip"] {
        let dir = fixtures().join("models").join(name);
        let served = ocellus::runtime::load_embedding_folder(&dir, WeightDType::F32, &Device::Cpu).unwrap();
        let trainable = train_model(&dir);
        let ids: Vec<Vec<u32>> = CAPTIONS
            .iter()
            .map(|c| served.processor.tokenize(c, false).unwrap().ids)
            .collect();
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let expected = served.model.embed_texts(&refs).unwrap();
        let diff = largest_difference(&trainable.texts(&ids).unwrap(), &expected);
        assert!(diff < 1e-5, "{name} texts: {diff}");
        let pixels: Vec<_> = (0..4)
            .map(|i| {
                let image = image::open(fixtures().join(format!("images/embed-{i}.png"))).unwrap();
                served.processor.preprocess_image(&image).unwrap().0
            })
            .collect();
        let expected = served.model.embed_images(&pixels.iter().collect::<Vec<_>>()).unwrap();
        let batch = Tensor::cat(&pixels.iter().map(|p| &p.values).collect::<Vec<_>>(), 0).unwrap();
        let diff = largest_difference(&trainable.images(&batch).unwrap(), &expected);
        assert!(diff < 1e-5, "{name} images: {diff}");
    }
}

/// Four images with their captions as JSONL in `dir`, in both accepted forms.
fn write_pairs(dir: &Path) -> std::path::PathBuf {
    let mut lines = String::new();
    for (i, caption) in CAPTIONS.iter().enumerate() {
        let image = fixtures().join(format!("images/embed-{i}.png"));
        let line = match i % 2 {
            0 => serde_json::json!({ "image": image.to_str().unwrap(), "text": caption }),
            _ => serde_json::json!({ "messages": [
                { "role": "user", "content": [{ "type": "image_url", "image_url": { "url": image.to_str().unwrap() } }] },
                { "role": "assistant", "content": caption },
            ]}),
        };
        lines.push_str(&format!("{line}\n"));
    }
    let file = dir.join("pairs.jsonl");
    std::fs::write(&file, lines).unwrap();
    file
}

fn args(model: &Path, data: &Path, out: &Path, weights: ContrastiveWeights) -> ocellus::config::FinetuneArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ocellus::config::FinetuneArgs,
    }
    let mut cli = Cli::parse_from([
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        "contrastive",
        "--batch-size",
        "4",
        "--max-steps",
        "25",
        "--lr",
        "3e-3",
    ]);
    cli.args.contrastive_weights = weights;
    assert_eq!(cli.args.method, FinetuneMethod::Contrastive);
    cli.args
}

#[test]
fn training_lowers_the_loss_and_the_result_serves() {
    let scratch = tempfile::tempdir().unwrap();
    let data = write_pairs(scratch.path());
    for (name, weights) in [
        ("tiny-clip", ContrastiveWeights::Full),
        ("tiny-siglip", ContrastiveWeights::Full),
        ("tiny-clip", ContrastiveWeights::Lora),
    ] {
        let model = fixtures().join("models").join(name);
        let out = scratch.path().join(format!("{name}-{weights:?}"));
        let summary = ocellus::train::finetune(&args(&model, &data, &out, weights)).unwrap();
        assert_eq!(summary.steps, 25);
        assert!(
            summary.last_loss < summary.first_loss * 0.5,
            "{name} {weights:?}: {} -> {}",
            summary.first_loss,
            summary.last_loss
        );
        // The saved folder loads and embeds differently from the base, and every caption is
        // now nearest its own image.
        let trained = ocellus::runtime::load_embedding_folder(&out, WeightDType::F32, &Device::Cpu).unwrap();
        let ids: Vec<Vec<u32>> = CAPTIONS
            .iter()
            .map(|c| trained.processor.tokenize(c, false).unwrap().ids)
            .collect();
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let texts = trained.model.embed_texts(&refs).unwrap();
        let pixels: Vec<_> = (0..4)
            .map(|i| {
                let image = image::open(fixtures().join(format!("images/embed-{i}.png"))).unwrap();
                trained.processor.preprocess_image(&image).unwrap().0
            })
            .collect();
        let images = trained.model.embed_images(&pixels.iter().collect::<Vec<_>>()).unwrap();
        let similarity = images.matmul(&texts.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in similarity.iter().enumerate() {
            let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            assert_eq!(best, i, "{name} {weights:?}: {similarity:?}");
        }
    }
}
