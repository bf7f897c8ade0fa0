//! Fine-tuning data: one conversation per row (a JSONL line, a Parquet row: `dataset`) in
//! OpenAI's chat format, `{"messages": [{"role": "user", "content": [{"type": "image_url",
//! "image_url": {"url": "photos/1.png"}}, {"type": "text", "text": "..."}]}, {"role":
//! "assistant", "content": "..."}]}`, or TRL's (`messages` with `{"type": "image"}` parts and
//! `images`: `columns`). Images are paths (relative to the file's folder), `file://` URLs or
//! `data:` URIs. A conversation becomes the tokens the server would give it and, as TRL's
//! SFT trains VLMs with an assistant-only loss, the assistant turns (with their end-of-turn
//! token) as the only targets. Every error names the file and row.

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use serde_json::Value;

use super::columns;
use super::dataset::{Dataset, Location, Row};
use crate::openai::{self, ChatMessageIn, Message};
use crate::processor::local::{LocalImageLimits, read_image};
use crate::processor::prepare::{image_options, template_messages};
use crate::processor::{ChatMessage, ImageInput, Processor};

/// One conversation, tokenized.
pub struct Example {
    /// Where it is in its file.
    pub at: Location,
    pub token_ids: Vec<u32>,
    /// `targets[t]`: token `t` is an assistant token, predicted from the tokens before it.
    pub targets: Vec<bool>,
    /// Every image's tiles, in order, `[tiles, 3, S, S]`.
    pub pixel_values: Option<Tensor>,
    /// Its image tokens' features, computed once when the vision encoder is frozen (then
    /// `pixel_values` is dropped).
    pub features: Option<Tensor>,
}

impl Example {
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t).count()
    }
}

/// Bounds on one example (`ocellus finetune` flags).
#[derive(Debug, Clone, Copy)]
pub struct DataLimits {
    /// Most tokens per conversation, image tokens included.
    pub max_seq_len: usize,
    pub max_images: usize,
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
}

impl DataLimits {
    /// The API's message checks, as they apply here: images, no videos.
    pub(crate) fn messages(&self) -> openai::Limits {
        openai::Limits {
            max_n: 1,
            max_stop_sequences: 0,
            max_top_logprobs: 0,
            max_images_per_request: self.max_images,
            max_videos_per_request: 0,
            max_video_frames: 0,
            // Training data sets no pixel budget of its own: the model's applies.
            max_image_budget_pixels: 0,
            max_embedding_inputs: 0,
            max_schema_depth: 0,
        }
    }

    pub(crate) fn images(&self) -> LocalImageLimits {
        LocalImageLimits {
            max_bytes: self.max_image_bytes,
            max_pixels: self.max_image_pixels,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{file}: {at}: {message}")]
    Row {
        file: PathBuf,
        at: Location,
        message: String,
    },
    #[error("{file}: {message}")]
    Format { file: PathBuf, message: String },
    #[error("{file}: no examples")]
    Empty { file: PathBuf },
}

/// Reads and tokenizes every conversation of `dataset`.
pub fn load(dataset: &Dataset, processor: &Processor, limits: &DataLimits) -> Result<Vec<Example>, DataError> {
    dataset.rows(|row| parse_row(row, processor, limits))
}

fn parse_row(row: Row, processor: &Processor, limits: &DataLimits) -> Result<Example, String> {
    let mut row_columns = row.columns;
    let messages = columns::with_images(&mut row_columns, "messages")?;
    let messages: Vec<ChatMessageIn> =
        serde_json::from_value(Value::Array(messages)).map_err(|e| format!("`messages`: {e}"))?;
    conversation(&messages, 0, row.at, row.folder, processor, limits)
}

/// A conversation tokenized as the server would, its targets the tokens of its assistant
/// turns from message `first_target` on (0: all of them; a preference pair's completion:
/// those after its prompt).
pub(crate) fn conversation(
    input: &[ChatMessageIn],
    first_target: usize,
    at: Location,
    folder: &Path,
    processor: &Processor,
    limits: &DataLimits,
) -> Result<Example, String> {
    let validated =
        openai::messages(input, &limits.messages(), openai::PixelBudget::default()).map_err(|e| e.to_string())?;
    let messages = template_messages(&validated);
    let assistant_turns: Vec<usize> = (messages.iter().enumerate())
        .filter(|(i, m)| m.role == "assistant" && *i >= first_target)
        .map(|(i, _)| i)
        .collect();
    if assistant_turns.is_empty() {
        return Err("no assistant message: there is nothing to learn from".into());
    }
    let images = read_images(&validated, folder, limits)?;
    let tokens = |messages: &[ChatMessage], generation_prompt: bool| -> Result<Vec<u32>, String> {
        let text = (processor.render_with(messages, generation_prompt)).map_err(|e| e.to_string())?;
        let shown = count_images(messages);
        let prompt = (processor.process_rendered(&text, &images[..shown], Vec::new())).map_err(|e| e.to_string())?;
        Ok(prompt.token_ids)
    };
    let full = processor.render_with(&messages, false).map_err(|e| e.to_string())?;
    let prompt = processor
        .process_rendered(&full, &images, Vec::new())
        .map_err(|e| e.to_string())?;
    let n = prompt.token_ids.len();
    if n > limits.max_seq_len {
        return Err(format!(
            "{n} tokens (images included), over the limit of {} (--max-seq-len)",
            limits.max_seq_len
        ));
    }
    // An assistant turn's tokens are those the conversation up to it gains past the
    // generation prompt; where tokenization merges across that boundary, from the first
    // token that differs.
    let mut targets = vec![false; n];
    for &turn in &assistant_turns {
        let before = tokens(&messages[..turn], true)?;
        let through = tokens(&messages[..=turn], false)?;
        let start = common_prefix(&before, &prompt.token_ids);
        let end = common_prefix(&through, &prompt.token_ids).max(start);
        targets[start..end].iter_mut().for_each(|t| *t = true);
    }
    targets[0] = false;
    if !targets.iter().any(|&t| t) {
        return Err("the assistant messages render to no tokens".into());
    }
    let tiles: Vec<Tensor> = prompt.images.iter().map(|i| i.pixels.values.clone()).collect();
    let pixel_values = match tiles.is_empty() {
        true => None,
        false => Some(Tensor::cat(&tiles, 0).map_err(|e| e.to_string())?),
    };
    Ok(Example {
        at,
        token_ids: prompt.token_ids,
        targets,
        pixel_values,
        features: None,
    })
}

/// The images of validated messages, read from paths relative to `folder`, `file://` URLs
/// or `data:` URIs; an error names the part.
pub(crate) fn read_images(messages: &[Message], folder: &Path, limits: &DataLimits) -> Result<Vec<ImageInput>, String> {
    (messages.iter().flat_map(Message::images))
        .map(|part| {
            let image = read_image(&part.url, folder, &limits.images()).map_err(|e| format!("{}: {e}", part.param))?;
            Ok(ImageInput {
                image,
                options: image_options(part),
            })
        })
        .collect()
}

fn count_images(messages: &[ChatMessage]) -> usize {
    (messages.iter().flat_map(|m| &m.content))
        .filter(|p| matches!(p, crate::processor::ContentPart::Image))
        .count()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
