//! SmolVLM's vision encoder: SigLIP as transformers' `Idefics3VisionTransformer` runs it
//! (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", arXiv:2303.15343).
//!
//! Every tile the processor produces is a full `image_size` square, so every patch is real
//! and the NaViT-style bucketed position ids reduce to `0..num_patches`. All tiles of a
//! request go through the linear layers as one `[tiles * patches, hidden]` matrix, each
//! with its bias, activation and residual in one pass over its output (`epilogue`);
//! attention runs tile by tile and head by head so that its scores stay small.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::encoder::{self, Activation, Encoder, EncoderConfig, EncoderLora, Mask};
use crate::model::lora::ModuleSpec;
use crate::model::ops::norm::LayerNorm;

use super::config::VisionConfig;

pub struct VisionTransformer {
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    patch_size: usize,
    image_size: usize,
    hidden_size: usize,
    /// PEFT's names for the encoder's LoRA slots.
    adapter_slots: Vec<Vec<ModuleSpec>>,
}

impl VisionTransformer {
    /// `vb` points at `model.vision_model`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let emb = vb.pp("embeddings");
        // The patch convolution (kernel = stride = patch) is a matmul over flattened patches.
        let patch_weight = encoder::patch_weight(&emb, (d, c, p))?;
        let patch_bias = emb.get(d, "patch_embedding.bias")?;
        let num_patches = (cfg.image_size / p) * (cfg.image_size / p);
        let position_embedding = emb.get((num_patches, d), "position_embedding.weight")?;
        let activation = Activation::from_hf(&cfg.hidden_act).unwrap_or(Activation::GeluTanh);
        let encoder_config = EncoderConfig {
            hidden_size: d,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            layer_norm_eps: cfg.layer_norm_eps,
            activation,
        };
        let adapter_slots = encoder::adapter_slots("model.vision_model.encoder", &encoder_config);
        Ok(Self {
            adapter_slots,
            patch_weight,
            patch_bias,
            position_embedding,
            encoder: Encoder::new(&encoder_config, Mask::Bidirectional, vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            patch_size: p,
            image_size: cfg.image_size,
            hidden_size: d,
        })
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// The encoder's LoRA slots, as `lora::AdapterLayout` lists them.
    pub fn adapter_slots(&self) -> &[Vec<ModuleSpec>] {
        &self.adapter_slots
    }

    /// `[tiles, 3, image_size, image_size]` -> `[tiles, patches, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward_adapted(pixel_values, None)
    }

    /// `forward` with LoRA adapters on the encoder's projections.
    pub fn forward_adapted(&self, pixel_values: &Tensor, lora: Option<EncoderLora<'_>>) -> Result<Tensor> {
        let (tiles, _, h, w) = pixel_values.dims4()?;
        if h != self.image_size || w != self.image_size {
            candle_core::bail!("vision tiles must be {0}x{0}, got {h}x{w}", self.image_size)
        }
        let per_tile = self.num_patches();
        let embeds = encoder::patches(pixel_values, self.patch_size)?
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;
        let xs = embeds
            .reshape((tiles, per_tile, self.hidden_size))?
            .broadcast_add(&self.position_embedding)?
            .reshape((tiles * per_tile, self.hidden_size))?;
        let xs = self.encoder.forward_adapted(&xs, &vec![per_tile; tiles], lora)?;
        self.post_layernorm
            .forward(&xs)?
            .reshape((tiles, per_tile, self.hidden_size))
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
            model.encoder.scores_bytes = queries * 256;
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
