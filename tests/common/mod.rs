//! Shared by the integration tests: the fixture models and transformers' reference
//! outputs recorded by scripts/make_fixtures.py.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::DynamicImage;
use ocellus::config::WeightDType;
use ocellus::engine::{EngineConfig, EngineCore, GenerationRequest, Prompt};
use ocellus::kv::{KvPool, SequenceKv, blocks_for};
use ocellus::model::{Detail, ImageFeatures, ProcessedMedia, SequenceInput, VideoInfo, VisionLanguageModel};
use ocellus::processor::{ChatMessage, ContentPart, ImageInput, Processor, open_image};
use ocellus::runtime::{KvBudget, Loaded};
use serde::Deserialize;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

pub fn shared_reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared")
        .join("reference")
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub messages: Vec<serde_json::Value>,
    /// SmolVLM's cases only; others take the model's own preprocessing.
    #[serde(default = "yes")]
    pub do_image_splitting: bool,
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub greedy_tokens: Vec<u32>,
    /// Per video, the frames transformers sampled.
    #[serde(default)]
    pub frame_indices: Vec<Vec<usize>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct ReferenceFile {
    cases: std::collections::BTreeMap<String, Case>,
}

/// A fixture root (tests/fixtures, or the folder `make_fixtures.py big` wrote), holding
/// models/<name>, reference/<name>.{json,safetensors} and images/.
pub struct Reference {
    pub root: PathBuf,
    pub cases: std::collections::BTreeMap<String, Case>,
    pub tensors: HashMap<String, Tensor>,
}

