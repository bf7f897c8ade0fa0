//! From a request to what the engine takes (`engine::Prompt`): the model's chat template,
//! its tokenizer, and the family's input processor (`model::InputProcessor`: pixels and
//! placeholder text for each image and video). `prepare` is the whole path for a validated
//! OpenAI request, media fetched and decoded through `media/`; `Processor::process` is the
//! same for messages and images already in hand (the CLI, fine-tuning, tests).

pub mod cache;
pub mod embed;
pub mod error;
pub mod local;
pub mod prepare;
pub mod pyjson;
pub mod template;
pub mod tools;
pub mod video;

use std::path::Path;
use std::sync::Arc;

use ::image::DynamicImage;
use tokenizers::Tokenizer;

pub use error::{PrepareError, ProcessorError};
pub use prepare::{PrepareLimits, PrepareObserver, Prepared, Preparer};
pub use template::{ChatMessage, ChatTemplate, ContentPart, TemplateFunction, TemplateTokens, TemplateToolCall};

use crate::engine::constraint::{Grammar, GrammarSpec, Grammars};
use crate::engine::{Prompt, PromptImage};
use crate::model::files::read_json;
use crate::model::{
    Detail, ImageOptions, InputProcessor, LoadError, ModelFiles, ModelInfo, ProcessedMedia, VideoProcessor,
};
use crate::openai::structured::{Constrained, OutputConstraint};

/// An image of a request and how to show it to the model.
#[derive(Debug, Clone)]
pub struct ImageInput {
    pub image: DynamicImage,
    pub options: ImageOptions,
}

impl ImageInput {
    pub fn new(image: DynamicImage) -> Self {
        Self {
            image,
            options: ImageOptions::default(),
        }
    }

    pub fn with_detail(image: DynamicImage, detail: Detail) -> Self {
        Self {
            image,
            options: detail.into(),
        }
    }
}

pub struct Processor {
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    input: Box<dyn InputProcessor>,
    eos_token_ids: Vec<u32>,
    /// The compiler of output grammars for this tokenizer; `None` where llguidance cannot
    /// read the tokenizer (constrained requests are then refused).
    grammars: Option<Arc<Grammars>>,
    /// Off (0 bytes) until `set_preprocess_cache_bytes`.
    preprocessed: cache::PreprocessCache,
}

