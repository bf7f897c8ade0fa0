//! SmolVLM's decoder: Llama (Touvron et al., arXiv:2302.13971) with RoPE, grouped-query
//! attention and RMSNorm, as transformers' `LlamaModel` runs it.
//!
//! One call takes a ragged batch: the tokens of every sequence in the step, prefill chunks
//! and single decode tokens alike, stacked into one `[tokens, hidden]` matrix, so that the
//! linear layers (nearly all the FLOPs) run once for the whole step. Attention alone runs
//! per sequence, against that sequence's own KV cache, with no padding and no cross-masks.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder, embedding, linear_no_bias};

use crate::model::lora::{AdapterLayout, LoraBatch, ModuleSpec};
use crate::model::ops::decode_attention::decode_attention;
use crate::model::ops::kernels;
use crate::model::ops::norm::RmsNorm;
use crate::model::ops::proj::Proj;

use super::config::TextConfig;
use crate::kv::{KvPool, SequenceKv};

/// Where one sequence's rows lie in the stacked batch.
pub struct SequenceRows<'a> {
    pub offset: usize,
    pub len: usize,
    pub kv: &'a mut SequenceKv,
}

pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    rope: RotaryTable,
    layout: AdapterLayout,
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
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// `[positions, head_dim / 2]`: position p's angle at each of RoPE's frequencies, in f32 as
/// transformers computes them (also the training decoder's).
pub fn rotary_angles(cfg: &TextConfig, device: &Device) -> Result<Tensor> {
    let dim = cfg.head_dim();
    let theta = cfg.rope_theta() as f32;
    let inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / dim as f32))
        .collect();
    let positions = cfg.max_position_embeddings;
    let mut freqs = Vec::with_capacity(positions * inv_freq.len());
    for p in 0..positions {
        freqs.extend(inv_freq.iter().map(|f| p as f32 * f));
    }
    Tensor::from_vec(freqs, (positions, dim / 2), device)
}

/// cos and sin of every position, computed in f32 as transformers does, then cast.
struct RotaryTable {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTable {
    fn new(cfg: &TextConfig, dtype: DType, device: &Device) -> Result<Self> {
        let freqs = rotary_angles(cfg, device)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rows of the table for these positions: (`[tokens, head_dim / 2]`, same).
    fn select(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }
}

impl TextModel {
    /// `vb` is the root; weights live under `model.text_model` and `lm_head`.
    pub fn new(cfg: &TextConfig, tie_word_embeddings: bool, vb: VarBuilder) -> Result<Self> {
        let text = vb.pp("model.text_model");
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
            rope: RotaryTable::new(cfg, vb.dtype(), vb.device())?,
            layout: adapter_layout(cfg),
        })
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Runs the decoder layers over a stacked batch. `embeds`: `[tokens, hidden]`;
    /// `positions`: `[tokens]` (u32), each sequence's rows numbered from its cache length.
    /// Returns the hidden states `[tokens, hidden]` before the final norm, which `logits`
    /// applies to the few rows that need it.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        seqs: &mut [SequenceRows<'_>],
        pool: &mut KvPool,
        lora: &LoraBatch<'_>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rope.select(positions)?;
        let mut xs = embeds.clone();
        for (index, layer) in self.layers.iter().enumerate() {
            let step = LayerStep {
                layer: index,
                cos: &cos,
                sin: &sin,
                lora,
            };
            xs = layer.forward(&xs, &step, seqs, pool)?;
        }
        for seq in seqs.iter_mut() {
            seq.kv.commit(seq.len);
        }
        Ok(xs)
    }