impl Reference {
    pub fn load(root: &Path, model: &str) -> Self {
        let json = root.join("reference").join(format!("{model}.json"));
        let parsed: ReferenceFile = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(
            root.join("reference").join(format!("{model}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        Self {
            root: root.to_path_buf(),
            cases: parsed.cases,
            tensors,
        }
    }

    pub fn model_dir(root: &Path, model: &str) -> PathBuf {
        root.join("models").join(model)
    }

    /// Transformers' pixel values: stored raw (SmolVLM2's video frames), or as their lossless
    /// u8 levels (under Pillow's or torchvision's normalisation).
    pub fn pixel_values(&self, case: &str) -> Option<Vec<f32>> {
        for key in ["pixel_values", "pixel_values_videos"] {
            if let Some(raw) = self.tensors.get(&format!("{case}.{key}")) {
                return Some(raw.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
        }
        // torchvision's normalisation (Qwen3-VL): (u8 - 127.5) / 127.5 in f32.
        if let Some(levels) = self.tensors.get(&format!("{case}.pixel_levels_torch")) {
            let levels = levels.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            return Some(levels.iter().map(|&l| (l as f32 - 127.5) / 127.5).collect());
        }
        let levels = self.tensors.get(&format!("{case}.pixel_levels"))?;
        let levels = levels.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        Some(
            levels
                .iter()
                .map(|&l| ((l as f64 * 0.00392156862745098) as f32 - 0.5) / 0.5)
                .collect(),
        )
    }

    pub fn logits(&self, case: &str) -> Vec<f32> {
        self.tensors[&format!("{case}.logits")].to_vec1().unwrap()
    }

    /// The case's OpenAI-style messages as the processor takes them, and its images.
    pub fn inputs(&self, case: &Case) -> (Vec<ChatMessage>, Vec<DynamicImage>) {
        openai_messages(&case.messages, &self.root)
    }
}

/// A `video_url` part of a fixture case: the file and the part's sampling overrides.
pub struct VideoPart {
    pub path: PathBuf,
    pub fps: Option<f64>,
    pub max_frames: Option<usize>,
}

/// The `video_url` parts of OpenAI-style messages, files relative to `root`.
pub fn video_parts(messages: &[serde_json::Value], root: &Path) -> Vec<VideoPart> {
    messages
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|p| p["type"] == "video_url")
        .map(|p| VideoPart {
            path: root.join(p["video_url"]["url"].as_str().unwrap()),
            fps: p["video_url"]["fps"].as_f64(),
            max_frames: p["video_url"]["max_frames"].as_u64().map(|n| n as usize),
        })
        .collect()
}

/// A video file decoded and sampled as the server does it (the part's overrides, else the
/// model's defaults): the frames picked, and the video as the family processes it.
pub fn decode_fixture_video(processor: &Processor, part: &VideoPart) -> (Vec<usize>, ProcessedMedia) {
    let family = processor.video().expect("a processor that takes videos");
    let defaults = family.default_sampling();
    let sampling = ocellus::model::FrameSampling {
        fps: part.fps.unwrap_or(defaults.fps),
        max_frames: part.max_frames.unwrap_or(defaults.max_frames),
    };
    let fetched = ocellus::media::Fetched {
        bytes: std::fs::read(&part.path).unwrap(),
        declared_type: None,
    };
    let limits = ocellus::media::MediaLimits {
        max_image_pixels: 1 << 24,
        max_video_seconds: 3600.0,
    };
    let source = ocellus::media::open_video(&fetched, &limits).unwrap();
    let info = VideoInfo {
        total_frames: source.meta.total_frames,
        fps: source.meta.fps,
        duration: source.meta.duration,
        width: source.meta.width,
        height: source.meta.height,
    };
    let indices = family.sample_frames(&info, &sampling);
    let frames =
        ocellus::processor::video::preprocess_frames(family, source.frames(indices.clone()), indices.len()).unwrap();
    let video = family.finish(frames, &info, &indices).unwrap();
    (indices, video)
}

/// Maps OpenAI chat messages (content as a string or parts) onto the processor's types,
/// opening `image_url` parts as files relative to `root` (videos: see `video_parts`).
pub fn openai_messages(messages: &[serde_json::Value], root: &Path) -> (Vec<ChatMessage>, Vec<DynamicImage>) {
    let mut images = Vec::new();
    let messages = messages
        .iter()
        .map(|m| {
            let role = m["role"].as_str().unwrap().to_string();
            let content = match &m["content"] {
                serde_json::Value::String(text) => vec![ContentPart::Text { text: text.clone() }],
                serde_json::Value::Array(parts) => parts
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "text" => ContentPart::Text {
                            text: p["text"].as_str().unwrap().to_string(),
                        },
                        "image_url" => {
                            images.push(open_image(&root.join(p["image_url"]["url"].as_str().unwrap())).unwrap());
                            ContentPart::Image
                        }
                        "video_url" => ContentPart::Video,
                        other => panic!("unexpected part {other}"),
                    })
                    .collect(),
                other => panic!("unexpected content {other}"),
            };
            ChatMessage {
                role,
                content,
                ..ChatMessage::default()
            }
        })
        .collect();
    (messages, images)
}

pub fn load_fixture_model(name: &str) -> Loaded {
    ocellus::runtime::load_folder(&fixtures().join("models").join(name), WeightDType::F32, &Device::Cpu).unwrap()
}

/// The images of a fixture case as the processor takes them: `do_image_splitting: false`
/// cases are low detail (one view); the fixture models split by default.
pub fn image_inputs(images: Vec<DynamicImage>, do_image_splitting: bool) -> Vec<ImageInput> {
    let detail = if do_image_splitting { Detail::Auto } else { Detail::Low };
    images
        .into_iter()
        .map(|image| ImageInput::with_detail(image, detail))
        .collect()
}

pub fn prompt_for(processor: &Processor, reference: &Reference, case: &Case) -> Prompt {
    let (messages, images) = reference.inputs(case);
    let mut images = image_inputs(images, case.do_image_splitting);
    // A part's own pixel budget, as the API reads `image_url.min_pixels` / `max_pixels`.
    let parts = (case.messages.iter())
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|p| p["type"] == "image_url");
    for (input, part) in images.iter_mut().zip(parts) {
        let pixels = |key: &str| part["image_url"][key].as_u64().map(|n| n as usize);
        input.options.min_pixels = pixels("min_pixels");
        input.options.max_pixels = pixels("max_pixels");
    }
    let (sampled, videos): (Vec<Vec<usize>>, Vec<ProcessedMedia>) = video_parts(&case.messages, &reference.root)
        .iter()
        .map(|part| decode_fixture_video(processor, part))
        .unzip();
    assert_eq!(sampled, case.frame_indices, "sampled frames differ from transformers'");
    let text = processor.render(&messages).unwrap();
    processor.process_rendered(&text, &images, videos).unwrap()
}

