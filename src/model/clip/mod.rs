//! CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language
//! Supervision", arXiv:2103.00020) as transformers' `CLIPModel`: a ViT whose class token,
//! normalised and projected, is the image's embedding, and a causal text transformer whose
//! end-of-text position, normalised and projected, is the text's. Weights as in the hub
//! tree (`vision_model`, `text_model`, `visual_projection`, `text_projection`,
//! `logit_scale`).
//!
//! candle-transformers' `clip` hard-codes the layer-norm epsilon and the text activation
//! and pools by the highest token id only; this one reads them from the config and runs on
//! the shared encoder's kernels (`model::encoder`).

pub mod config;

use candle_core::{DType, Device, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;

pub use config::ClipConfig;

use crate::model::embedding::{EmbeddingInfo, EmbeddingModel, Scoring, TextRules, unit_rows};
use crate::model::encoder::{self, Encoder, Mask};
use crate::model::ops::norm::LayerNorm;
use crate::model::registry::EmbeddingFamily;
use crate::model::square_image::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Resize, SquareDefaults, SquareInputs};
use crate::model::weights::SafetensorsWeights;
use crate::model::{LoadError, ModelFiles, Pixels, on_compute_pool};
use config::Pooling;

pub const CLIP: EmbeddingFamily = EmbeddingFamily {
    architectures: &["CLIPModel"],
    load: |files, dtype, device| Ok(Box::new(Clip::load(files, dtype, device)?)),
    inputs: |files| Ok(Box::new(inputs(files)?)),
};

pub struct Clip {
    text: TextTower,
    vision: VisionTower,
    text_projection: Tensor,
    visual_projection: Tensor,
    info: EmbeddingInfo,
}

struct TextTower {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    pooling: Pooling,
}

struct VisionTower {
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    patch_size: usize,
    image_size: usize,
}

impl Clip {
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let config = ClipConfig::load(&files.config)?;
        let vb = SafetensorsWeights::open(&files.weights)?.into_var_builder(dtype, device);
        Self::new(&config, vb).map_err(|e| LoadError::Tensor { message: e.to_string() })
    }

    pub fn new(config: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let (t, v, proj) = (&config.text_config, &config.vision_config, config.projection_dim);
        let text_vb = vb.pp("text_model");
        let emb = text_vb.pp("embeddings");
        let text = TextTower {
            token_embedding: emb.get((t.vocab_size, t.hidden_size), "token_embedding.weight")?,
            position_embedding: emb.get((t.max_position_embeddings, t.hidden_size), "position_embedding.weight")?,
            encoder: Encoder::new(&t.encoder(), Mask::Causal, text_vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::new(t.hidden_size, t.layer_norm_eps, text_vb.pp("final_layer_norm"))?,
            pooling: config.pooling(),
        };
        let vision_vb = vb.pp("vision_model");
        let emb = vision_vb.pp("embeddings");
        let positions = (v.image_size / v.patch_size).pow(2) + 1;
        let d = v.hidden_size;
        let vision = VisionTower {
            patch_weight: encoder::patch_weight(&emb, (d, v.num_channels, v.patch_size))?,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb.get((positions, d), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(d, v.layer_norm_eps, vision_vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(&v.encoder(), Mask::Bidirectional, vision_vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(d, v.layer_norm_eps, vision_vb.pp("post_layernorm"))?,
            patch_size: v.patch_size,
            image_size: v.image_size,
        };
        let logit_scale = match vb.contains_tensor("logit_scale") {
            true => vb.get((), "logit_scale")?.to_dtype(DType::F32)?.to_scalar::<f32>()?,
            false => config.logit_scale_init_value,
        };
        Ok(Self {
            text,
            vision,
            text_projection: vb.get((proj, t.hidden_size), "text_projection.weight")?,
            visual_projection: vb.get((proj, d), "visual_projection.weight")?,
            info: EmbeddingInfo {
                architecture: "CLIPModel".into(),
                dim: proj,
                scoring: Scoring::Softmax {
                    scale: logit_scale.exp(),
                },
                matching: false,
            },
        })
    }
}

impl EmbeddingModel for Clip {
    fn info(&self) -> &EmbeddingInfo {
        &self.info
    }

    fn embed_texts(&self, texts: &[&[u32]]) -> Result<Tensor> {
        on_compute_pool(|| {
            let pooled = self.text.forward(texts)?;
            unit_rows(&pooled.matmul(&self.text_projection.t()?)?.to_dtype(DType::F32)?)
        })
    }

    fn embed_images(&self, images: &[&Pixels]) -> Result<Tensor> {
        on_compute_pool(|| {
            let pooled = self.vision.forward(images)?;
            unit_rows(&pooled.matmul(&self.visual_projection.t()?)?.to_dtype(DType::F32)?)
        })
    }
}

impl TextTower {
    /// The final-layer-normed state at each text's pooled position, `[n, hidden]`.
    fn forward(&self, texts: &[&[u32]]) -> Result<Tensor> {
        let (xs, lens) = encoder::embed_tokens(&self.token_embedding, &self.position_embedding, texts)?;
        let pooled: Vec<usize> = texts.iter().map(|text| self.pooling.position(text)).collect();
        // The norm is per row: normalising only the pooled rows gives the same values.
        self.final_layer_norm
            .forward(&self.encoder.forward_pooled(&xs, &lens, &pooled)?)
    }
}

impl VisionTower {
    /// The post-layer-normed class token of each image, `[n, hidden]`.
    fn forward(&self, images: &[&Pixels]) -> Result<Tensor> {
        let (d, device) = (self.class_embedding.dim(0)?, self.class_embedding.device());
        let values = images.iter().map(|p| &p.values).collect::<Vec<_>>();
        let pixels = Tensor::cat(&values, 0)?
            .to_device(device)?
            .to_dtype(self.patch_weight.dtype())?;
        let (n, _, h, w) = pixels.dims4()?;
        if h != self.image_size || w != self.image_size {
            bail!("images must be {0}x{0}, got {h}x{w}", self.image_size)
        }
        let per_image = (self.image_size / self.patch_size).pow(2);
        let patches = encoder::patches(&pixels, self.patch_size)?
            .matmul(&self.patch_weight.t()?)?
            .reshape((n, per_image, d))?;
        let class = self.class_embedding.reshape((1, 1, d))?.broadcast_as((n, 1, d))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embedding)?
            .reshape((n * (per_image + 1), d))?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        let class_rows = self.encoder.forward_pooled(&xs, &vec![per_image + 1; n], &vec![0; n])?;
        self.post_layernorm.forward(&class_rows)
    }
}

/// CLIP's side of preparing inputs: texts as its tokenizer makes them (no padding: the
/// text tower is causal and pools at the end of text), images as `CLIPImageProcessor`.
pub fn inputs(files: &ModelFiles) -> std::result::Result<SquareInputs, LoadError> {
    let config = ClipConfig::load(&files.config)?;
    let defaults = SquareDefaults {
        resize: Resize::ShortestEdge(224),
        crop: Some(224),
        mean: OPENAI_CLIP_MEAN,
        std: OPENAI_CLIP_STD,
    };
    let rules = TextRules {
        max_tokens: config.text_config.max_position_embeddings,
        canonicalize: false,
        pad_id: None,
    };
    SquareInputs::load(files, rules, defaults, config.vision_config.image_size)
}