impl Processor {
    /// The processor of a located folder, for a model described by `info`.
    pub fn load(files: &ModelFiles, info: &ModelInfo) -> Result<Self, LoadError> {
        let input = crate::model::load_input_processor(files)?;
        let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| LoadError::Tokenizer {
            file: files.tokenizer.clone(),
            message: e.to_string(),
        })?;
        let tokenizer_config: serde_json::Value = match &files.tokenizer_config {
            Some(path) => read_json(path)?,
            None => serde_json::Value::Null,
        };
        let token = |name: &str| special_token(&tokenizer_config, name);
        let tokens = TemplateTokens {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            unk_token: token("unk_token"),
        };
        let video_template = input.video().and_then(|v| v.chat_template());
        let template = ChatTemplate::load(files.require_chat_template()?, tokens.clone(), video_template)?;
        let placeholder = input.image_placeholder();
        let image_token_id = tokenizer.token_to_id(placeholder);
        if !image_token_id.is_some_and(|id| info.is_image_token(id)) {
            return Err(LoadError::invalid(
                &files.config,
                "image_token_id",
                format!(
                    "is {:?} but the tokenizer's {placeholder} is {image_token_id:?}",
                    info.image_token_ids
                ),
            ));
        }
        let tokenizer_vocab = tokenizer.get_vocab_size(true);
        if tokenizer_vocab > info.vocab_size {
            return Err(LoadError::Tokenizer {
                file: files.tokenizer.clone(),
                message: format!(
                    "has {tokenizer_vocab} tokens, more than the model's vocab_size {}",
                    info.vocab_size
                ),
            });
        }
        let eos_token_ids = eos_token_ids(files, &tokenizer, tokens.eos_token.as_deref())?;
        let grammars = grammars(files, &tokenizer, info.vocab_size, &eos_token_ids);
        Ok(Self {
            grammars,
            tokenizer: Arc::new(tokenizer),
            template,
            input,
            eos_token_ids,
            preprocessed: cache::PreprocessCache::new(0),
        })
    }

    /// The request's output constraint compiled (found in the cache, most often). A large
    /// schema takes milliseconds: call it off the async workers.
    pub fn grammar(&self, constrained: Option<&Constrained>) -> Result<Option<Arc<Grammar>>, PrepareError> {
        let Some(constrained) = constrained else {
            return Ok(None);
        };
        let refused = |message: String| PrepareError::Grammar {
            message,
            param: constrained.param.clone(),
        };
        let grammars =
            (self.grammars.as_ref()).ok_or_else(|| refused("this model's tokenizer cannot be constrained".into()))?;
        let spec = match &constrained.constraint {
            OutputConstraint::JsonSchema(schema) => GrammarSpec::JsonSchema(schema.clone()),
            OutputConstraint::Regex(regex) => GrammarSpec::Regex(regex.clone()),
            OutputConstraint::Choice(choices) => {
                let escaped: Vec<String> = choices.iter().map(|c| regex::escape(c)).collect();
                GrammarSpec::Regex(format!("({})", escaped.join("|")))
            }
            OutputConstraint::Grammar(lark) => GrammarSpec::Lark(lark.clone()),
        };
        grammars.compile(&spec).map(Some).map_err(|e| refused(e.0))
    }

    /// Keep up to `bytes` of preprocessed images for requests that send them again.
    pub fn set_preprocess_cache_bytes(&self, bytes: usize) {
        self.preprocessed.set_capacity(bytes);
    }

    /// The preprocessing cache's (hits, misses).
    pub fn preprocess_cache_stats(&self) -> (u64, u64) {
        self.preprocessed.stats()
    }

    /// The family's input processor.
    pub fn input(&self) -> &dyn InputProcessor {
        self.input.as_ref()
    }

    /// The family's video processor, if the model takes videos.
    pub fn video(&self) -> Option<&dyn VideoProcessor> {
        self.input.video()
    }

    /// Tokens that end generation (generation_config.json's `eos_token_id`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Shared with the engine, which detokenizes as it generates.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Renders the chat template with the generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ProcessorError> {
        self.render_with(messages, true)
    }

    /// Renders the chat template, with the generation prompt or without (a finished
    /// conversation, as fine-tuning reads it).
    pub fn render_with(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ProcessorError> {
        self.render_conversation(messages, &[], add_generation_prompt)
    }

    /// Renders a conversation that may offer `tools` (OpenAI's shape), hold calls and their
    /// answers: by the model's template where it renders tools, else as the generic tool
    /// prompt (`tools::rewrite`) through it.
    pub fn render_conversation(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, ProcessorError> {
        if messages.is_empty() {
            return Err(ProcessorError::NoMessages);
        }
        if let Some(index) = (messages.iter()).position(|m| m.content.is_empty() && m.tool_calls.is_empty()) {
            return Err(ProcessorError::EmptyContent { index });
        }
        let with_tools = !tools.is_empty() || (messages.iter()).any(|m| !m.tool_calls.is_empty() || m.role == "tool");
        if with_tools && !self.template.renders_tools() {
            return (self.template).render(&tools::rewrite(messages, tools), &[], add_generation_prompt);
        }
        self.template.render(messages, tools, add_generation_prompt)
    }

    /// An image as the family preprocesses it, from the cache when it was seen before.
    pub fn preprocess_image(&self, input: &ImageInput) -> Result<ProcessedMedia, ProcessorError> {
        self.preprocessed.get_or_insert(&input.image, &input.options, || {
            (self.input.preprocess_image(&input.image, &input.options))
                .map_err(|e| ProcessorError::Pixels { message: e.to_string() })
        })
    }

    /// The whole processor for messages and images in hand: template, images, placeholder
    /// expansion, tokenization.
    pub fn process(&self, messages: &[ChatMessage], images: &[ImageInput]) -> Result<Prompt, ProcessorError> {
        let text = self.render(messages)?;
        self.process_rendered(&text, images, Vec::new())
    }

    /// A conversation already rendered by the chat template, its images, and its videos
    /// already processed: each placeholder becomes its media's text, then tokens.
    pub fn process_rendered(
        &self,
        text: &str,
        images: &[ImageInput],
        videos: Vec<ProcessedMedia>,
    ) -> Result<Prompt, ProcessorError> {
        let images = (images.iter())
            .map(|input| self.preprocess_image(input))
            .collect::<Result<Vec<_>, _>>()?;
        self.expand(text, images, videos)
    }

    /// Replaces each placeholder of the rendered text by its media's text and tokenizes;
    /// the media's items, in the order the prompt holds them, become the prompt's images.
    pub fn expand(
        &self,
        text: &str,
        images: Vec<ProcessedMedia>,
        videos: Vec<ProcessedMedia>,
    ) -> Result<Prompt, ProcessorError> {
        let image_placeholder = self.input.image_placeholder();
        let video_placeholder = self.video().map(|v| v.placeholder());
        if !videos.is_empty() && video_placeholder.is_none() {
            return Err(ProcessorError::VideosNotSupported);
        }
        let pieces = split_at_placeholders(text, image_placeholder, video_placeholder);
        let count = |kind| pieces.iter().filter(|(_, k)| *k == Some(kind)).count();
        let (image_slots, video_slots) = (count(Placeholder::Image), count(Placeholder::Video));
        if image_slots != images.len() {
            return Err(ProcessorError::ImageCount {
                placeholders: image_slots,
                images: images.len(),
            });
        }
        if video_slots != videos.len() {
            return Err(ProcessorError::VideoCount {
                placeholders: video_slots,
                videos: videos.len(),
            });
        }
        let (mut images, mut videos) = (images.into_iter(), videos.into_iter());
        let mut expanded = String::with_capacity(text.len());
        let mut prompt_images = Vec::new();
        for (piece, kind) in pieces {
            expanded.push_str(piece);
            let media = match kind {
                None => continue,
                Some(Placeholder::Image) => images.next(),
                Some(Placeholder::Video) => videos.next(),
            };
            let media = media.expect("placeholders and media were counted above. This is a bug.");
            expanded.push_str(&media.text);
            prompt_images.extend(media.items.into_iter().map(|item| PromptImage {
                pixels: item.pixels,
                key: item.key,
                tokens: item.tokens,
            }));
        }
        let token_ids = self.tokenize(&expanded)?;
        let grids: Vec<[usize; 3]> = prompt_images.iter().filter_map(|i| i.pixels.grid).collect();
        let positions = self.input.positions(&token_ids, &grids);
        Ok(Prompt {
            token_ids,
            images: prompt_images,
            positions,
        })
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ProcessorError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ProcessorError::Tokenizer { message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ProcessorError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ProcessorError::Tokenizer { message: e.to_string() })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Image,
    Video,
}

/// The rendered text cut at each placeholder: pieces of text, each followed by the
/// placeholder that ended it (`None` after the last).
fn split_at_placeholders<'a>(text: &'a str, image: &str, video: Option<&str>) -> Vec<(&'a str, Option<Placeholder>)> {
    let mut pieces = Vec::new();
    let mut rest = text;
    loop {
        let image_at = rest.find(image).map(|i| (i, Placeholder::Image, image.len()));
        let video_at = video.and_then(|v| rest.find(v).map(|i| (i, Placeholder::Video, v.len())));
        let next = match (image_at, video_at) {
            (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        let Some((at, kind, len)) = next else { break };
        pieces.push((&rest[..at], Some(kind)));
        rest = &rest[at + len..];
    }
    pieces.push((rest, None));
    pieces
}

/// A special token of tokenizer_config.json: a string, or an AddedToken object.
fn special_token(config: &serde_json::Value, name: &str) -> Option<String> {
    match config.get(name)? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}

/// `eos_token_id` is an integer or a list of integers in HF configs.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
enum EosTokenIds {
    One(u32),
    Many(Vec<u32>),
}

/// generation_config.json's `eos_token_id` (one id or a list); without that file, the
/// tokenizer's eos token.
fn eos_token_ids(files: &ModelFiles, tokenizer: &Tokenizer, eos_token: Option<&str>) -> Result<Vec<u32>, LoadError> {
    if let Some(path) = &files.generation_config {
        #[derive(serde::Deserialize)]
        struct GenerationConfig {
            eos_token_id: Option<EosTokenIds>,
        }
        match read_json::<GenerationConfig>(path)?.eos_token_id {
            Some(EosTokenIds::One(id)) => return Ok(vec![id]),
            Some(EosTokenIds::Many(ids)) => return Ok(ids),
            None => {}
        }
    }
    let id = eos_token.and_then(|t| tokenizer.token_to_id(t));
    id.map(|id| vec![id]).ok_or_else(|| {
        let file = files
            .generation_config
            .clone()
            .unwrap_or_else(|| files.dir.join("generation_config.json"));
        LoadError::invalid(
            &file,
            "eos_token_id",
            "no end-of-sequence token: neither here nor in tokenizer_config.json",
        )
    })
}

/// Opens an image file the way the CLI and tests need it; the server's media layer does
/// its own bounded decoding.
pub fn open_image(path: &Path) -> Result<DynamicImage, ::image::ImageError> {
    ::image::ImageReader::open(path)?.with_guessed_format()?.decode()
}

/// The grammar compiler for this tokenizer, or `None` (with a warning) where llguidance
/// cannot read it: the model still serves unconstrained requests.
fn grammars(files: &ModelFiles, tokenizer: &Tokenizer, vocab_size: usize, eos: &[u32]) -> Option<Arc<Grammars>> {
    let built = std::fs::read_to_string(&files.tokenizer)
        .map_err(anyhow::Error::from)
        .and_then(|json| Grammars::new(&json, tokenizer.clone(), vocab_size, eos));
    match built {
        Ok(grammars) => Some(Arc::new(grammars)),
        Err(error) => {
            tracing::warn!(%error, "constrained decoding is off: the tokenizer could not be read for it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_split_the_text_in_order() {
        let pieces = split_at_placeholders("a<image>b<video>c<image>", "<image>", Some("<video>"));
        let kinds: Vec<_> = pieces.iter().map(|(_, k)| *k).collect();
        assert_eq!(
            kinds,
            [
                Some(Placeholder::Image),
                Some(Placeholder::Video),
                Some(Placeholder::Image),
                None
            ]
        );
        let text: Vec<&str> = pieces.iter().map(|(t, _)| *t).collect();
        assert_eq!(text, ["a", "b", "c", ""]);
        // A family without videos leaves `<video>` as text.
        let pieces = split_at_placeholders("<video><image>", "<image>", None);
        assert_eq!(pieces[0], ("<video>", Some(Placeholder::Image)));
    }
}
