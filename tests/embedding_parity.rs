//! Contrastive models equal to transformers: token ids, pixel values, image and text
//! embeddings (each alone and all in one batch) and logits of the fixture CLIP and SigLIP
//! recorded by `scripts/make_fixtures.py embeddings`, compared with Ocellus on the same
//! weights in f32. The real configs (ViT-B/32 CLIP, SigLIP base) run with
//! `OCELLUS_EMBED_PARITY_DIR=DIR` after `make_fixtures.py embeddings-big DIR` (ignored: a
//! 600 MB model).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ocellus::config::WeightDType;
use ocellus::model::Pixels;
use ocellus::model::embedding::Scoring;

const PIXEL_TOLERANCE: f32 = 1e-5;
const EMBED_TOLERANCE: f32 = 1e-4;
const LOGIT_TOLERANCE: f32 = 1e-4;

#[derive(serde::Deserialize)]
struct Reference {
    texts: Vec<String>,
    images: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    logit_scale: f32,
    #[serde(default)]
    logit_bias: Option<f32>,
    image_embeds: Vec<Vec<f32>>,
    image_embeds_alone: Vec<Vec<f32>>,
    text_embeds: Vec<Vec<f32>>,
    text_embeds_alone: Vec<Vec<f32>>,
    logits_per_image: Vec<Vec<f32>>,
    /// BLIP: the match probability of every image with every text.
    #[serde(default)]
    itm_probs: Option<Vec<Vec<f32>>>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn largest_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// The smallest cosine between corresponding rows.
fn smallest_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p * q) as f64).sum::<f64>();
    (a.iter().zip(b))
        .map(|(x, y)| (dot(x, y) / (dot(x, x) * dot(y, y)).sqrt()) as f32)
        .fold(1.0, f32::min)
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

