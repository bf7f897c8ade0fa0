//! The decoder of SmolVLM and Qwen3-VL: Llama (Touvron et al., arXiv:2302.13971) with RoPE,
//! grouped-query attention and RMSNorm, as transformers' `LlamaModel` runs it, with Qwen3's
//! additions as options: RMSNorm of each head's queries and keys before RoPE, rotary angles
//! chosen per token by the family (M-RoPE's three coordinates), and DeepStack's vision rows
//! added to the first layers' outputs at image positions.
//!
//! One call takes a ragged batch: the tokens of every sequence in the step, prefill chunks
//! and single decode tokens alike, stacked into one `[tokens, hidden]` matrix, so that the
//! linear layers (nearly all the FLOPs) run once for the whole step. Attention alone runs
//! per sequence, against that sequence's own KV cache, with no padding and no cross-masks.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder, embedding, linear_no_bias};

use crate::model::lora::{Adapter, AdapterLayout, LoraBatch, ModuleSpec};
use crate::model::ops::decode_attention::decode_attention;
use crate::model::ops::kernels;
use crate::model::ops::norm::RmsNorm;
use crate::model::ops::prefill_attention;
use crate::model::ops::proj::Proj;
use crate::model::{Quantization, SequenceInput};

use crate::kv::{KvPool, KvSpec, SequenceKv};

/// Where one sequence's rows lie in the stacked batch.
pub struct SequenceRows<'a> {
    pub offset: usize,
    pub len: usize,
    pub kv: &'a mut SequenceKv,
}

/// The shape of a decoder, whatever config.json its family reads it from.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Where its weights live: `model.text_model` (SmolVLM), `model.language_model` (Qwen3-VL).
    pub prefix: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: `q_norm` and `k_norm` over each head before RoPE.
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
}

/// Rows added to the hidden states after the first layers (Qwen3-VL's DeepStack): after
/// layer `i`, `levels[i]` is added at rows `rows` of the stacked batch.
pub struct Deepstack {
    pub rows: Tensor,
    pub levels: Vec<Tensor>,
}

pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    layout: AdapterLayout,
    num_kv_heads: usize,
    head_dim: usize,
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    /// q, k and v stacked into one matrix (and gate with up below): one matmul reads the
    /// activations once, and at decode a step runs half as many small GEMMs.
    qkv_proj: Proj,
    o_proj: Proj,
    post_attention_layernorm: RmsNorm,
    gate_up_proj: Proj,
    down_proj: Proj,
    /// Qwen3's per-head norms of queries and keys.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// RoPE's inverse frequencies, in f32 as transformers computes them.
pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    let theta = theta as f32;
    (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
        .collect()
}

/// `[positions, head_dim / 2]`: position p's angle at each of RoPE's frequencies, in f32 as
/// transformers computes them (also the training decoder's).
pub fn rotary_angles(head_dim: usize, theta: f64, positions: usize, device: &Device) -> Result<Tensor> {
    let dim = head_dim;
    let inv_freq = inv_freq(head_dim, theta);
    let mut freqs = Vec::with_capacity(positions * inv_freq.len());
    for p in 0..positions {
        freqs.extend(inv_freq.iter().map(|f| p as f32 * f));
    }
    Tensor::from_vec(freqs, (positions, dim / 2), device)
}

