//! SigLIP (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", arXiv:2303.15343)
//! as transformers' `SiglipModel`: a ViT whose patches an attention-pooling head (a learned
//! probe attending to them) reduces to the image's embedding, and a bidirectional text
//! transformer over texts padded to 64 tokens whose last position, through a linear head,
//! is the text's. A pair's logit is `scale · cos + bias`, its probability the sigmoid.

pub mod config;

use candle_core::{D, DType, Device, Module, Result, Tensor, bail};
use candle_nn::{Linear, VarBuilder, linear};

pub use config::SiglipConfig;

use crate::model::embedding::{EmbeddingInfo, EmbeddingModel, Scoring, TextRules, unit_rows};
use crate::model::encoder::{self, Activation, Encoder, Mask};
use crate::model::ops::epilogue::{self, Then};
use crate::model::ops::norm::LayerNorm;
use crate::model::registry::EmbeddingFamily;
use crate::model::square_image::{Resize, SquareDefaults, SquareInputs};
use crate::model::weights::SafetensorsWeights;
use crate::model::{LoadError, ModelFiles, Pixels, on_compute_pool};

pub const SIGLIP: EmbeddingFamily = EmbeddingFamily {
    architectures: &["SiglipModel"],
    load: |files, dtype, device| Ok(Box::new(Siglip::load(files, dtype, device)?)),
    inputs: |files| Ok(Box::new(inputs(files)?)),
};

pub struct Siglip {
    text: TextTower,
    vision: VisionTower,
    info: EmbeddingInfo,
}

struct TextTower {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    head: Linear,
}

struct VisionTower {
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    head: PoolingHead,
    patch_size: usize,
    image_size: usize,
}

/// `SiglipMultiheadAttentionPoolingHead`: a learned probe attends to every patch
/// (`torch.nn.MultiheadAttention`), then a residual MLP.
struct PoolingHead {
    /// The probe's query, already projected and scaled (it is a constant), `[1, hidden]`.
    query: Tensor,
    kv_proj: Linear,
    out_proj: Linear,
    layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
    num_heads: usize,
}

