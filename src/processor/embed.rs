//! Inputs of a contrastive model: a text becomes token ids under its family's rules
//! (`TextRules`: CLIP's tokenizer as is; SigLIP's canonicalised and padded to 64), an
//! image becomes the family's pixels. A text longer than the model's positions is refused
//! unless the request asks to truncate it, as transformers' `truncation=True` does (the
//! first tokens kept, the end token still last).

use std::sync::Arc;

use image::DynamicImage;
use tokenizers::{Tokenizer, TruncationParams};

use super::PrepareError;
use crate::engine::embed::EmbedItem;
use crate::media::{MediaFetcher, MediaLimits, MediaPool, decode_image, probe_image};
use crate::model::embedding::{EmbeddingInputs, TextRules};
use crate::model::{ContentKey, LoadError, ModelFiles, Pixels};
use crate::openai::embeddings::{EmbedInput, Located};

/// A text as the model takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedText {
    pub ids: Vec<u32>,
    /// Its own tokens, padding excluded (what `usage` counts).
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("the text has {tokens} tokens, more than this model's {max}; send `truncate: true` to cut it")]
    TooLong { tokens: usize, max: usize },
    #[error("an empty list of token ids")]
    NoTokens,
    #[error("token id {id} is not in the model's vocabulary of {vocab}")]
    UnknownToken { id: u32, vocab: usize },
    #[error("tokenization failed: {0}")]
    Tokenizer(String),
}

pub struct EmbedProcessor {
    tokenizer: Tokenizer,
    /// The same, cutting to `max_tokens`.
    truncating: Tokenizer,
    inputs: Box<dyn EmbeddingInputs>,
}

impl EmbedProcessor {
    pub fn load(files: &ModelFiles) -> Result<Self, LoadError> {
        let family = crate::model::registry::embedding_family(files)?;
        let inputs = (family.inputs)(files)?;
        let error = |e: Box<dyn std::error::Error + Send + Sync>| LoadError::Tokenizer {
            file: files.tokenizer.clone(),
            message: e.to_string(),
        };
        let mut tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(error)?;
        // The file's own padding and truncation are not the model's rules: ours are.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(error)?;
        let mut truncating = tokenizer.clone();
        let params = TruncationParams {
            max_length: inputs.text_rules().max_tokens,
            ..TruncationParams::default()
        };
        truncating.with_truncation(Some(params)).map_err(error)?;
        Ok(Self {
            tokenizer,
            truncating,
            inputs,
        })
    }

    pub fn rules(&self) -> &TextRules {
        self.inputs.text_rules()
    }

    /// A text's ids, cut to the model's length when `truncate`, else refused past it.
    pub fn tokenize(&self, text: &str, truncate: bool) -> Result<EmbedText, TextError> {
        let rules = self.rules();
        let text = match rules.canonicalize {
            true => canonicalize(text),
            false => text.to_string(),
        };
        let tokenizer = if truncate { &self.truncating } else { &self.tokenizer };
        let encoding = (tokenizer.encode(text.as_str(), true)).map_err(|e| TextError::Tokenizer(e.to_string()))?;
        self.finish(encoding.get_ids().to_vec(), false)
    }

    /// Ids a client sent as they are (OpenAI's token-array input), checked and padded.
    pub fn from_ids(&self, ids: Vec<u32>, truncate: bool) -> Result<EmbedText, TextError> {
        if ids.is_empty() {
            return Err(TextError::NoTokens);
        }
        let vocab = self.tokenizer.get_vocab_size(true);
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TextError::UnknownToken { id, vocab });
        }
        self.finish(ids, truncate)
    }

    fn finish(&self, mut ids: Vec<u32>, truncate: bool) -> Result<EmbedText, TextError> {
        let max = self.rules().max_tokens;
        if ids.len() > max {
            if !truncate {
                return Err(TextError::TooLong { tokens: ids.len(), max });
            }
            ids.truncate(max);
        }
        let tokens = ids.len();
        if let Some(pad) = self.rules().pad_id {
            ids.resize(max, pad);
        }
        Ok(EmbedText { ids, tokens })
    }

    pub fn preprocess_image(&self, image: &DynamicImage) -> Result<(Pixels, ContentKey), String> {
        self.inputs.preprocess_image(image)
    }
}

/// An input ready for the embedding engine, and its text tokens (for `usage`).
pub struct PreparedInput {
    pub item: EmbedItem,
    pub tokens: usize,
}

/// Prepares a request's inputs: texts tokenized, images fetched (all at once), then
/// decoded within the limits and preprocessed on the bounded media pool.
pub struct EmbedPreparer {
    processor: Arc<EmbedProcessor>,
    fetcher: MediaFetcher,
    pool: MediaPool,
    limits: MediaLimits,
}

impl EmbedPreparer {
    pub fn new(processor: EmbedProcessor, fetcher: MediaFetcher, pool: MediaPool, limits: MediaLimits) -> Self {
        Self {
            processor: Arc::new(processor),
            fetcher,
            pool,
            limits,
        }
    }

    pub fn processor(&self) -> &EmbedProcessor {
        &self.processor
    }

    /// Every input of a request, in order.
    pub async fn prepare(&self, inputs: &[Located], truncate: bool) -> Result<Vec<PreparedInput>, PrepareError> {
        let prepared = inputs.iter().map(|located| self.one(located, truncate));
        futures::future::try_join_all(prepared).await
    }

    async fn one(&self, located: &Located, truncate: bool) -> Result<PreparedInput, PrepareError> {
        let text_error = |error| PrepareError::Text {
            error,
            param: located.param.clone(),
        };
        let text = match &located.input {
            EmbedInput::Text(text) => self.processor.tokenize(text, truncate).map_err(text_error)?,
            EmbedInput::Tokens(ids) => self.processor.from_ids(ids.clone(), truncate).map_err(text_error)?,
            EmbedInput::Image { url } => return self.image(url, &located.param).await,
        };
        Ok(PreparedInput {
            item: EmbedItem::Text(text.ids),
            tokens: text.tokens,
        })
    }

    async fn image(&self, url: &str, param: &str) -> Result<PreparedInput, PrepareError> {
        let media = |error| PrepareError::Media {
            error,
            param: param.to_string(),
        };
        let fetched = self.fetcher.fetch(url).await.map_err(media)?;
        let (processor, limits) = (self.processor.clone(), self.limits);
        let done = self
            .pool
            .run(move || {
                let header = probe_image(&fetched, &limits)?;
                Ok(decode_image(&fetched, &header).map(|image| processor.preprocess_image(&image)))
            })
            .await
            .map_err(|e| PrepareError::Failed(e.to_string()))?;
        let (pixels, key) = done
            .map_err(media)?
            .map_err(media)?
            .map_err(|message| PrepareError::ImageRefused {
                message,
                param: param.to_string(),
            })?;
        Ok(PreparedInput {
            item: EmbedItem::Image(pixels, key),
            tokens: 0,
        })
    }
}

/// `SiglipTokenizer`'s canonicalisation: lower case, ASCII punctuation
/// (`string.punctuation`) removed, runs of white space as one space, trimmed.
pub fn canonicalize(text: &str) -> String {
    let lowered = text.to_lowercase();
    let kept = lowered.chars().filter(|c| !c.is_ascii_punctuation());
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in kept {
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalize_as_siglip_tokenizer() {
        assert_eq!(canonicalize("  A photo, of a CAT!  "), "a photo of a cat");
        assert_eq!(canonicalize("it's\t\n two-dogs"), "its twodogs");
        assert_eq!(canonicalize("Zürich"), "zürich");
        assert_eq!(canonicalize("..."), "");
    }
}