/// cos and sin of every position, computed in f32 as transformers does, then cast.
pub struct RotaryTable {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTable {
    pub fn new(head_dim: usize, theta: f64, positions: usize, dtype: DType, device: &Device) -> Result<Self> {
        let freqs = rotary_angles(head_dim, theta, positions, device)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rows of the table for these positions: (`[tokens, head_dim / 2]`, same).
    pub fn select(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }
}

impl TextModel {
    /// `vb` is the root; weights live under `cfg.prefix` and `lm_head`.
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let text = vb.pp(&cfg.prefix);
        let tie_word_embeddings = cfg.tie_word_embeddings;
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, text.pp("embed_tokens"))?;
        let lm_head = Proj::Dense(if tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        });
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, text.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, text.pp("norm"))?,
            lm_head,
            layout: adapter_layout(cfg),
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// The KV cache its layers write, in `dtype` on `device`.
    pub fn kv_spec(&self, dtype: DType, device: &Device) -> KvSpec {
        KvSpec {
            num_layers: self.layers.len(),
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            dtype,
            device: device.clone(),
        }
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Runs the decoder layers over a stacked batch. `embeds`: `[tokens, hidden]`;
    /// `rope`: each row's cos and sin (`[tokens, head_dim / 2]` each, in the model's dtype).
    /// Returns the hidden states `[tokens, hidden]` before the final norm, which `logits`
    /// applies to the few rows that need it.
    pub fn forward(
        &self,
        embeds: &Tensor,
        rope: (&Tensor, &Tensor),
        seqs: &mut [SequenceRows<'_>],
        pool: &mut KvPool,
        lora: &LoraBatch<'_>,
        deepstack: Option<&Deepstack>,
    ) -> Result<Tensor> {
        let (cos, sin) = rope;
        let mut xs = embeds.clone();
        for (index, layer) in self.layers.iter().enumerate() {
            let step = LayerStep {
                layer: index,
                cos,
                sin,
                lora,
            };
            xs = layer.forward(&xs, &step, seqs, pool)?;
            if let Some(level) = deepstack.and_then(|d| d.levels.get(index)) {
                let rows = &deepstack.expect("a level implies the stack").rows;
                xs = xs.index_add(rows, &level.to_dtype(xs.dtype())?, 0)?;
            }
        }
        for seq in seqs.iter_mut() {
            seq.kv.commit(seq.len);
        }
        Ok(xs)
    }

    /// Quantizes every projection and the head (see `VisionLanguageModel::quantize_text`).
    pub fn quantize(&mut self, quantization: Quantization) -> Result<usize> {
        match quantization {
            Quantization::Q8_0 => self.each_proj(Proj::quantize_q8_0),
        }
    }

    /// Keeps every f32 projection whose weights are all bf16 values in bf16 (see
    /// `VisionLanguageModel::compact_text`).
    pub fn compact(&mut self) -> Result<usize> {
        self.each_proj(Proj::compact)
    }

    /// Applies `f` to the head and every layer's projections; counts where it returned true.
    fn each_proj(&mut self, f: impl Fn(&mut Proj) -> Result<bool>) -> Result<usize> {
        let mut done = usize::from(f(&mut self.lm_head)?);
        for layer in &mut self.layers {
            for proj in [
                &mut layer.qkv_proj,
                &mut layer.o_proj,
                &mut layer.gate_up_proj,
                &mut layer.down_proj,
            ] {
                done += usize::from(f(proj)?);
            }
        }
        Ok(done)
    }

    /// Next-token logits (f32) for rows of `forward`'s output; `lora` numbers these rows.
    pub fn logits(&self, hidden: &Tensor, lora: &LoraBatch<'_>) -> Result<Tensor> {
        let hs = self.norm.forward(hidden)?;
        let logits = self.lm_head.forward(&hs)?;
        lora.apply(self.layers.len() * SLOTS_PER_LAYER, &hs, logits)?
            .to_dtype(DType::F32)
    }

    pub fn adapter_layout(&self) -> &AdapterLayout {
        &self.layout
    }
}

/// A family's part of a decoder step: which tokens take vision features, and where each
/// row sits for RoPE.
pub trait StepRules {
    fn is_image_token(&self, token: u32) -> bool;

    /// cos and sin (`[tokens, head_dim / 2]` each, in the model's dtype) of the batch's
    /// rows, in order; each input's tokens follow its `kv.len()` tokens already cached.
    fn rope(&self, batch: &[SequenceInput<'_>]) -> Result<(Tensor, Tensor)>;
}

impl TextModel {
    /// One step over a ragged batch (`VisionLanguageModel::forward`): token embeddings with
    /// each input's vision features in place of its image tokens (and their DeepStack rows
    /// added after the first layers), the decoder, and the logits of the inputs that want
    /// them. Inputs without features (decode steps, text) keep plain embeddings even for an
    /// image token id, as transformers does once the prompt is prefilled.
    pub fn step(
        &self,
        batch: &mut [SequenceInput<'_>],
        pool: &mut KvPool,
        max_positions: usize,
        rules: &dyn StepRules,
    ) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut logit_rows = Vec::new();
        let mut token_adapters: Vec<Option<&Adapter>> = Vec::new();
        let mut logit_adapters = Vec::new();
        let mut image_rows = Vec::new();
        let mut features = Vec::new();
        for input in batch.iter() {
            let start = input.kv.len();
            let n = input.tokens.len();
            if n == 0 || start + n > input.kv.capacity() {
                candle_core::bail!("{n} tokens do not fit the sequence's KV blocks (len {start}). This is a bug.")
            }
            if start + n > max_positions {
                candle_core::bail!(
                    "sequence of {} tokens exceeds max_position_embeddings {max_positions}",
                    start + n
                )
            }
            if let Some(f) = &input.image_features {
                let rows: Vec<u32> = (input.tokens.iter().enumerate())
                    .filter(|(_, t)| rules.is_image_token(**t))
                    .map(|(i, _)| (ids.len() + i) as u32)
                    .collect();
                if f.rows() != rows.len() {
                    candle_core::bail!("{} image tokens in a chunk but {} feature rows", rows.len(), f.rows())
                }
                image_rows.extend(rows);
                features.push(f);
            }
            ids.extend_from_slice(input.tokens);
            if input.wants_logits {
                logit_rows.push((ids.len() - 1) as u32);
                logit_adapters.push(input.adapter);
            }
            token_adapters.resize(ids.len(), input.adapter);
        }
        let device = self.embed_tokens.embeddings().device().clone();
        // Without adapters these are empty: no tensors, and `apply` returns its input.
        let token_lora = LoraBatch::new(&token_adapters, &device)?;
        let logit_lora = LoraBatch::new(&logit_adapters, &device)?;
        let embeds = self.embed(&Tensor::new(ids.as_slice(), &device)?)?;
        let (embeds, deepstack) = place_features(embeds, &image_rows, &features)?;
        let (cos, sin) = rules.rope(batch)?;
        let mut offset = 0;
        let mut rows: Vec<SequenceRows> = batch
            .iter_mut()
            .map(|input| {
                let len = input.tokens.len();
                offset += len;
                SequenceRows {
                    offset: offset - len,
                    len,
                    kv: &mut *input.kv,
                }
            })
            .collect();
        let hidden = self.forward(&embeds, (&cos, &sin), &mut rows, pool, &token_lora, deepstack.as_ref())?;
        if logit_rows.is_empty() {
            return Tensor::zeros((0, self.embed_tokens.embeddings().dim(0)?), DType::F32, &device);
        }
        let last = hidden.index_select(&Tensor::new(logit_rows, &device)?, 0)?;
        self.logits(&last, &logit_lora)
    }
}

/// The embeddings with the features' rows in place of rows `image_rows` (in order), and
/// the features' DeepStack rows to add at them.
fn place_features(
    embeds: Tensor,
    image_rows: &[u32],
    features: &[&crate::model::ImageFeatures],
) -> Result<(Tensor, Option<Deepstack>)> {
    if features.is_empty() {
        return Ok((embeds, None));
    }
    let all = crate::model::ImageFeatures::cat(features)?;
    let (tokens, device) = (embeds.dim(0)?, embeds.device().clone());
    // Row r of the result is row index[r] of the embeddings followed by the features.
    let mut index: Vec<u32> = (0..tokens as u32).collect();
    for (k, &row) in image_rows.iter().enumerate() {
        index[row as usize] = (tokens + k) as u32;
    }
    let sources = Tensor::cat(&[&embeds, &all.embeds.to_dtype(embeds.dtype())?], 0)?;
    let placed = sources.index_select(&Tensor::new(index, &device)?, 0)?;
    if all.deepstack.is_empty() {
        return Ok((placed, None));
    }
    let rows = Tensor::new(image_rows, &device)?;
    Ok((
        placed,
        Some(Deepstack {
            rows,
            levels: all.deepstack,
        }),
    ))
}

/// Adapter slots of a layer: qkv, o, gate_up, down; after the layers' comes the head's.
const SLOTS_PER_LAYER: usize = 4;

/// PEFT's module names for each slot, in the order `DecoderLayer::forward` applies them.
fn adapter_layout(cfg: &DecoderConfig) -> AdapterLayout {
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let spec = |name: String, in_features, out_features| ModuleSpec {
        name,
        in_features,
        out_features,
    };
    let mut slots = Vec::with_capacity(cfg.num_hidden_layers * SLOTS_PER_LAYER + 1);
    for i in 0..cfg.num_hidden_layers {
        let m = |name: &str| format!("{}.layers.{i}.{name}", cfg.prefix);
        slots.push(vec![
            spec(m("self_attn.q_proj"), h, q),
            spec(m("self_attn.k_proj"), h, kv),
            spec(m("self_attn.v_proj"), h, kv),
        ]);
        slots.push(vec![spec(m("self_attn.o_proj"), q, h)]);
        slots.push(vec![
            spec(m("mlp.gate_proj"), h, inter),
            spec(m("mlp.up_proj"), h, inter),
        ]);
        slots.push(vec![spec(m("mlp.down_proj"), inter, h)]);
    }
    slots.push(vec![spec("lm_head".into(), h, cfg.vocab_size)]);
    AdapterLayout {
        first_vision_slot: slots.len(),
        slots,
        supported: "adapters may change the text model's q/k/v/o, gate/up/down projections and lm_head".into(),
    }
}

/// What every layer of one step shares.
struct LayerStep<'a> {
    layer: usize,
    cos: &'a Tensor,
    sin: &'a Tensor,
    lora: &'a LoraBatch<'a>,
}

impl LayerStep<'_> {
    /// `proj(xs)` plus the adapters' deltas for slot `slot` of this layer.
    fn project(&self, proj: &Proj, slot: usize, xs: &Tensor) -> Result<Tensor> {
        let ys = proj.forward(xs)?;
        self.lora.apply(self.layer * SLOTS_PER_LAYER + slot, xs, ys)
    }
}

impl DecoderLayer {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_kv_heads);
        let lin = |i, o, name: &str, bias: bool| {
            if bias {
                candle_nn::linear(i, o, vb.pp(name))
            } else {
                linear_no_bias(i, o, vb.pp(name))
            }
        };
        let inter = cfg.intermediate_size;
        let qkv = [
            lin(h, heads * hd, "self_attn.q_proj", cfg.attention_bias)?,
            lin(h, kv_heads * hd, "self_attn.k_proj", cfg.attention_bias)?,
            lin(h, kv_heads * hd, "self_attn.v_proj", cfg.attention_bias)?,
        ];
        let gate_up = [
            lin(h, inter, "mlp.gate_proj", cfg.mlp_bias)?,
            lin(h, inter, "mlp.up_proj", cfg.mlp_bias)?,
        ];
        Ok(Self {
            input_layernorm: RmsNorm::new(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            qkv_proj: Proj::stacked(&qkv)?,
            o_proj: Proj::Dense(lin(heads * hd, h, "self_attn.o_proj", cfg.attention_bias)?),
            post_attention_layernorm: RmsNorm::new(h, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            gate_up_proj: Proj::stacked(&gate_up)?,
            down_proj: Proj::Dense(lin(inter, h, "mlp.down_proj", cfg.mlp_bias)?),
            qk_norm: match cfg.qk_norm {
                true => Some((
                    RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("self_attn.q_norm"))?,
                    RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("self_attn.k_norm"))?,
                )),
                false => None,
            },
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        step: &LayerStep<'_>,
        seqs: &mut [SequenceRows<'_>],
        pool: &mut KvPool,
    ) -> Result<Tensor> {
        let (layer, cos, sin) = (step.layer, step.cos, step.sin);
        let tokens = xs.dim(0)?;
        let hs = self.input_layernorm.forward(xs)?;
        let rope = |t: Tensor, heads: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let mut t = t.reshape((1, tokens, heads, self.head_dim))?;
            if let Some(norm) = norm {
                t = norm.forward(&t)?;
            }
            candle_nn::rotary_emb::rope_thd(&t, cos, sin)?.squeeze(0)
        };
        let qkv = step.project(&self.qkv_proj, 0, &hs)?;
        let (q_width, kv_width) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let (q_norm, k_norm) = match &self.qk_norm {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        let q = rope(qkv.narrow(1, 0, q_width)?.contiguous()?, self.num_heads, q_norm)?;
        let k = rope(
            qkv.narrow(1, q_width, kv_width)?.contiguous()?,
            self.num_kv_heads,
            k_norm,
        )?;
        let v = qkv.narrow(1, q_width + kv_width, kv_width)?.contiguous()?.reshape((
            tokens,
            self.num_kv_heads,
            self.head_dim,
        ))?;
        // Decode tokens (one per sequence) attend in one kernel call from the pool's blocks;
        // prompt chunks gather their blocks and attend per sequence.
        let paged = kernels::applies(&q);
        let mut outputs = Vec::with_capacity(seqs.len());
        let mut decodes = Vec::new();
        for (i, seq) in seqs.iter_mut().enumerate() {
            let rows = |t: &Tensor| t.narrow(0, seq.offset, seq.len);
            let start = seq.kv.len();
            pool.write(layer, seq.kv, &rows(&k)?, &rows(&v)?)?;
            if paged && seq.len == 1 {
                decodes.push(i);
                outputs.push(None);
                continue;
            }
            let (keys, values) = pool.gather(layer, seq.kv, start + seq.len)?;
            outputs.push(Some(self.attention(&rows(&q)?, &keys, &values, start)?));
        }
        if !decodes.is_empty() {
            let rows: Vec<u32> = decodes.iter().map(|&i| seqs[i].offset as u32).collect();
            let q = q.index_select(&Tensor::new(rows, q.device())?, 0)?;
            let tables: Vec<(&[u32], usize)> = (decodes.iter())
                .map(|&i| (seqs[i].kv.block_table(), seqs[i].kv.len() + 1))
                .collect();
            let (keys, values) = pool.layer(layer);
            let scale = (self.head_dim as f32).powf(-0.5);
            let attended = decode_attention(&q, keys, values, &tables, scale)?;
            for (row, &i) in decodes.iter().enumerate() {
                outputs[i] = Some(attended.narrow(0, row, 1)?);
            }
        }
        let outputs: Vec<Tensor> = outputs.into_iter().flatten().collect();
        let attn = Tensor::cat(&outputs, 0)?;
        let xs = (step.project(&self.o_proj, 1, &attn)? + xs)?;
        let hs = self.post_attention_layernorm.forward(&xs)?;
        let gate_up = step.project(&self.gate_up_proj, 2, &hs)?;
        let mlp = if kernels::applies(&gate_up) {
            kernels::silu_mul(&gate_up)?
        } else {
            let inter = gate_up.dim(1)? / 2;
            (candle_nn::ops::silu(&gate_up.narrow(1, 0, inter)?)? * gate_up.narrow(1, inter, inter)?)?
        };
        step.project(&self.down_proj, 3, &mlp)? + xs
    }

    /// One sequence: `q` `[n, heads, head_dim]` for positions `start..start + n`, against
    /// `keys`/`values` `[start + n, kv_heads, head_dim]`.
    fn attention(&self, q: &Tensor, keys: &Tensor, values: &Tensor, start: usize) -> Result<Tensor> {
        let q = (q * (self.head_dim as f64).powf(-0.5))?;
        // A 16-bit cache (`--kv-cache-dtype`) is widened to the compute dtype.
        prefill_attention::attention(&q, &keys.to_dtype(q.dtype())?, &values.to_dtype(q.dtype())?, start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_table_matches_transformers_at_a_far_position() -> Result<()> {
        let table = RotaryTable::new(16, 100000.0, 1024, DType::F32, &Device::Cpu)?;
        let cos = table.cos.get(1000)?.to_vec1::<f32>()?;
        // torch: inv_freq = 1 / 100000 ** (arange(0, 16, 2) / 16); cos(1000 * inv_freq)[1]
        let expected = (1000f64 / 100000f64.powf(2.0 / 16.0)).cos() as f32;
        assert!((cos[1] - expected).abs() < 1e-4, "{} vs {expected}", cos[1]);
        assert_eq!(cos.len(), 8);
        Ok(())
    }
}