impl Siglip {
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let config = SiglipConfig::load(&files.config)?;
        let vb = SafetensorsWeights::open(&files.weights)?.into_var_builder(dtype, device);
        Self::new(&config, vb).map_err(|e| LoadError::Tensor { message: e.to_string() })
    }

    pub fn new(config: &SiglipConfig, vb: VarBuilder) -> Result<Self> {
        let (t, v) = (&config.text_config, &config.vision_config);
        let text_vb = vb.pp("text_model");
        let emb = text_vb.pp("embeddings");
        let text = TextTower {
            token_embedding: emb.get((t.vocab_size, t.hidden_size), "token_embedding.weight")?,
            position_embedding: emb.get((t.max_position_embeddings, t.hidden_size), "position_embedding.weight")?,
            encoder: Encoder::new(&t.encoder(), Mask::Bidirectional, text_vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::new(t.hidden_size, t.layer_norm_eps, text_vb.pp("final_layer_norm"))?,
            head: linear(t.hidden_size, t.projection(), text_vb.pp("head"))?,
        };
        let vision_vb = vb.pp("vision_model");
        let emb = vision_vb.pp("embeddings");
        let d = v.hidden_size;
        let patches = (v.image_size / v.patch_size).pow(2);
        let vision = VisionTower {
            patch_weight: encoder::patch_weight(&emb, (d, v.num_channels, v.patch_size))?,
            patch_bias: emb.get(d, "patch_embedding.bias")?,
            position_embedding: emb.get((patches, d), "position_embedding.weight")?,
            encoder: Encoder::new(&v.encoder(), Mask::Bidirectional, vision_vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(d, v.layer_norm_eps, vision_vb.pp("post_layernorm"))?,
            head: PoolingHead::new(config, vision_vb.pp("head"))?,
            patch_size: v.patch_size,
            image_size: v.image_size,
        };
        let scalar = |name: &str| -> Result<f32> { vb.get(1, name)?.to_dtype(DType::F32)?.squeeze(0)?.to_scalar() };
        let scoring = Scoring::Sigmoid {
            scale: scalar("logit_scale")?.exp(),
            bias: scalar("logit_bias")?,
        };
        Ok(Self {
            text,
            vision,
            info: EmbeddingInfo {
                architecture: "SiglipModel".into(),
                dim: d,
                scoring,
                matching: false,
            },
        })
    }
}

impl EmbeddingModel for Siglip {
    fn info(&self) -> &EmbeddingInfo {
        &self.info
    }

    fn embed_texts(&self, texts: &[&[u32]]) -> Result<Tensor> {
        on_compute_pool(|| unit_rows(&self.text.forward(texts)?.to_dtype(DType::F32)?))
    }

    fn embed_images(&self, images: &[&Pixels]) -> Result<Tensor> {
        on_compute_pool(|| unit_rows(&self.vision.forward(images)?.to_dtype(DType::F32)?))
    }
}

impl TextTower {
    /// The head's output at each text's last position, `[n, projection]`.
    fn forward(&self, texts: &[&[u32]]) -> Result<Tensor> {
        let (xs, lens) = encoder::embed_tokens(&self.token_embedding, &self.position_embedding, texts)?;
        let last: Vec<usize> = lens.iter().map(|len| len - 1).collect();
        let pooled = self.encoder.forward_pooled(&xs, &lens, &last)?;
        self.head.forward(&self.final_layer_norm.forward(&pooled)?)
    }
}

impl VisionTower {
    /// The pooling head's output for each image, `[n, hidden]`.
    fn forward(&self, images: &[&Pixels]) -> Result<Tensor> {
        let values = images.iter().map(|p| &p.values).collect::<Vec<_>>();
        let pixels =
            (Tensor::cat(&values, 0)?.to_device(self.patch_weight.device()))?.to_dtype(self.patch_weight.dtype())?;
        let (n, _, h, w) = pixels.dims4()?;
        if h != self.image_size || w != self.image_size {
            bail!("images must be {0}x{0}, got {h}x{w}", self.image_size)
        }
        let (per_image, d) = self.position_embedding.dims2()?;
        let xs = encoder::patches(&pixels, self.patch_size)?
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?
            .reshape((n, per_image, d))?
            .broadcast_add(&self.position_embedding)?
            .reshape((n * per_image, d))?;
        let xs = self.encoder.forward(&xs, &vec![per_image; n])?;
        self.head.forward(&self.post_layernorm.forward(&xs)?, n)
    }
}

impl PoolingHead {
    fn new(config: &SiglipConfig, vb: VarBuilder) -> Result<Self> {
        let v = &config.vision_config;
        let d = v.hidden_size;
        let attn = vb.pp("attention");
        let in_weight = attn.get((3 * d, d), "in_proj_weight")?;
        let in_bias = attn.get(3 * d, "in_proj_bias")?;
        let probe = vb.get((1, 1, d), "probe")?.reshape((1, d))?;
        // torch's MultiheadAttention scales the projected query by head_dim^-0.5.
        let scale = ((d / v.num_attention_heads) as f64).powf(-0.5);
        let query = ((probe
            .matmul(&in_weight.narrow(0, 0, d)?.t()?)?
            .broadcast_add(&in_bias.narrow(0, 0, d)?))?
            * scale)?;
        Ok(Self {
            query,
            kv_proj: Linear::new(in_weight.narrow(0, d, 2 * d)?, Some(in_bias.narrow(0, d, 2 * d)?)),
            out_proj: linear(d, d, attn.pp("out_proj"))?,
            layernorm: LayerNorm::new(d, v.layer_norm_eps, vb.pp("layernorm"))?,
            fc1: linear(d, v.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(v.intermediate_size, d, vb.pp("mlp.fc2"))?,
            activation: Activation::from_hf(&v.hidden_act).unwrap_or(Activation::GeluTanh),
            num_heads: v.num_attention_heads,
        })
    }

    /// `xs`: `[n * patches, hidden]`, the patches of `n` images; returns `[n, hidden]`.
    fn forward(&self, xs: &Tensor, n: usize) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let (heads, patches) = (self.num_heads, rows / n);
        let head_dim = d / heads;
        let kv = epilogue::linear(&self.kv_proj, xs, Then::Nothing)?.reshape((n, patches, 2, heads, head_dim))?;
        let k = kv.narrow(2, 0, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?; // [n, heads, patches, hd]
        let v = kv.narrow(2, 1, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?;
        let q = self
            .query
            .reshape((1, heads, 1, head_dim))?
            .broadcast_as((n, heads, 1, head_dim))?
            .contiguous()?;
        let scores = q.matmul(&k.transpose(2, 3)?)?; // [n, heads, 1, patches]
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let attended = probs.matmul(&v)?.reshape((n, d))?;
        let hs = self.out_proj.forward(&attended)?;
        let normed = self.layernorm.forward(&hs)?;
        let mlp = self.activation.after(&self.fc1, &normed)?;
        epilogue::linear(&self.fc2, &mlp, Then::Add(&hs))
    }
}

/// SigLIP's side of preparing inputs: texts canonicalised and padded to the model's 64
/// positions (`SiglipProcessor(padding="max_length")`, as the model card asks), images
/// resized to the model's square as `SiglipImageProcessor`.
pub fn inputs(files: &ModelFiles) -> std::result::Result<SquareInputs, LoadError> {
    let config = SiglipConfig::load(&files.config)?;
    let defaults = SquareDefaults {
        resize: Resize::Exact(224, 224),
        crop: None,
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    let rules = TextRules {
        max_tokens: config.text_config.max_position_embeddings,
        canonicalize: true,
        pad_id: Some(config.text_config.pad_token_id),
    };
    SquareInputs::load(files, rules, defaults, config.vision_config.image_size)
}
