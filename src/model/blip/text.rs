//! BLIP's text encoder (`BlipTextModel`, BERT's post-norm layers): self-attention over the
//! text both ways, then, when matching, cross-attention from the text to its image's
//! patches (ALBEF's fusion), then the feed-forward block; each block `LayerNorm(x + f(x))`.
//! Without an image (the contrastive path) the cross-attention is skipped, as transformers
//! does when no `encoder_hidden_states` are given.

use candle_core::{D, Module, Result, Tensor, bail};
use candle_nn::{Linear, VarBuilder, linear};

use crate::model::encoder::Activation;
use crate::model::ops::epilogue::{self, Then};
use crate::model::ops::frame_attention;
use crate::model::ops::norm::LayerNorm;

use super::config::TextConfig;

/// At most this many bytes of attention scores per task of `frame_attention`.
const SCORES_BYTES: usize = 4 << 20;

pub struct TextEncoder {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<TextLayer>,
    heads: usize,
}

/// Attention's projections with q scaled by `1/sqrt(head_dim)` (transformers divides the
/// scores instead: the same up to rounding).
struct Attention {
    q: Linear,
    /// k and v stacked: one GEMM.
    kv: Linear,
    out: Linear,
    norm: LayerNorm,
}

struct TextLayer {
    attention: Attention,
    cross: Option<Attention>,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    activation: Activation,
}

/// The images a batch of texts attends to: each distinct image's hidden states
/// `[patches, vision hidden]`, and per text the index of its image.
pub struct CrossInputs<'a> {
    pub images: &'a [Tensor],
    pub image_of: &'a [usize],
}

impl Attention {
    fn new(d: usize, kv_in: usize, heads: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let scale = ((d / heads) as f64).powf(-0.5);
        let q = linear(d, d, vb.pp("self.query"))?;
        let q = Linear::new((q.weight() * scale)?, q.bias().map(|b| b * scale).transpose()?);
        let (k, v) = (
            linear(kv_in, d, vb.pp("self.key"))?,
            linear(kv_in, d, vb.pp("self.value"))?,
        );
        let bias = match (k.bias(), v.bias()) {
            (Some(k), Some(v)) => Some(Tensor::cat(&[k, v], 0)?),
            _ => None,
        };
        Ok(Self {
            q,
            kv: Linear::new(Tensor::cat(&[k.weight(), v.weight()], 0)?, bias),
            out: linear(d, d, vb.pp("output.dense"))?,
            norm: LayerNorm::new(d, eps, vb.pp("output.LayerNorm"))?,
        })
    }