/// All the pixel values of a prompt, image after image.
pub fn pixel_values(prompt: &Prompt) -> Vec<f32> {
    (prompt.images.iter())
        .flat_map(|i| i.pixels.values.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Greedy, exactly `tokens` tokens: the recorded references used min_new_tokens too.
pub fn greedy(prompt: Prompt, tokens: usize) -> GenerationRequest {
    let mut request = GenerationRequest::greedy(prompt, tokens);
    request.params.min_tokens = tokens;
    request
}

/// An engine over a loaded model with room for `kv_blocks` blocks, prefix caching on.
pub fn engine(loaded: Loaded, max_batch_tokens: usize, kv_blocks: usize) -> (Processor, EngineCore) {
    engine_with(loaded, max_batch_tokens, kv_blocks, true)
}

pub fn engine_with(
    loaded: Loaded,
    max_batch_tokens: usize,
    kv_blocks: usize,
    prefix_caching: bool,
) -> (Processor, EngineCore) {
    let config = EngineConfig {
        max_num_seqs: 64,
        max_batch_tokens,
        max_model_len: loaded.model.info().max_positions,
        vision_cache_bytes: 64 << 20,
        prefix_caching,
    };
    let tokens = kv_blocks * ocellus::kv::BLOCK_TOKENS;
    loaded.into_engine(config, KvBudget::Tokens(tokens)).unwrap()
}

/// The logits after the whole prompt, straight from the model.
pub fn first_step_logits(model: &dyn VisionLanguageModel, prompt: &Prompt) -> Vec<f32> {
    first_step_logits_kv(model, model.kv_spec().dtype, prompt)
}

/// `first_step_logits` with a KV cache of `kv_dtype`.
pub fn first_step_logits_kv(
    model: &dyn VisionLanguageModel,
    kv_dtype: candle_core::DType,
    prompt: &Prompt,
) -> Vec<f32> {
    first_step_logits_with(model, kv_dtype, prompt, None)
}

/// The prompt's next-token logits with a LoRA adapter (or none), KV in `kv_dtype`.
pub fn first_step_logits_with(
    model: &dyn VisionLanguageModel,
    kv_dtype: candle_core::DType,
    prompt: &Prompt,
    adapter: Option<&ocellus::model::lora::Adapter>,
) -> Vec<f32> {
    let features = adapted_features(model, prompt, adapter);
    let n = prompt.token_ids.len();
    let spec = ocellus::kv::KvSpec {
        dtype: kv_dtype,
        ..model.kv_spec()
    };
    let mut pool = KvPool::new(&spec, blocks_for(n)).unwrap();
    let mut kv = SequenceKv::default();
    assert!(pool.grow(&mut kv, n));
    let mut batch = [SequenceInput {
        tokens: &prompt.token_ids,
        positions: prompt.positions.as_ref(),
        image_features: features,
        kv: &mut kv,
        wants_logits: true,
        adapter,
    }];
    model
        .forward(&mut batch, &mut pool)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The vision features of all a prompt's images, in order (`None` without images).
pub fn prompt_features(model: &dyn VisionLanguageModel, prompt: &Prompt) -> Option<ImageFeatures> {
    adapted_features(model, prompt, None)
}

/// `prompt_features` under a LoRA adapter (which may change the vision tower).
pub fn adapted_features(
    model: &dyn VisionLanguageModel,
    prompt: &Prompt,
    adapter: Option<&ocellus::model::lora::Adapter>,
) -> Option<ImageFeatures> {
    let pixels: Vec<_> = prompt.images.iter().map(|i| &i.pixels).collect();
    (!pixels.is_empty()).then(|| {
        let encoded = model.encode_images(&pixels, adapter).unwrap();
        ImageFeatures::cat(&encoded.iter().collect::<Vec<_>>()).unwrap()
    })
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub mod http;
pub mod sse;

/// A fixture model folder copied into a temporary directory, to break.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Why a folder does not load (it must not).
pub fn load_error(dir: &Path) -> String {
    match ocellus::runtime::load_folder(dir, WeightDType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(err) => err.to_string(),
    }
}

/// Rewrites a JSON file through `edit`.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string(&value).unwrap()).unwrap();
}

/// A Python with the official openai package (scripts/test.sh installs one).
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("OCELLUS_TEST_PYTHON") {
        return python.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    assert!(
        venv.is_file(),
        "no Python with the openai package: run scripts/test.sh (it installs one into target/test-venv) \
         or set OCELLUS_TEST_PYTHON"
    );
    venv
}
