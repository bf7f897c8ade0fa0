//! SmolVLM's decoder for training: the same Llama math as `model::decoder`, written
//! only in candle ops that have gradients (the serving path's fused CPU kernels, rotary
//! embedding and softmax have none), over one whole sequence with a causal mask and no KV
//! cache. Trainable are either LoRA pairs on chosen projections (PEFT's layout and scaling)
//! or every weight (`--method full`, with `vision`'s encoder); image features come in
//! computed and are spliced in place of the image tokens.

use std::cell::RefCell;

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

pub use super::layers::Trainable;
use super::layers::{Builder, Linear, Weight};
use super::softmax::softmax_last_dim;
pub use checkpoint::Tape;
use checkpoint::{Step, StepLayers};

mod checkpoint;
use crate::model::smolvlm::config::TextConfig;

/// Which weights train.
#[derive(Debug, Clone)]
pub enum Method {
    Lora(LoraSpec),
    Full,
}

#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Modules as `--lora-target-modules` names them (`layers::target_name`: `q_proj`,
    /// `lm_head`, `vision.fc1`, `connector`).
    pub targets: Vec<String>,
    /// QLoRA: the frozen projections, head and embedding kept in Q8_0 blocks.
    pub quantize_base: bool,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

pub struct TrainText {
    embed: Weight,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    eps: f64,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dropout: f32,
    /// `--gradient-checkpointing`: keep each layer's input only, recompute in `Tape::backward`.
    checkpointing: bool,
    /// The last training forward's checkpoints, under `checkpointing`.
    tape: RefCell<Option<Tape>>,
}

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl TrainText {
    /// `vb` is the model's root (weights in f32); `b` makes its weights trainable or frozen
    /// as its method says, and records what trains.
    pub fn new(cfg: &TextConfig, tie_word_embeddings: bool, vb: VarBuilder, b: &mut Builder) -> Result<Self> {
        b.quantize_frozen(true);
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let embed_name = "model.text_model.embed_tokens.weight";
        let embed = b.matrix(embed_name.into(), vb.get((cfg.vocab_size, h), embed_name)?)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let m = format!("model.text_model.layers.{i}");
            let norm = |b: &mut Builder<'_>, name: &str| {
                b.weight(format!("{m}.{name}.weight"), vb.get(h, &format!("{m}.{name}.weight"))?)
            };
            let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
            layers.push(Layer {
                input_norm: norm(b, "input_layernorm")?,
                q: b.linear(&format!("{m}.self_attn.q_proj"), &vb, (heads * hd, h), ab)?,
                k: b.linear(&format!("{m}.self_attn.k_proj"), &vb, (kv_heads * hd, h), ab)?,
                v: b.linear(&format!("{m}.self_attn.v_proj"), &vb, (kv_heads * hd, h), ab)?,
                o: b.linear(&format!("{m}.self_attn.o_proj"), &vb, (h, heads * hd), ab)?,
                post_norm: norm(b, "post_attention_layernorm")?,
                gate: b.linear(&format!("{m}.mlp.gate_proj"), &vb, (inter, h), mb)?,
                up: b.linear(&format!("{m}.mlp.up_proj"), &vb, (inter, h), mb)?,
                down: b.linear(&format!("{m}.mlp.down_proj"), &vb, (h, inter), mb)?,
            });
        }
        let norm_name = "model.text_model.norm.weight";
        let norm = b.weight(norm_name.into(), vb.get(h, norm_name)?)?;
        let lm_head = if tie_word_embeddings {
            // Tied: the head is the embedding matrix itself (a LoRA on lm_head still applies).
            Linear {
                weight: embed.shared(),
                bias: None,
                lora: b.lora_pair("lm_head", (cfg.vocab_size, h), vb.device())?,
            }
        } else {
            b.linear("lm_head", &vb, (cfg.vocab_size, h), false)?
        };
        let (cos, sin) = rotary(cfg, vb.device())?;
        let dropout = match b.method() {
            Method::Lora(spec) => spec.dropout,
            Method::Full => 0.0,
        };
        let model = Self {
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            eps: cfg.rms_norm_eps,
            heads,
            kv_heads,
            head_dim: hd,
            dropout,
            checkpointing: false,
            tape: RefCell::new(None),
        };
        Ok(model)
    }

    /// Hidden states before the final norm for sequences stacked into one `[Σn, hidden]`
    /// matrix: the linear layers run once over all of them, attention per sequence.
    /// `dropout`: a seeded source for LoRA dropout, `None` to evaluate.
    fn hidden(&self, seqs: &[Sequence<'_>], image_token: u32, dropout: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let device = self.norm.device();
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let mut xs = self.embed.rows(&Tensor::new(ids.as_slice(), device)?)?;
        let features: Vec<Tensor> = (seqs.iter().filter_map(|s| s.features.clone()))
            .map(|f| f.to_dtype(DType::F32))
            .collect::<Result<_>>()?;
        if !features.is_empty() {
            // Row i of the stack: its token's embedding, or the next image feature.
            let mut next = ids.len() as u32;
            let mut index = Vec::with_capacity(ids.len());
            for seq in seqs {
                let offset = index.len() as u32;
                for (i, &id) in seq.ids.iter().enumerate() {
                    if id == image_token && seq.features.is_some() {
                        index.push(next);
                        next += 1;
                    } else {
                        index.push(offset + i as u32);
                    }
                }
            }
            let mut sources = vec![xs];
            sources.extend(features);
            xs = Tensor::cat(&sources, 0)?.index_select(&Tensor::new(index, device)?, 0)?;
        }
        let positions: Vec<u32> = seqs.iter().flat_map(|s| 0..s.ids.len() as u32).collect();
        let positions = Tensor::new(positions, device)?;
        let (cos, sin) = (
            self.cos.index_select(&positions, 0)?,
            self.sin.index_select(&positions, 0)?,
        );
        let lens: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
        let masks: Vec<Tensor> = lens.iter().map(|&n| causal_mask(n, device)).collect::<Result<_>>()?;
        let step = Step { cos, sin, lens, masks };
        let layers = StepLayers {
            model: self,
            step: &step,
        };
        let (xs, kept) = super::checkpoint::forward(&layers, xs, dropout, self.checkpointing)?;
        *self.tape.borrow_mut() = kept.map(|kept| Tape { kept, step });
        Ok(xs)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        l: &Layer,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        lens: &[usize],
        masks: &[Tensor],
        dropout: &mut Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let hd = self.head_dim;
        let hs = rms_norm(xs, &l.input_norm, self.eps)?;
        // `[heads, Σn, head_dim]`, rotated by each row's own position.
        let heads = |t: Tensor, count: usize| t.reshape((n, count, hd))?.transpose(0, 1)?.contiguous();
        let q = rope(&heads(self.project(&l.q, &hs, dropout)?, self.heads)?, cos, sin)?;
        let k = rope(&heads(self.project(&l.k, &hs, dropout)?, self.kv_heads)?, cos, sin)?;
        let v = heads(self.project(&l.v, &hs, dropout)?, self.kv_heads)?;
        let group = self.heads / self.kv_heads;
        let mut outputs = Vec::with_capacity(lens.len());
        let mut offset = 0;
        for (&len, mask) in lens.iter().zip(masks) {
            let (q, k, v) = (
                q.narrow(1, offset, len)?,
                k.narrow(1, offset, len)?,
                v.narrow(1, offset, len)?,
            );
            offset += len;
            let repeat = |t: Tensor| -> Result<Tensor> {
                if group == 1 {
                    return t.contiguous();
                }
                (t.unsqueeze(1)?
                    .broadcast_as((self.kv_heads, group, len, hd))?
                    .contiguous())?
                .reshape((self.heads, len, hd))
            };
            let (k, v) = (repeat(k)?, repeat(v)?);
            let scores = (q.contiguous()?.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?.broadcast_add(mask)?;
            let probs = softmax_last_dim(&scores)?;
            outputs.push(probs.matmul(&v)?);
        }
        let attn = Tensor::cat(&outputs, 1)?
            .transpose(0, 1)?
            .reshape((n, self.heads * hd))?;
        let xs = (self.project(&l.o, &attn, dropout)? + xs)?;
        let hs = rms_norm(&xs, &l.post_norm, self.eps)?;
        let gated = (self.project(&l.gate, &hs, dropout)?.silu()? * self.project(&l.up, &hs, dropout)?)?;
        self.project(&l.down, &gated, dropout)? + xs
    }

    /// `linear(xs)`, with this model's LoRA dropout.
    fn project(&self, linear: &Linear, xs: &Tensor, dropout: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        linear.forward(xs, self.dropout, dropout)
    }

    /// The summed cross-entropy of the sequences' target tokens (`targets[t]`: token `t` is
    /// predicted from those before it), and how many there were.
    pub fn loss(
        &self,
        seqs: &[Sequence<'_>],
        image_token: u32,
        dropout: Option<&mut ChaCha8Rng>,
    ) -> Result<(Tensor, usize)> {
        let (picked, owners) = self.target_log_probs(seqs, image_token, dropout)?;
        Ok((picked.sum_all()?.neg()?, owners.len()))
    }

    /// Each sequence's summed log-probability of its target tokens (`[sequences]`), as
    /// preference optimisation scores a completion.
    pub fn sequence_log_probs(
        &self,
        seqs: &[Sequence<'_>],
        image_token: u32,
        dropout: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let (picked, owners) = self.target_log_probs(seqs, image_token, dropout)?;
        // A 0/1 matrix of which sequence owns each target row: one product sums them.
        let mut membership = vec![0f32; seqs.len() * owners.len()];
        for (row, &owner) in owners.iter().enumerate() {
            membership[owner * owners.len() + row] = 1.0;
        }
        let membership = Tensor::from_vec(membership, (seqs.len(), owners.len()), picked.device())?;
        membership.matmul(&picked)?.squeeze(1)
    }

    /// The log-probability of every target token (`[targets, 1]`) and the sequence each
    /// belongs to.
    fn target_log_probs(
        &self,
        seqs: &[Sequence<'_>],
        image_token: u32,
        mut dropout: Option<&mut ChaCha8Rng>,
    ) -> Result<(Tensor, Vec<usize>)> {
        let hidden = self.hidden(seqs, image_token, &mut dropout)?;
        let (mut rows, mut labels, mut owners) = (Vec::new(), Vec::new(), Vec::new());
        let mut offset = 0;
        for (index, seq) in seqs.iter().enumerate() {
            for t in (1..seq.ids.len()).filter(|&t| seq.targets[t]) {
                rows.push((offset + t - 1) as u32);
                labels.push(seq.ids[t]);
                owners.push(index);
            }
            offset += seq.ids.len();
        }
        let device = hidden.device();
        let picked = hidden.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
        let logits = self.project(&self.lm_head, &rms_norm(&picked, &self.norm, self.eps)?, &mut dropout)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let labels = Tensor::new(labels.as_slice(), device)?.unsqueeze(1)?;
        Ok((log_probs.gather(&labels, 1)?, owners))
    }

    /// Next-token logits after every token of one sequence (`[n, vocab]`), without dropout.
    pub fn logits(&self, ids: &[u32], image_token: u32, features: Option<&Tensor>) -> Result<Tensor> {
        let seq = Sequence {
            ids,
            targets: &[],
            features: features.cloned(),
        };
        let hidden = self.hidden(std::slice::from_ref(&seq), image_token, &mut None)?;
        self.project(&self.lm_head, &rms_norm(&hidden, &self.norm, self.eps)?, &mut None)
    }
}

/// One sequence of a training batch.
pub struct Sequence<'a> {
    pub ids: &'a [u32],
    pub targets: &'a [bool],
    /// The rows of its image tokens, in order.
    pub features: Option<Tensor>,
}

/// Llama's RMSNorm in f32: `w · x / sqrt(mean(x²) + eps)`.
fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let rms = (xs.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    xs.broadcast_div(&rms)?.broadcast_mul(weight)
}

/// transformers' rotate-half rotary embedding: `x cos + rotate_half(x) sin`, `x`:
/// `[heads, n, head_dim]`, tables `[n, head_dim]`.
fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(
        &[
            &xs.narrow(D::Minus1, half, half)?.neg()?,
            &xs.narrow(D::Minus1, 0, half)?,
        ],
        D::Minus1,
    )?;
    xs.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// cos and sin of every position at every frequency, duplicated to the head's width.
fn rotary(cfg: &TextConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let freqs =
        crate::model::decoder::rotary_angles(cfg.head_dim(), cfg.rope_theta(), cfg.max_position_embeddings, device)?;
    let freqs = Tensor::cat(&[&freqs, &freqs], 1)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (n, n), device)
}
