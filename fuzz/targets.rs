//! The fuzz targets' bodies, shared by the libFuzzer binaries (fuzz/fuzz_targets/) and the
//! corpus replay CI runs (tests/fuzz_corpus.rs). Each takes any bytes and must neither panic
//! nor run away: refusing the input is the expected outcome.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use ocellus::media::{Fetched, MediaLimits, decode_image, open_video, probe_image};
use ocellus::openai::{self, ChatCompletionRequest, CompletionRequest, SamplingFields, fields};
use ocellus::processor::prepare::template_messages;
use ocellus::processor::{ChatMessage, ContentPart, Processor, TemplateFunction, TemplateToolCall};

#[path = "../tests/common/sse.rs"]
pub mod sse;

const LIMITS: openai::Limits = openai::Limits {
    max_n: 4,
    max_stop_sequences: 4,
    max_top_logprobs: 5,
    max_images_per_request: 8,
    max_videos_per_request: 2,
    max_video_frames: 64,
    max_image_budget_pixels: 4_000_000,
    max_embedding_inputs: 16,
    max_schema_depth: 16,
};

/// The fixture models' processors (SmolVLM's template and Qwen3-VL's, which renders tools).
fn processors() -> &'static [Processor] {
    static PROCESSORS: OnceLock<Vec<Processor>> = OnceLock::new();
    PROCESSORS.get_or_init(|| {
        // Built as the fuzz crate (fuzz/) or, for the corpus replay, as the main crate's test.
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let checkout = if crate_dir.join("tests/fixtures").is_dir() {
            crate_dir
        } else {
            &crate_dir.join("..")
        };
        let root = checkout.join("tests/fixtures/models");
        ["tiny-idefics3", "tiny-qwen3vl"]
            .iter()
            .map(|name| {
                let dir = root.join(name);
                ocellus::runtime::load_folder_as_stored(
                    &dir,
                    ocellus::config::WeightDType::F32,
                    &candle_core::Device::Cpu,
                )
                .expect("the fixture models load")
                .processor
            })
            .collect()
    })
}

/// A request body through every route's validation; a valid chat rendered by the templates.
pub fn request(data: &[u8]) {
    let Ok(body) = openai::parse_json(data) else {
        return;
    };
    chat(&body);
    if let Ok(translated) = openai::responses::translate(&body) {
        chat(&translated.chat);
        let _ = translated.names.rename(&body.to_string());
    }
    let _ = openai::tokenize::tokenize(&body);
    if let (Ok(()), Ok(request), Ok(sampling)) = (
        fields::check(&body, fields::COMPLETION),
        openai::from_json::<CompletionRequest>(&body),
        openai::from_json::<SamplingFields>(&body),
    ) {
        let _ = openai::completion(&request, &sampling, &LIMITS, 1088);
    }
}

fn chat(body: &serde_json::Value) {
    if fields::check(body, fields::CHAT).is_err() {
        return;
    }
    let (Ok(request), Ok(sampling)) = (
        openai::from_json::<ChatCompletionRequest>(body),
        openai::from_json::<SamplingFields>(body),
    ) else {
        return;
    };
    let Ok(chat) = openai::chat(&request, &sampling, &LIMITS, 1088) else {
        return;
    };
    let messages = template_messages(&chat.messages);
    let tools: Vec<serde_json::Value> = (chat.tools.iter())
        .flat_map(|t| &t.tools)
        .map(|t| t.as_json())
        .collect();
    for processor in processors() {
        let _ = processor.render_conversation(&messages, &tools, true);
    }
}

/// Hostile content straight into the templates: the input's pieces (split at NUL) as
/// messages of every role, with names, calls and call ids made of it too.
pub fn template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let pieces: Vec<&str> = text.split('\0').take(12).collect();
    let roles = ["system", "user", "assistant", "tool", "developer", "user"];
    let messages: Vec<ChatMessage> = (pieces.iter().enumerate())
        .map(|(i, piece)| {
            let role = roles[piece.len() % roles.len()];
            let mut message = ChatMessage::text(role, piece);
            if i % 3 == 1 {
                message.content.insert(0, ContentPart::Image);
            }
            if role == "assistant" && piece.len() % 2 == 0 {
                message.tool_calls.push(TemplateToolCall {
                    id: piece.chars().take(8).collect(),
                    kind: "function",
                    function: TemplateFunction {
                        name: piece.chars().rev().take(8).collect(),
                        arguments: serde_json::from_str(piece).unwrap_or(serde_json::Value::String(piece.to_string())),
                    },
                });
            }
            if role == "tool" {
                message.tool_call_id = Some(piece.chars().take(8).collect());
            }
            message
        })
        .collect();
    let tools: Vec<serde_json::Value> = serde_json::from_str(pieces.last().unwrap_or(&"")).unwrap_or_default();
    for processor in processors() {
        let _ = processor.render_conversation(&messages, &tools, pieces.len().is_multiple_of(2));
    }
}

/// An image's header probed, and the image decoded when the header passes.
pub fn image(data: &[u8]) {
    let fetched = Fetched {
        bytes: data.to_vec(),
        declared_type: None,
    };
    let limits = MediaLimits {
        max_image_pixels: 4_000_000,
        max_video_seconds: 60.0,
    };
    if let Ok(header) = probe_image(&fetched, &limits) {
        let _ = decode_image(&fetched, &header);
    }
}

/// A video container opened from memory, and its first frames decoded.
pub fn video(data: &[u8]) {
    let fetched = Fetched {
        bytes: data.to_vec(),
        declared_type: None,
    };
    let limits = MediaLimits {
        max_image_pixels: 1_000_000,
        max_video_seconds: 60.0,
    };
    if let Ok(source) = open_video(&fetched, &limits) {
        let wanted = source.meta.total_frames.min(4);
        for frame in source.frames((0..wanted).collect()) {
            let _ = frame;
        }
    }
}

/// The SSE reader on any text, and on what a server writes: each piece of the input (split
/// at U+0001, line breaks made spaces) as one event's data reads back as it was.
pub fn sse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = sse::parse(&text);
    let pieces: Vec<String> = text.split('\u{1}').map(|p| p.replace(['\r', '\n'], " ")).collect();
    let body: String = pieces.iter().map(|p| format!("event: e\ndata: {p}\n\n")).collect();
    let read: Vec<String> = sse::parse(&body).into_iter().map(|e| e.data).collect();
    assert_eq!(read, pieces);
}
