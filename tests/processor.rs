//! The real SmolVLM-256M-Instruct processor files (config, tokenizer, chat template from
//! ../shared/reference; no weights) against transformers' processor: token ids and pixel
//! values for small, wide, tall, RGBA, grayscale, multi-image, multi-turn and photo cases.

mod common;

use common::*;
use ocellus::model::ModelFiles;
use ocellus::model::smolvlm::SmolVlmConfig;
use ocellus::processor::{ImageInput, Processor};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct ProcessorCase {
    messages: Vec<serde_json::Value>,
    do_image_splitting: bool,
    prompt: String,
    input_ids: Vec<u32>,
    pixel_shape: Option<Vec<usize>>,
    pixel_sha256: Option<String>,
}

#[derive(Deserialize)]
struct ProcessorReference {
    cases: std::collections::BTreeMap<String, ProcessorCase>,
}

/// The reference folder has no weights; the processor does not need them, but a model
/// folder must name some, so a temporary copy gets an empty stand-in.
fn real_processor() -> (tempfile::TempDir, Processor) {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(shared_reference().join("smolvlm-256m-instruct")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
    let files = ModelFiles::locate(dir.path()).unwrap();
    let info = SmolVlmConfig::load(&files.config).unwrap().info();
    let processor = Processor::load(&files, &info).unwrap();
    (dir, processor)
}

fn pixel_digest(values: &[f32]) -> String {
    let mut hasher = Sha256::new();
    for v in values {
        hasher.update(v.to_le_bytes());
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn real_smolvlm_processor_matches_transformers() {
    let path = fixtures().join("reference").join("smolvlm-256m-processor.json");
    let reference: ProcessorReference = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (_dir, processor) = real_processor();
    // Twice over: the second time every image comes from the preprocessing cache, and must
    // still be transformers' pixels.
    processor.set_preprocess_cache_bytes(1 << 30);
    let mut failures = Vec::new();
    let mut images_sent = 0;
    for (name, case) in reference.cases.iter().chain(&reference.cases) {
        let (messages, images) = openai_messages(&case.messages, &fixtures());
        images_sent += images.len() as u64;
        let rendered = processor.render(&messages).unwrap();
        if rendered != case.prompt {
            failures.push(format!("{name}: rendered {rendered:?}, expected {:?}", case.prompt));
        }
        let prompt = processor
            .process(&messages, &image_inputs(images, case.do_image_splitting))
            .unwrap();
        if prompt.token_ids != case.input_ids {
            failures.push(format!("{name}: token ids differ"));
        }
        if let (Some(shape), Some(digest)) = (&case.pixel_shape, &case.pixel_sha256) {
            let values = pixel_values(&prompt);
            let tiles: usize = prompt.images.iter().map(|i| i.pixels.values.dim(0).unwrap()).sum();
            let dims = [&[tiles][..], &prompt.images[0].pixels.values.dims()[1..]].concat();
            if dims != shape.as_slice() || &pixel_digest(&values) != digest {
                failures.push(format!("{name}: pixel values differ (shape {dims:?} vs {shape:?})"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let (hits, misses) = processor.preprocess_cache_stats();
    assert!(
        hits >= images_sent / 2 && hits + misses == images_sent,
        "{hits} hits, {misses} misses"
    );
}

#[test]
fn a_640x480_photo_is_four_by_three_tiles_plus_a_global_view() {
    let (_dir, processor) = real_processor();
    let photo = ocellus::processor::open_image(&fixtures().join("images").join("photo.png")).unwrap();
    let messages = vec![ocellus::processor::ChatMessage {
        role: "user".into(),
        content: vec![ocellus::processor::ContentPart::Image],
        ..Default::default()
    }];
    let prompt = processor.process(&messages, &[ImageInput::new(photo)]).unwrap();
    assert_eq!(prompt.images[0].pixels.values.dim(0).unwrap(), 13);
    assert_eq!(prompt.token_ids.iter().filter(|&&t| t == 49190).count(), 832);
    // The newline after the last tile row and the one before the global view merge into
    // the single token "\n\n" (1116).
    assert_eq!(prompt.token_ids.iter().filter(|&&t| t == 1116).count(), 1);
}

#[test]
fn text_typed_as_an_image_placeholder_is_refused() {
    let (_dir, processor) = real_processor();
    let messages = vec![ocellus::processor::ChatMessage::text("user", "what is <image> here?")];
    let err = processor.process(&messages, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            ocellus::processor::ProcessorError::ImageCount {
                placeholders: 1,
                images: 0
            }
        ),
        "{err}"
    );
}
