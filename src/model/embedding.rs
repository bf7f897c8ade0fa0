//! Contrastive models (CLIP, SigLIP): a text tower and an image tower that map their inputs
//! into one space, where a text and an image that belong together point the same way. No
//! KV cache, no generation: a batch of texts or images in, one unit vector each out. The
//! family's side of preparation (`EmbeddingInputs`) says how a text becomes token ids and
//! an image becomes pixels, as transformers' processor for the model does.

use candle_core::{Result, Tensor};
use image::DynamicImage;

use super::{ContentKey, Pixels};

/// What the server needs to know of a contrastive model.
#[derive(Debug, Clone)]
pub struct EmbeddingInfo {
    pub architecture: String,
    /// The embeddings' width (`projection_dim`).
    pub dim: usize,
    pub scoring: Scoring,
    /// Whether it has an image-text matching head (`match_pairs`): BLIP's ITM.
    pub matching: bool,
}

/// How the model turns the cosine of a text and an image into its logit and probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scoring {
    /// CLIP: `logit = scale · cos`, probabilities a softmax over the candidates.
    Softmax { scale: f32 },
    /// SigLIP: `logit = scale · cos + bias`, each pair's probability its sigmoid.
    Sigmoid { scale: f32, bias: f32 },
}

impl Scoring {
    pub fn logit(&self, cosine: f32) -> f32 {
        match *self {
            Self::Softmax { scale } => scale * cosine,
            Self::Sigmoid { scale, bias } => scale * cosine + bias,
        }
    }

    /// The probabilities of candidates with these logits, as the model's loss defines them.
    pub fn probabilities(&self, logits: &[f32]) -> Vec<f32> {
        match self {
            Self::Softmax { .. } => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                exp.iter().map(|e| e / sum).collect()
            }
            Self::Sigmoid { .. } => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
        }
    }
}

/// A contrastive model's weights. `Send + Sync`: the batching thread owns it.
pub trait EmbeddingModel: Send + Sync {
    fn info(&self) -> &EmbeddingInfo;

    /// Unit vectors `[n, dim]` of texts given as the family's token ids
    /// (`EmbeddingInputs::tokenize`), encoded together.
    fn embed_texts(&self, texts: &[&[u32]]) -> Result<Tensor>;

    /// Unit vectors `[n, dim]` of images given as the family's pixels
    /// (`EmbeddingInputs::preprocess_image`), encoded together.
    fn embed_images(&self, images: &[&Pixels]) -> Result<Tensor>;

    /// The probability that each text matches its image (`images[image_of[i]]` for text
    /// `i`), from a matching head over the fused text and image (`EmbeddingInfo::matching`).
    fn match_pairs(&self, _texts: &[&[u32]], _images: &[&Pixels], _image_of: &[usize]) -> Result<Vec<f32>> {
        candle_core::bail!("{} has no image-text matching head", self.info().architecture)
    }
}

/// How the family's text rules read: SigLIP canonicalises and pads, CLIP does neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRules {
    /// Most token ids per text, special tokens included (77, 64).
    pub max_tokens: usize,
    /// Lower case, punctuation removed, runs of white space as one space, trimmed
    /// (`SiglipTokenizer.canonicalize_text`).
    pub canonicalize: bool,
    /// Pad every text to `max_tokens` with this id (SigLIP was trained on padded texts and
    /// pools the last position).
    pub pad_id: Option<u32>,
}

/// A family's side of preparing inputs.
pub trait EmbeddingInputs: Send + Sync {
    fn text_rules(&self) -> &TextRules;

    /// An image as the model's image processor makes it: `[1, 3, size, size]` and the key of
    /// its content. Errors are the image's (too large once resized).
    fn preprocess_image(&self, image: &DynamicImage) -> std::result::Result<(Pixels, ContentKey), String>;
}

/// Rows of a `[n, dim]` tensor divided by their L2 norms (`x / ‖x‖₂`, as transformers).
pub fn unit_rows(xs: &Tensor) -> Result<Tensor> {
    let norms = xs.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?;
    xs.broadcast_div(&norms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_probabilities_sum_to_one_and_sigmoid_stands_alone() {
        let clip = Scoring::Softmax { scale: 100.0 };
        let p = clip.probabilities(&[clip.logit(0.3), clip.logit(0.25), clip.logit(-0.1)]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[0] > 0.99 && p[1] < 0.01, "{p:?}");
        let siglip = Scoring::Sigmoid {
            scale: 10.0,
            bias: -10.0,
        };
        assert_eq!(siglip.logit(1.0), 0.0);
        let p = siglip.probabilities(&[0.0, 0.0]);
        assert_eq!(p, vec![0.5, 0.5]);
    }
}