    /// `LayerNorm(xs + out(attention))` of `xs` against itself, within each text.
    fn own(&self, xs: &Tensor, lens: &[usize], heads: usize) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let shape = (rows, heads, d / heads);
        let q = epilogue::linear(&self.q, xs, Then::Nothing)?.reshape(shape)?;
        let kv = epilogue::linear(&self.kv, xs, Then::Nothing)?.reshape((rows, 2, heads, d / heads))?;
        let (k, v) = (kv.narrow(1, 0, 1)?.squeeze(1)?, kv.narrow(1, 1, 1)?.squeeze(1)?);
        let attended = frame_attention::attention(&q, &k, &v, lens, SCORES_BYTES)?;
        self.norm
            .forward(&epilogue::linear(&self.out, &attended, Then::Add(xs))?)
    }

    /// The same with each text's queries against its image's patches.
    fn cross(&self, xs: &Tensor, lens: &[usize], cross: &CrossInputs, heads: usize) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let head_dim = d / heads;
        let q = epilogue::linear(&self.q, xs, Then::Nothing)?.reshape((rows, heads, head_dim))?;
        // Each distinct image's keys and values once: `[heads, patches, head_dim]` each.
        let kv = (cross.images.iter())
            .map(|image| {
                let patches = image.dim(0)?;
                let kv = epilogue::linear(&self.kv, image, Then::Nothing)?.reshape((patches, 2, heads, head_dim))?;
                let part = |i| kv.narrow(1, i, 1)?.squeeze(1)?.transpose(0, 1)?.contiguous();
                Ok((part(0)?, part(1)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut parts = Vec::with_capacity(lens.len());
        let mut first = 0;
        for (&len, &image) in lens.iter().zip(cross.image_of) {
            let (k, v) = &kv[image];
            let q = q.narrow(0, first, len)?.transpose(0, 1)?.contiguous()?; // [heads, len, hd]
            let probs = candle_nn::ops::softmax(&q.matmul(&k.t()?)?, D::Minus1)?;
            parts.push(probs.matmul(v)?.transpose(0, 1)?.reshape((len, d))?);
            first += len;
        }
        let attended = Tensor::cat(&parts, 0)?;
        self.norm
            .forward(&epilogue::linear(&self.out, &attended, Then::Add(xs))?)
    }
}

impl TextEncoder {
    /// `vb` points at `text_encoder`; `vision_hidden` is the width cross-attention reads.
    pub fn new(cfg: &TextConfig, vision_hidden: usize, vb: VarBuilder) -> Result<Self> {
        let (d, eps, heads) = (cfg.hidden_size, cfg.layer_norm_eps, cfg.num_attention_heads);
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                Ok(TextLayer {
                    attention: Attention::new(d, d, heads, eps, vb.pp("attention"))?,
                    cross: match cfg.is_decoder {
                        true => Some(Attention::new(d, vision_hidden, heads, eps, vb.pp("crossattention"))?),
                        false => None,
                    },
                    intermediate: linear(d, cfg.intermediate_size, vb.pp("intermediate.dense"))?,
                    output: linear(cfg.intermediate_size, d, vb.pp("output.dense"))?,
                    output_norm: LayerNorm::new(d, eps, vb.pp("output.LayerNorm"))?,
                    activation: Activation::from_hf(&cfg.hidden_act).unwrap_or(Activation::GeluErf),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            word_embeddings: emb.get((cfg.vocab_size, d), "word_embeddings.weight")?,
            position_embeddings: emb.get((cfg.max_position_embeddings, d), "position_embeddings.weight")?,
            embeddings_norm: LayerNorm::new(d, eps, emb.pp("LayerNorm"))?,
            layers,
            heads,
        })
    }

    /// The first position's (`[CLS]`) last hidden state of each text, `[n, hidden]`; with
    /// `cross`, each text attending to its image.
    pub fn forward(&self, texts: &[&[u32]], cross: Option<&CrossInputs>) -> Result<Tensor> {
        let (vocab, max) = (self.word_embeddings.dim(0)?, self.position_embeddings.dim(0)?);
        let (mut ids, mut positions, mut firsts) = (Vec::new(), Vec::new(), Vec::with_capacity(texts.len()));
        for text in texts {
            if text.is_empty() || text.len() > max || text.iter().any(|&id| id as usize >= vocab) {
                bail!("a text of {} tokens (at most {max}, ids below {vocab})", text.len())
            }
            firsts.push(ids.len() as u32);
            ids.extend_from_slice(text);
            positions.extend(0..text.len() as u32);
        }
        let device = self.word_embeddings.device();
        let xs = (self.word_embeddings.index_select(&Tensor::new(ids, device)?, 0)?
            + self
                .position_embeddings
                .index_select(&Tensor::new(positions, device)?, 0)?)?;
        let mut xs = self.embeddings_norm.forward(&xs)?;
        let lens: Vec<usize> = texts.iter().map(|t| t.len()).collect();
        for layer in &self.layers {
            xs = layer.attention.own(&xs, &lens, self.heads)?;
            if let Some(cross) = cross {
                let Some(attention) = &layer.cross else {
                    bail!("this text encoder has no cross-attention")
                };
                xs = attention.cross(&xs, &lens, cross, self.heads)?;
            }
            let hidden = layer.activation.after(&layer.intermediate, &xs)?;
            xs = layer
                .output_norm
                .forward(&epilogue::linear(&layer.output, &hidden, Then::Add(&xs))?)?;
        }
        xs.index_select(&Tensor::new(firsts, device)?, 0)
    }
}
