//! BLIP's image-text retrieval (Li et al., "BLIP: Bootstrapping Language-Image
//! Pre-training", arXiv:2201.12086; the design of ALBEF, "Align before Fuse",
//! arXiv:2107.07651) as transformers' `BlipForImageTextRetrieval`: a ViT and a BERT text
//! encoder aligned contrastively (ITC: `vision_proj` and `text_proj` of their first
//! positions, normalised; a pair's score their cosine), and an image-text matching head
//! (ITM) over the text encoder run with cross-attention to the image's patches: a pair's
//! match probability is the softmax of `itm_head`'s two logits.

pub mod config;
pub mod text;

use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor, bail};
use candle_nn::{Linear, VarBuilder, linear};

pub use config::BlipConfig;

use crate::model::embedding::{EmbeddingInfo, EmbeddingModel, Scoring, TextRules, unit_rows};
use crate::model::encoder::{self, AttentionNames, Encoder, Mask};
use crate::model::ops::norm::LayerNorm;
use crate::model::registry::EmbeddingFamily;
use crate::model::square_image::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Resize, SquareDefaults, SquareInputs};
use crate::model::weights::SafetensorsWeights;
use crate::model::{LoadError, ModelFiles, Pixels, on_compute_pool};
use text::{CrossInputs, TextEncoder};

pub const BLIP_RETRIEVAL: EmbeddingFamily = EmbeddingFamily {
    architectures: &["BlipForImageTextRetrieval"],
    load: |files, dtype, device| Ok(Box::new(Blip::load(files, dtype, device)?)),
    inputs: |files| Ok(Box::new(inputs(files)?)),
};

pub struct Blip {
    vision: VisionTower,
    text: TextEncoder,
    vision_proj: Linear,
    text_proj: Linear,
    itm_head: Linear,
    info: EmbeddingInfo,
}

struct VisionTower {
    patch_weight: Tensor,
    patch_bias: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    patch_size: usize,
    image_size: usize,
}

impl Blip {
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let config = BlipConfig::load(&files.config)?;
        let vb = SafetensorsWeights::open(&files.weights)?.into_var_builder(dtype, device);
        Self::new(&config, vb).map_err(|e| LoadError::Tensor { message: e.to_string() })
    }

    pub fn new(config: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        let (t, v) = (&config.text_config, &config.vision_config);
        let (d, p) = (v.hidden_size, v.patch_size);
        let vision_vb = vb.pp("vision_model");
        let emb = vision_vb.pp("embeddings");
        let positions = (v.image_size / p).pow(2) + 1;
        let vision = VisionTower {
            patch_weight: encoder::patch_weight(&emb, (d, 3, p))?,
            patch_bias: emb.get(d, "patch_embedding.bias")?,
            class_embedding: emb.get((1, 1, d), "class_embedding")?.reshape(d)?,
            position_embedding: emb
                .get((1, positions, d), "position_embedding")?
                .reshape((positions, d))?,
            encoder: Encoder::with_names(
                &v.encoder(),
                Mask::Bidirectional,
                AttentionNames::Stacked,
                vision_vb.pp("encoder"),
            )?,
            post_layernorm: LayerNorm::new(d, v.layer_norm_eps, vision_vb.pp("post_layernorm"))?,
            patch_size: p,
            image_size: v.image_size,
        };
        let proj = config.image_text_hidden_size;
        Ok(Self {
            vision,
            text: TextEncoder::new(t, d, vb.pp("text_encoder"))?,
            vision_proj: linear(d, proj, vb.pp("vision_proj"))?,
            text_proj: linear(t.hidden_size, proj, vb.pp("text_proj"))?,
            itm_head: linear(t.hidden_size, 2, vb.pp("itm_head"))?,
            info: EmbeddingInfo {
                architecture: "BlipForImageTextRetrieval".into(),
                dim: proj,
                // ITC's score is the cosine itself (transformers applies no temperature).
                scoring: Scoring::Softmax { scale: 1.0 },
                matching: true,
            },
        })
    }
}