/// Every check of one model against its reference; returns what failed.
fn check(model_dir: &Path, reference_dir: &Path, images_dir: &Path) -> Vec<String> {
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(reference_dir.join("reference.json")).unwrap()).unwrap();
    let loaded = ocellus::runtime::load_embedding_folder(model_dir, WeightDType::F32, &Device::Cpu).unwrap();
    let (model, processor) = (&loaded.model, &loaded.processor);
    let mut failures = Vec::new();

    let ids: Vec<Vec<u32>> = (reference.texts.iter())
        .map(|t| processor.tokenize(t, false).unwrap().ids)
        .collect();
    if ids != reference.input_ids {
        failures.push(format!("token ids {ids:?} != {:?}", reference.input_ids));
    }

    let expected_pixels = candle_core::safetensors::load(reference_dir.join("pixel_values.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("pixel_values")
        .unwrap();
    let pixels: Vec<Pixels> = (reference.images.iter())
        .map(|name| {
            let image = image::open(images_dir.join(name)).unwrap();
            processor.preprocess_image(&image).unwrap().0
        })
        .collect();
    let ours = Tensor::cat(&pixels.iter().map(|p| &p.values).collect::<Vec<_>>(), 0).unwrap();
    let diff: f32 = (ours - &expected_pixels)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    if diff > PIXEL_TOLERANCE {
        failures.push(format!("pixel values differ by {diff}"));
    }

    let refs: Vec<&Pixels> = pixels.iter().collect();
    failures.extend(check_outputs(model_dir, model.as_ref(), &reference, &refs));
    failures
}

/// Embeddings alone and batched, logits and match probabilities, from the inputs.
fn check_outputs(
    model_dir: &Path,
    model: &dyn ocellus::model::embedding::EmbeddingModel,
    reference: &Reference,
    refs: &[&Pixels],
) -> Vec<String> {
    let mut failures = Vec::new();
    let image_batched = rows(&model.embed_images(refs).unwrap());
    let image_alone: Vec<Vec<f32>> = refs
        .iter()
        .map(|p| rows(&model.embed_images(&[p]).unwrap()).remove(0))
        .collect();
    let id_refs: Vec<&[u32]> = reference.input_ids.iter().map(|i| i.as_slice()).collect();
    let text_batched = rows(&model.embed_texts(&id_refs).unwrap());
    let text_alone: Vec<Vec<f32>> = id_refs
        .iter()
        .map(|i| rows(&model.embed_texts(&[i]).unwrap()).remove(0))
        .collect();
    for (name, ours, theirs) in [
        ("image embeddings (batched)", &image_batched, &reference.image_embeds),
        ("image embeddings (alone)", &image_alone, &reference.image_embeds_alone),
        ("text embeddings (batched)", &text_batched, &reference.text_embeds),
        ("text embeddings (alone)", &text_alone, &reference.text_embeds_alone),
        ("batched against alone, images", &image_batched, &image_alone),
        ("batched against alone, texts", &text_batched, &text_alone),
    ] {
        let (diff, cosine) = (largest_difference(ours, theirs), smallest_cosine(ours, theirs));
        eprintln!(
            "{}: {name}: largest difference {diff:.2e}, cosine {cosine:.7}",
            model_dir.display()
        );
        if diff > EMBED_TOLERANCE || cosine < 0.99999 {
            failures.push(format!("{name} differ by {diff} (cosine {cosine})"));
        }
    }

    let scoring = model.info().scoring;
    let expected_scoring = match reference.logit_bias {
        Some(bias) => Scoring::Sigmoid {
            scale: reference.logit_scale,
            bias,
        },
        None => Scoring::Softmax {
            scale: reference.logit_scale,
        },
    };
    if scoring != expected_scoring {
        failures.push(format!("scoring {scoring:?} != {expected_scoring:?}"));
    }
    let logits: Vec<Vec<f32>> = (image_batched.iter())
        .map(|image| {
            (text_batched.iter())
                .map(|text| scoring.logit(image.iter().zip(text).map(|(a, b)| a * b).sum()))
                .collect()
        })
        .collect();
    let diff = largest_difference(&logits, &reference.logits_per_image);
    if diff > LOGIT_TOLERANCE * reference.logit_scale.max(1.0) {
        failures.push(format!("logits differ by {diff}"));
    }
    if let Some(expected) = &reference.itm_probs {
        // Every text against each image, all pairs in one call.
        let texts: Vec<&[u32]> = (0..refs.len()).flat_map(|_| id_refs.iter().copied()).collect();
        let image_of: Vec<usize> = (0..refs.len()).flat_map(|i| vec![i; id_refs.len()]).collect();
        let probs = model.match_pairs(&texts, refs, &image_of).unwrap();
        let probs: Vec<Vec<f32>> = probs.chunks(id_refs.len()).map(|c| c.to_vec()).collect();
        let diff = largest_difference(&probs, expected);
        eprintln!(
            "{}: match probabilities: largest difference {diff:.2e}",
            model_dir.display()
        );
        if diff > LOGIT_TOLERANCE {
            failures.push(format!("match probabilities differ by {diff}"));
        }
    } else if model.match_pairs(&id_refs[..1], &refs[..1], &[0]).is_ok() {
        failures.push("a model without a matching head matched a pair".into());
    }
    failures
}

#[test]
fn tiny_clip_equals_transformers() {
    let root = fixtures();
    let failures = check(
        &root.join("models/tiny-clip"),
        &root.join("reference/tiny-clip"),
        &root.join("images"),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn tiny_siglip_equals_transformers() {
    let root = fixtures();
    let failures = check(
        &root.join("models/tiny-siglip"),
        &root.join("reference/tiny-siglip"),
        &root.join("images"),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn tiny_blip_retrieval_equals_transformers() {
    let root = fixtures();
    let failures = check(
        &root.join("models/tiny-blip-itm"),
        &root.join("reference/tiny-blip-itm"),
        &root.join("images"),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The real ViT-B/32 CLIP and SigLIP base configurations with random weights.
#[test]
#[ignore = "needs OCELLUS_EMBED_PARITY_DIR from `make_fixtures.py embeddings-big`"]
fn real_configs_equal_transformers() {
    let dir = PathBuf::from(std::env::var("OCELLUS_EMBED_PARITY_DIR").expect("OCELLUS_EMBED_PARITY_DIR"));
    let mut failures = Vec::new();
    for name in ["clip-vit-base-patch32", "siglip-base-patch16-224"] {
        let found = check(
            &dir.join(name),
            &dir.join(format!("{name}-reference")),
            &fixtures().join("images"),
        );
        failures.extend(found.into_iter().map(|f| format!("{name}: {f}")));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