    /// Quantizes every projection and the head to Q8_0 (see `VisionLanguageModel::quantize_text`).
    pub fn quantize_q8_0(&mut self) -> Result<usize> {
        self.each_proj(Proj::quantize_q8_0)
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

/// Adapter slots of a layer: qkv, o, gate_up, down; after the layers' comes the head's.
const SLOTS_PER_LAYER: usize = 4;

/// PEFT's module names for each slot, in the order `DecoderLayer::forward` applies them.
fn adapter_layout(cfg: &TextConfig) -> AdapterLayout {
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.num_kv_heads() * cfg.head_dim(),
    );
    let spec = |name: String, in_features, out_features| ModuleSpec {
        name,
        in_features,
        out_features,
    };
    let mut slots = Vec::with_capacity(cfg.num_hidden_layers * SLOTS_PER_LAYER + 1);
    for i in 0..cfg.num_hidden_layers {
        let m = |name: &str| format!("model.text_model.layers.{i}.{name}");
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
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_kv_heads());
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
        let rope = |t: Tensor, heads: usize| -> Result<Tensor> {
            let t = t.reshape((1, tokens, heads, self.head_dim))?;
            candle_nn::rotary_emb::rope_thd(&t, cos, sin)?.squeeze(0)
        };
        let qkv = step.project(&self.qkv_proj, 0, &hs)?;
        let (q_width, kv_width) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let q = rope(qkv.narrow(1, 0, q_width)?.contiguous()?, self.num_heads)?;
        let k = rope(qkv.narrow(1, q_width, kv_width)?.contiguous()?, self.num_kv_heads)?;
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
    /// `keys`/`values` `[start + n, kv_heads, head_dim]`. Query heads that share a KV head
    /// are grouped into one matmul instead of repeating the keys.
    fn attention(&self, q: &Tensor, keys: &Tensor, values: &Tensor, start: usize) -> Result<Tensor> {
        let n = q.dim(0)?;
        let total = keys.dim(0)?;
        let group = self.num_heads / self.num_kv_heads;
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = (q.transpose(0, 1)?.contiguous()? * scale)?.reshape((self.num_kv_heads, group * n, self.head_dim))?;
        // A 16-bit cache (`--kv-cache-dtype`) is widened to the compute dtype.
        let k = keys.to_dtype(q.dtype())?.transpose(0, 1)?;
        let v = values.to_dtype(q.dtype())?.transpose(0, 1)?;
        let mut scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let probs = if kernels::applies(&scores) && scores.is_contiguous() {
            // Rows are (KV head, query head, query): query i is row % n.
            kernels::causal_softmax_in_place(&scores, n, start)?;
            scores
        } else {
            if n > 1 {
                let mask = causal_mask(n, start, total, q.device())?;
                scores = scores
                    .reshape((self.num_kv_heads, group, n, total))?
                    .broadcast_add(&mask)?;
                scores = scores.reshape((self.num_kv_heads, group * n, total))?;
            }
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let probs = probs.to_dtype(v.dtype())?;
        probs
            .matmul(&v)?
            .reshape((self.num_heads, n, self.head_dim))?
            .transpose(0, 1)?
            .reshape((n, self.num_heads * self.head_dim))
    }
}

/// `[n, total]`: query i (at position start + i) sees keys 0..=start + i.
fn causal_mask(n: usize, start: usize, total: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..total).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_lets_a_chunk_see_the_cached_prefix() -> Result<()> {
        let mask = causal_mask(2, 3, 5, &Device::Cpu)?.to_vec2::<f32>()?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(mask, vec![vec![0.0, 0.0, 0.0, 0.0, inf], vec![0.0; 5]]);
        Ok(())
    }

    #[test]
    fn rotary_table_matches_transformers_at_a_far_position() -> Result<()> {
        let cfg: TextConfig = serde_json::from_str(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 100000, "max_position_embeddings": 1024}"#,
        )
        .unwrap();
        let table = RotaryTable::new(&cfg, DType::F32, &Device::Cpu)?;
        let cos = table.cos.get(1000)?.to_vec1::<f32>()?;
        // torch: inv_freq = 1 / 100000 ** (arange(0, 16, 2) / 16); cos(1000 * inv_freq)[1]
        let expected = (1000f64 / 100000f64.powf(2.0 / 16.0)).cos() as f32;
        assert!((cos[1] - expected).abs() < 1e-4, "{} vs {expected}", cos[1]);
        assert_eq!(cos.len(), 8);
        Ok(())
    }
}