impl EmbeddingModel for Blip {
    fn info(&self) -> &EmbeddingInfo {
        &self.info
    }

    fn embed_texts(&self, texts: &[&[u32]]) -> Result<Tensor> {
        on_compute_pool(|| {
            let first = self.text.forward(texts, None)?;
            unit_rows(&self.text_proj.forward(&first)?.to_dtype(DType::F32)?)
        })
    }

    fn embed_images(&self, images: &[&Pixels]) -> Result<Tensor> {
        on_compute_pool(|| {
            let class_rows = self.vision.class_states(images)?;
            unit_rows(&self.vision_proj.forward(&class_rows)?.to_dtype(DType::F32)?)
        })
    }

    fn match_pairs(&self, texts: &[&[u32]], images: &[&Pixels], image_of: &[usize]) -> Result<Vec<f32>> {
        if texts.len() != image_of.len() || image_of.iter().any(|&i| i >= images.len()) {
            bail!(
                "{} texts paired with {image_of:?} of {} images",
                texts.len(),
                images.len()
            )
        }
        on_compute_pool(|| {
            let states = self.vision.forward(images)?;
            let images: Vec<Tensor> = (0..images.len()).map(|i| states.i(i)).collect::<Result<_>>()?;
            let cross = CrossInputs {
                images: &images,
                image_of,
            };
            let first = self.text.forward(texts, Some(&cross))?;
            let logits = self.itm_head.forward(&first)?.to_dtype(DType::F32)?;
            let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
            probs.i((.., 1))?.to_vec1::<f32>()
        })
    }
}

impl VisionTower {
    /// Every position's post-layer-normed state, `[n, patches + 1, hidden]`.
    fn forward(&self, images: &[&Pixels]) -> Result<Tensor> {
        let (xs, lens) = self.embed(images)?;
        let (n, d) = (lens.len(), xs.dim(1)?);
        let xs = self.encoder.forward(&xs, &lens)?;
        self.post_layernorm.forward(&xs)?.reshape((n, lens[0], d))
    }

    /// The post-layer-normed class token alone, `[n, hidden]` (the contrastive embedding).
    fn class_states(&self, images: &[&Pixels]) -> Result<Tensor> {
        let (xs, lens) = self.embed(images)?;
        let class = vec![0; lens.len()];
        self.post_layernorm
            .forward(&self.encoder.forward_pooled(&xs, &lens, &class)?)
    }

    /// The encoder's input: class token and patches plus positions, `[n * (patches + 1),
    /// hidden]`, and each image's row count.
    fn embed(&self, images: &[&Pixels]) -> Result<(Tensor, Vec<usize>)> {
        let d = self.class_embedding.dim(0)?;
        let values = images.iter().map(|p| &p.values).collect::<Vec<_>>();
        let pixels =
            (Tensor::cat(&values, 0)?.to_device(self.patch_weight.device()))?.to_dtype(self.patch_weight.dtype())?;
        let (n, _, h, w) = pixels.dims4()?;
        if h != self.image_size || w != self.image_size {
            bail!("images must be {0}x{0}, got {h}x{w}", self.image_size)
        }
        let per_image = (self.image_size / self.patch_size).pow(2);
        let patches = encoder::patches(&pixels, self.patch_size)?
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?
            .reshape((n, per_image, d))?;
        let class = self.class_embedding.reshape((1, 1, d))?.broadcast_as((n, 1, d))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embedding)?
            .reshape((n * (per_image + 1), d))?;
        Ok((xs, vec![per_image + 1; n]))
    }
}

/// BLIP's side of preparing inputs: texts as its (BERT) tokenizer makes them, images as
/// `BlipImageProcessor` (a fixed square, bicubic, CLIP's normalisation).
pub fn inputs(files: &ModelFiles) -> std::result::Result<SquareInputs, LoadError> {
    let config = BlipConfig::load(&files.config)?;
    let defaults = SquareDefaults {
        resize: Resize::Exact(384, 384),
        crop: None,
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
