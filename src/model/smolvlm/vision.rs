//! SmolVLM's vision encoder: SigLIP as transformers' `Idefics3VisionTransformer` runs it
//! (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", arXiv:2303.15343).
//!
//! Every tile the processor produces is a full `image_size` square, so every patch is real
//! and the NaViT-style bucketed position ids reduce to `0..num_patches`. All tiles of a
//! request go through the linear layers as one `[tiles * patches, hidden]` matrix, each
//! with its bias, activation and residual in one pass over its output (`epilogue`);
//! attention runs tile by tile and head by head so that its scores stay small.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear};

use crate::model::ops::epilogue::{self, Then};
use crate::model::ops::frame_attention;
use crate::model::ops::norm::LayerNorm;

use super::config::VisionConfig;

/// At most this many bytes of attention scores per task of `frame_attention` (at least one
/// query row's).
const SCORES_BYTES: usize = 4 << 20;

pub struct VisionTransformer {
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    patch_size: usize,
    image_size: usize,
    hidden_size: usize,
    /// `SCORES_BYTES`, or less in tests.
    scores_bytes: usize,
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    /// q, k and v stacked into one matrix (one GEMM over the activations), q already
    /// multiplied by the attention scale where that is exact (see `new`).
    qkv_proj: Linear,
    /// The scale still to apply to q (1 when folded into the weights).
    q_scale: f64,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
    exact_gelu: bool,
}

fn norm(cfg: &VisionConfig, vb: VarBuilder) -> Result<LayerNorm> {
    LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb)
}

impl VisionTransformer {
    /// `vb` points at `model.vision_model`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let emb = vb.pp("embeddings");
        // The patch convolution (kernel = stride = patch) is a matmul over flattened patches.
        let patch_weight = emb
            .get((d, c, p, p), "patch_embedding.weight")?
            .reshape((d, c * p * p))?;
        let patch_bias = emb.get(d, "patch_embedding.bias")?;
        let num_patches = (cfg.image_size / p) * (cfg.image_size / p);
        let position_embedding = emb.get((num_patches, d), "position_embedding.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_weight,
            patch_bias,
            position_embedding,
            layers,
            post_layernorm: norm(cfg, vb.pp("post_layernorm"))?,
            patch_size: p,
            image_size: cfg.image_size,
            hidden_size: d,
            scores_bytes: SCORES_BYTES,
        })
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// `[tiles, 3, image_size, image_size]` -> `[tiles, patches, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (tiles, channels, h, w) = pixel_values.dims4()?;
        if h != self.image_size || w != self.image_size {
            candle_core::bail!("vision tiles must be {0}x{0}, got {h}x{w}", self.image_size)
        }
        let (p, side) = (self.patch_size, self.image_size / self.patch_size);
        let patches = pixel_values
            .reshape((tiles, channels, side, p, side, p))?
            .permute([0usize, 2, 4, 1, 3, 5])?
            .reshape((tiles * side * side, channels * p * p))?;
        let embeds = patches
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;
        let mut xs = embeds
            .reshape((tiles, side * side, self.hidden_size))?
            .broadcast_add(&self.position_embedding)?
            .reshape((tiles * side * side, self.hidden_size))?;
        for layer in &self.layers {
            xs = layer.forward(&xs, tiles, self.scores_bytes)?;
        }
        self.post_layernorm
            .forward(&xs)?
            .reshape((tiles, side * side, self.hidden_size))
    }
}

impl EncoderLayer {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        // transformers scales q·kᵀ by head_dim^-0.5; a power of two (head_dim 64: 1/8) scales
        // every product and sum exactly, so it can scale q's weights and bias instead.
        let scale = ((d / cfg.num_attention_heads) as f64).powf(-0.5);
        let (q_weight_scale, q_scale) = if scale.log2().fract() == 0.0 {
            (scale, 1.0)
        } else {
            (1.0, scale)
        };
        let q = linear(d, d, attn.pp("q_proj"))?;
        let q = Linear::new(
            (q.weight() * q_weight_scale)?,
            q.bias().map(|b| b * q_weight_scale).transpose()?,
        );
        let (k, v) = (linear(d, d, attn.pp("k_proj"))?, linear(d, d, attn.pp("v_proj"))?);
        let qkv_weight = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
        let qkv_bias = match (q.bias(), k.bias(), v.bias()) {
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
            _ => None,
        };
        Ok(Self {
            layer_norm1: norm(cfg, vb.pp("layer_norm1"))?,
            qkv_proj: Linear::new(qkv_weight, qkv_bias),
            q_scale,
            out_proj: linear(d, d, attn.pp("out_proj"))?,
            layer_norm2: norm(cfg, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            num_heads: cfg.num_attention_heads,
            exact_gelu: cfg.hidden_act == "gelu",
        })
    }

    /// `xs`: `[tiles * patches, hidden]`.
    fn forward(&self, xs: &Tensor, tiles: usize, scores_bytes: usize) -> Result<Tensor> {
        let hs = self.attention(&self.layer_norm1.forward(xs)?, tiles, xs, scores_bytes)?;
        let normed = self.layer_norm2.forward(&hs)?;
        let mlp = if self.exact_gelu {
            self.fc1.forward(&normed)?.gelu_erf()?
        } else {
            epilogue::linear(&self.fc1, &normed, Then::GeluTanh)?
        };
        epilogue::linear(&self.fc2, &mlp, Then::Add(&hs))
    }

    /// Self-attention of `xs` plus `residual`, with at most `scores_bytes` of scores at a
    /// time.
    fn attention(&self, xs: &Tensor, tiles: usize, residual: &Tensor, scores_bytes: usize) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let patches = rows / tiles;
        let head_dim = d / self.num_heads;
        let qkv = epilogue::linear(&self.qkv_proj, xs, Then::Nothing)?.reshape((rows, 3, self.num_heads, head_dim))?;
        let mut q = qkv.narrow(1, 0, 1)?.squeeze(1)?;
        if self.q_scale != 1.0 {
            q = (q * self.q_scale)?;
        }
        let (k, v) = (qkv.narrow(1, 1, 1)?.squeeze(1)?, qkv.narrow(1, 2, 1)?.squeeze(1)?);
        let out = frame_attention::attention(&q, &k, &v, &vec![patches; tiles], scores_bytes)?;
        epilogue::linear(&self.out_proj, &out, Then::Add(residual))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn attention_a_block_of_queries_at_a_time_equals_the_whole_tile() -> Result<()> {
        let cfg: VisionConfig = serde_json::from_str(
            r#"{"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "image_size": 64, "patch_size": 8}"#,
        )
        .expect("a vision config");
        let vb = crate::model::weights::random_var_builder();
        let mut model = VisionTransformer::new(&cfg, vb)?;
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu)?;
        let all = model.forward(&pixels)?.flatten_all()?.to_vec1::<f32>()?;
        // 64 patches: 256 bytes of scores per query row.
        for queries in [1, 5] {
            model.scores_bytes = queries * 256;
            let chunked = model.forward(&pixels)?.flatten_all()?.to_vec1::<f32>()?;
            // gemm takes one row and several by different kernels: equal up to rounding.
            let largest = chunked
                .iter()
                .zip(&all)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(largest < 1e-4, "{queries} queries at a time: {largest}");
        }
        Ok(())
    }
}
