//! CLIP and SigLIP in candle ops that carry gradients, for `finetune --method contrastive`:
//! the same computation as `model::clip` and `model::siglip` (their parity tests hold the
//! serving path to transformers; a test here holds this one to the serving path), padded
//! batches instead of ragged ones, composed LayerNorm and softmax instead of the fused
//! kernels. Every linear layer is trained whole (`full`) or through a LoRA pair whose
//! product is merged into the weight when saved.

use candle_core::{D, DType, Device, IndexOp, Result, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::text::Trainable;
use crate::model::clip::ClipConfig;
use crate::model::encoder::{Activation, EncoderConfig};
use crate::model::siglip::SiglipConfig;

/// Which weights a run trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weights {
    /// Every weight.
    Full,
    /// A rank-`r` pair beside every linear layer of both towers (scaled by `alpha / r`), and
    /// the logit scale and bias; the rest frozen.
    Lora { r: usize, alpha: f64 },
}

/// What trains, and how each trained linear layer is saved.
pub struct Params {
    weights: Weights,
    vb: VarBuilder<'static>,
    pub trainables: Vec<Trainable>,
    /// LoRA layers: (weight name, frozen weight, A, B, scale), merged when saved.
    pub merges: Vec<(String, Tensor, Tensor, Tensor, f64)>,
    rng: ChaCha8Rng,
}

/// A linear layer, with its LoRA pair when training one.
struct TrainLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<(Tensor, Tensor, f64)>,
}

impl Params {
    pub fn new(vb: VarBuilder<'static>, weights: Weights, seed: u64) -> Self {
        Self {
            weights,
            vb,
            trainables: Vec::new(),
            merges: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn var(&mut self, name: &str, tensor: Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(&tensor)?;
        let t = var.as_tensor().clone();
        self.trainables.push(Trainable {
            name: name.to_string(),
            var,
        });
        Ok(t)
    }

    /// A weight that is not a linear layer's (embeddings, norms, class token): trained
    /// under `Full` only; `always`: trained in both (logit scale and bias).
    fn param(&mut self, name: &str, shape: &[usize], always: bool) -> Result<Tensor> {
        let tensor = self.vb.get(shape, name)?;
        match (self.weights, always) {
            (Weights::Full, _) | (_, true) => self.var(name, tensor),
            _ => Ok(tensor),
        }
    }

    fn linear(&mut self, name: &str, (out, inp): (usize, usize), bias: bool) -> Result<TrainLinear> {
        let weight = self.vb.get((out, inp), &format!("{name}.weight"))?;
        let bias = match bias {
            true => Some(self.param(&format!("{name}.bias"), &[out], false)?),
            false => None,
        };
        match self.weights {
            Weights::Full => Ok(TrainLinear {
                weight: self.var(&format!("{name}.weight"), weight)?,
                bias,
                lora: None,
            }),
            Weights::Lora { r, alpha } => {
                // PEFT's init: A uniform (Kaiming), B zero, so training starts at the base.
                let bound = (1.0 / inp as f64).sqrt();
                let a: Vec<f32> = (0..r * inp)
                    .map(|_| rand::RngExt::random_range(&mut self.rng, -bound..bound) as f32)
                    .collect();
                let a = self.var(
                    &format!("{name}.lora_A"),
                    Tensor::from_vec(a, (r, inp), weight.device())?,
                )?;
                let b = self.var(
                    &format!("{name}.lora_B"),
                    Tensor::zeros((out, r), DType::F32, weight.device())?,
                )?;
                let scale = alpha / r as f64;
                self.merges
                    .push((format!("{name}.weight"), weight.clone(), a.clone(), b.clone(), scale));
                Ok(TrainLinear {
                    weight,
                    bias,
                    lora: Some((a, b, scale)),
                })
            }
        }
    }

    fn norm(&mut self, name: &str, d: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.param(&format!("{name}.weight"), &[d], false)?,
            self.param(&format!("{name}.bias"), &[d], false)?,
        ))
    }
}

impl TrainLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut ys = xs.broadcast_matmul(&self.weight.t()?)?;
        if let Some((a, b, scale)) = &self.lora {
            ys = (ys + (xs.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * *scale)?)?;
        }
        match &self.bias {
            Some(bias) => ys.broadcast_add(bias),
            None => Ok(ys),
        }
    }
}

fn layer_norm(xs: &Tensor, (weight, bias): &(Tensor, Tensor), eps: f64) -> Result<Tensor> {
    let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

fn activate(xs: &Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        Activation::GeluTanh => xs.gelu(),
        Activation::GeluErf => xs.gelu_erf(),
    }
}

/// The pre-norm encoder of `model::encoder`, batched and padded: `[b, n, d]`.
struct TrainEncoder {
    layers: Vec<[TrainLinear; 6]>,
    norms: Vec<[(Tensor, Tensor); 2]>,
    cfg: EncoderConfig,
}

impl TrainEncoder {
    fn new(params: &mut Params, cfg: &EncoderConfig, prefix: &str) -> Result<Self> {
        let (d, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (mut layers, mut norms) = (Vec::new(), Vec::new());
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{prefix}.layers.{i}");
            let lin = |params: &mut Params, name: &str, shape| params.linear(&format!("{l}.{name}"), shape, true);
            layers.push([
                lin(params, "self_attn.q_proj", (d, d))?,
                lin(params, "self_attn.k_proj", (d, d))?,
                lin(params, "self_attn.v_proj", (d, d))?,
                lin(params, "self_attn.out_proj", (d, d))?,
                lin(params, "mlp.fc1", (inter, d))?,
                lin(params, "mlp.fc2", (d, inter))?,
            ]);
            norms.push([
                params.norm(&format!("{l}.layer_norm1"), d)?,
                params.norm(&format!("{l}.layer_norm2"), d)?,
            ]);
        }
        Ok(Self {
            layers,
            norms,
            cfg: cfg.clone(),
        })
    }

    /// `mask`: added to the scores, `[n, n]` (CLIP's causal mask) or none.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let hd = d / heads;
        let eps = self.cfg.layer_norm_eps;
        let mut xs = xs.clone();
        for ([q, k, v, out, fc1, fc2], [norm1, norm2]) in self.layers.iter().zip(&self.norms) {
            let hs = layer_norm(&xs, norm1, eps)?;
            let split = |t: Tensor| t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous();
            let (q, k, v) = (
                split(q.forward(&hs)?)?,
                split(k.forward(&hs)?)?,
                split(v.forward(&hs)?)?,
            );
            let mut scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
            if let Some(mask) = mask {
                scores = scores.broadcast_add(mask)?;
            }
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let attended = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
            xs = (out.forward(&attended)? + xs)?;
            let hs = activate(&fc1.forward(&layer_norm(&xs, norm2, eps)?)?, self.cfg.activation)?;
            xs = (fc2.forward(&hs)? + xs)?;
        }
        Ok(xs)
    }
}

/// A trainable CLIP or SigLIP: unit embeddings of images and texts, and the loss of a
/// batch of matching pairs against each other.
pub enum TrainContrastive {
    Clip(TrainClip),
    Siglip(TrainSiglip),
}

pub struct TrainClip {
    token_embedding: Tensor,
    position_embedding: Tensor,
    text: TrainEncoder,
    final_norm: (Tensor, Tensor),
    text_projection: TrainLinear,
    patch: TrainLinear,
    class_embedding: Tensor,
    vision_positions: Tensor,
    pre_norm: (Tensor, Tensor),
    vision: TrainEncoder,
    post_norm: (Tensor, Tensor),
    visual_projection: TrainLinear,
    logit_scale: Tensor,
    config: ClipConfig,
}

pub struct TrainSiglip {
    token_embedding: Tensor,
    position_embedding: Tensor,
    text: TrainEncoder,
    final_norm: (Tensor, Tensor),
    text_head: TrainLinear,
    patch: TrainLinear,
    vision_positions: Tensor,
    vision: TrainEncoder,
    post_norm: (Tensor, Tensor),
    probe: Tensor,
    head_qkv: TrainLinear,
    head_out: TrainLinear,
    head_norm: (Tensor, Tensor),
    head_fc1: TrainLinear,
    head_fc2: TrainLinear,
    logit_scale: Tensor,
    logit_bias: Tensor,
    config: SiglipConfig,
}

/// Square images as rows of flattened patches `[n, patches, c·p·p]`.
fn patch_rows(pixels: &Tensor, p: usize) -> Result<Tensor> {
    let (n, c, h, _) = pixels.dims4()?;
    let side = h / p;
    pixels
        .reshape((n, c, side, p, side, p))?
        .permute([0usize, 2, 4, 1, 3, 5])?
        .reshape((n, side * side, c * p * p))
}

fn unit(xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_div(&xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

impl TrainClip {
    pub fn new(config: &ClipConfig, params: &mut Params) -> Result<Self> {
        let (t, v, proj) = (&config.text_config, &config.vision_config, config.projection_dim);
        let (td, vd, p, c) = (t.hidden_size, v.hidden_size, v.patch_size, v.num_channels);
        let positions = (v.image_size / p).pow(2) + 1;
        let patch_weight = params
            .vb
            .get((vd, c, p, p), "vision_model.embeddings.patch_embedding.weight")?;
        let patch_name = "vision_model.embeddings.patch_embedding.weight";
        let patch = match params.weights {
            Weights::Full => TrainLinear {
                weight: params.var(patch_name, patch_weight)?.reshape((vd, c * p * p))?,
                bias: None,
                lora: None,
            },
            // The patch embedding stays frozen under LoRA (as PEFT leaves convolutions).
            Weights::Lora { .. } => TrainLinear {
                weight: patch_weight.reshape((vd, c * p * p))?,
                bias: None,
                lora: None,
            },
        };
        Ok(Self {
            token_embedding: params.param(
                "text_model.embeddings.token_embedding.weight",
                &[t.vocab_size, td],
                false,
            )?,
            position_embedding: params.param(
                "text_model.embeddings.position_embedding.weight",
                &[t.max_position_embeddings, td],
                false,
            )?,
            text: TrainEncoder::new(params, &t.encoder(), "text_model.encoder")?,
            final_norm: params.norm("text_model.final_layer_norm", td)?,
            text_projection: params.linear("text_projection", (proj, td), false)?,
            patch,
            class_embedding: params.param("vision_model.embeddings.class_embedding", &[vd], false)?,
            vision_positions: params.param(
                "vision_model.embeddings.position_embedding.weight",
                &[positions, vd],
                false,
            )?,
            pre_norm: params.norm("vision_model.pre_layrnorm", vd)?,
            vision: TrainEncoder::new(params, &v.encoder(), "vision_model.encoder")?,
            post_norm: params.norm("vision_model.post_layernorm", vd)?,
            visual_projection: params.linear("visual_projection", (proj, vd), false)?,
            logit_scale: params.param("logit_scale", &[], true)?,
            config: config.clone(),
        })
    }

    /// Unit embeddings `[n, proj]` of texts padded to one length (pads after the end token,
    /// which the causal mask keeps from reaching it).
    pub fn texts(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.token_embedding.device();
        let n = ids.iter().map(Vec::len).max().unwrap_or(1);
        let pooled_at: Vec<usize> = ids.iter().map(|t| self.config.pooling().position(t)).collect();
        let padded: Vec<u32> = ids
            .iter()
            .flat_map(|t| t.iter().copied().chain(std::iter::repeat_n(0, n - t.len())))
            .collect();
        let tokens = Tensor::from_vec(padded, (ids.len(), n), device)?;
        let xs = self
            .token_embedding
            .embedding(&tokens.flatten_all()?)?
            .reshape((ids.len(), n, ()))?;
        let xs = xs.broadcast_add(&self.position_embedding.narrow(0, 0, n)?)?;
        let xs = self.text.forward(&xs, Some(&causal_mask(n, device)?))?;
        let pooled = (pooled_at.iter().enumerate())
            .map(|(i, &at)| xs.i((i, at)))
            .collect::<Result<Vec<_>>>()?;
        let pooled = layer_norm(
            &Tensor::stack(&pooled, 0)?,
            &self.final_norm,
            self.config.text_config.layer_norm_eps,
        )?;
        unit(&self.text_projection.forward(&pooled)?)
    }

    /// Unit embeddings `[n, proj]` of images `[n, 3, S, S]`.
    pub fn images(&self, pixels: &Tensor) -> Result<Tensor> {
        let v = &self.config.vision_config;
        let n = pixels.dim(0)?;
        let d = v.hidden_size;
        let patches = self.patch.forward(&patch_rows(pixels, v.patch_size)?)?;
        let class = self.class_embedding.reshape((1, 1, d))?.broadcast_as((n, 1, d))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.vision_positions)?;
        let xs = layer_norm(&xs, &self.pre_norm, v.layer_norm_eps)?;
        let xs = self.vision.forward(&xs, None)?;
        let class = layer_norm(&xs.i((.., 0))?, &self.post_norm, v.layer_norm_eps)?;
        unit(&self.visual_projection.forward(&class)?)
    }

    /// CLIP's symmetric InfoNCE over the batch: image `i` and text `i` match, every other
    /// pair of the batch is a negative except those `duplicates` marks (1.0 where texts `i`
    /// and `j` are the same caption: not negatives, so masked out); the temperature is the
    /// learned `logit_scale` (its exponential capped at 100, as CLIP's training clamps it).
    pub fn loss(&self, images: &Tensor, texts: &Tensor, duplicates: &Tensor) -> Result<Tensor> {
        let scale = self.logit_scale.clamp(0f32, 100f32.ln())?.exp()?;
        let logits = images.matmul(&texts.t()?)?.broadcast_mul(&scale)?;
        let logits = (logits - (duplicates * 1e4)?)?;
        let n = logits.dim(0)?;
        let eye = Tensor::eye(n, DType::F32, logits.device())?;
        let diagonal = |log_probs: Tensor| -> Result<Tensor> { (log_probs * &eye)?.sum_all()? / n as f64 };
        let per_image = diagonal(candle_nn::ops::log_softmax(&logits, D::Minus1)?)?;
        let per_text = diagonal(candle_nn::ops::log_softmax(&logits.t()?, D::Minus1)?)?;
        (per_image + per_text)? * -0.5
    }
}

impl TrainSiglip {
    pub fn new(config: &SiglipConfig, params: &mut Params) -> Result<Self> {
        let (t, v) = (&config.text_config, &config.vision_config);
        let (td, d, p, c) = (t.hidden_size, v.hidden_size, v.patch_size, v.num_channels);
        let patches = (v.image_size / p).pow(2);
        let patch_weight = params
            .vb
            .get((d, c, p, p), "vision_model.embeddings.patch_embedding.weight")?;
        let patch_bias = params.param("vision_model.embeddings.patch_embedding.bias", &[d], false)?;
        let weight = match params.weights {
            Weights::Full => params.var("vision_model.embeddings.patch_embedding.weight", patch_weight)?,
            Weights::Lora { .. } => patch_weight,
        };
        let head = "vision_model.head";
        let head_qkv = match params.weights {
            Weights::Full => TrainLinear {
                weight: params.param(&format!("{head}.attention.in_proj_weight"), &[3 * d, d], false)?,
                bias: Some(params.param(&format!("{head}.attention.in_proj_bias"), &[3 * d], false)?),
                lora: None,
            },
            Weights::Lora { .. } => TrainLinear {
                weight: params.vb.get((3 * d, d), &format!("{head}.attention.in_proj_weight"))?,
                bias: Some(params.vb.get(3 * d, &format!("{head}.attention.in_proj_bias"))?),
                lora: None,
            },
        };
        Ok(Self {
            token_embedding: params.param(
                "text_model.embeddings.token_embedding.weight",
                &[t.vocab_size, td],
                false,
            )?,
            position_embedding: params.param(
                "text_model.embeddings.position_embedding.weight",
                &[t.max_position_embeddings, td],
                false,
            )?,
            text: TrainEncoder::new(params, &t.encoder(), "text_model.encoder")?,
            final_norm: params.norm("text_model.final_layer_norm", td)?,
            text_head: params.linear("text_model.head", (t.projection(), td), true)?,
            patch: TrainLinear {
                weight: weight.reshape((d, c * p * p))?,
                bias: Some(patch_bias),
                lora: None,
            },
            vision_positions: params.param(
                "vision_model.embeddings.position_embedding.weight",
                &[patches, d],
                false,
            )?,
            vision: TrainEncoder::new(params, &v.encoder(), "vision_model.encoder")?,
            post_norm: params.norm("vision_model.post_layernorm", d)?,
            probe: params.param(&format!("{head}.probe"), &[1, 1, d], false)?,
            head_qkv,
            head_out: params.linear(&format!("{head}.attention.out_proj"), (d, d), true)?,
            head_norm: params.norm(&format!("{head}.layernorm"), d)?,
            head_fc1: params.linear(&format!("{head}.mlp.fc1"), (v.intermediate_size, d), true)?,
            head_fc2: params.linear(&format!("{head}.mlp.fc2"), (d, v.intermediate_size), true)?,
            logit_scale: params.param("logit_scale", &[1], true)?,
            logit_bias: params.param("logit_bias", &[1], true)?,
            config: config.clone(),
        })
    }

    /// Unit embeddings of texts already padded to the model's length.
    pub fn texts(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.token_embedding.device();
        let n = ids.first().map_or(0, Vec::len);
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let tokens = Tensor::from_vec(flat, (ids.len(), n), device)?;
        let xs = self
            .token_embedding
            .embedding(&tokens.flatten_all()?)?
            .reshape((ids.len(), n, ()))?;
        let xs = xs.broadcast_add(&self.position_embedding.narrow(0, 0, n)?)?;
        let xs = self.text.forward(&xs, None)?;
        let last = layer_norm(
            &xs.i((.., n - 1))?,
            &self.final_norm,
            self.config.text_config.layer_norm_eps,
        )?;
        unit(&self.text_head.forward(&last)?)
    }

    pub fn images(&self, pixels: &Tensor) -> Result<Tensor> {
        let v = &self.config.vision_config;
        let (n, d, heads) = (pixels.dim(0)?, v.hidden_size, v.num_attention_heads);
        let xs = self
            .patch
            .forward(&patch_rows(pixels, v.patch_size)?)?
            .broadcast_add(&self.vision_positions)?;
        let xs = layer_norm(&self.vision.forward(&xs, None)?, &self.post_norm, v.layer_norm_eps)?;
        // The attention-pooling head: the probe's query against every patch.
        let qkv_w = &self.head_qkv.weight;
        let qkv_b = self
            .head_qkv
            .bias
            .as_ref()
            .expect("the head has a bias. This is a bug.");
        let q = self
            .probe
            .reshape((1, d))?
            .matmul(&qkv_w.narrow(0, 0, d)?.t()?)?
            .broadcast_add(&qkv_b.narrow(0, 0, d)?)?;
        let k = xs
            .broadcast_matmul(&qkv_w.narrow(0, d, d)?.t()?)?
            .broadcast_add(&qkv_b.narrow(0, d, d)?)?;
        let v_ = xs
            .broadcast_matmul(&qkv_w.narrow(0, 2 * d, d)?.t()?)?
            .broadcast_add(&qkv_b.narrow(0, 2 * d, d)?)?;
        let hd = d / heads;
        let patches = xs.dim(1)?;
        let q = (q.reshape((1, heads, 1, hd))? * (hd as f64).powf(-0.5))?
            .broadcast_as((n, heads, 1, hd))?
            .contiguous()?;
        let split = |t: Tensor| t.reshape((n, patches, heads, hd))?.transpose(1, 2)?.contiguous();
        let (k, v_) = (split(k)?, split(v_)?);
        let probs = candle_nn::ops::softmax(&q.matmul(&k.t()?)?, D::Minus1)?;
        let attended = probs.matmul(&v_)?.reshape((n, d))?;
        let hs = self.head_out.forward(&attended)?;
        let mlp = activate(
            &self
                .head_fc1
                .forward(&layer_norm(&hs, &self.head_norm, v.layer_norm_eps)?)?,
            v.encoder().activation,
        )?;
        unit(&(self.head_fc2.forward(&mlp)? + hs)?)
    }

    /// SigLIP's pairwise sigmoid loss: each pair of the batch a binary question (match or
    /// not) with logit `exp(logit_scale) · cos + logit_bias`, summed over pairs (those
    /// `duplicates` marks left out: the same caption is no negative) and divided by the
    /// batch size.
    pub fn loss(&self, images: &Tensor, texts: &Tensor, duplicates: &Tensor) -> Result<Tensor> {
        let logits = images
            .matmul(&texts.t()?)?
            .broadcast_mul(&self.logit_scale.exp()?)?
            .broadcast_add(&self.logit_bias)?;
        let n = logits.dim(0)?;
        let signs = ((Tensor::eye(n, DType::F32, logits.device())? * 2.0)? - 1.0)?;
        let z = (logits * signs)?;
        // log σ(z) = min(z, 0) - log(1 + exp(-|z|)), stable for large |z|.
        let log_sigmoid = (z.minimum(0f32)? - (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let kept = (log_sigmoid * (1.0 - duplicates)?)?;
        (kept.sum_all()? / n as f64)?.neg()
    }
}

impl TrainContrastive {
    pub fn texts(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        match self {
            Self::Clip(m) => m.texts(ids),
            Self::Siglip(m) => m.texts(ids),
        }
    }

    pub fn images(&self, pixels: &Tensor) -> Result<Tensor> {
        match self {
            Self::Clip(m) => m.images(pixels),
            Self::Siglip(m) => m.images(pixels),
        }
    }

    /// The loss of a batch whose image `i` and text `i` match; `duplicates` marks other
    /// pairs with the same caption (not negatives).
    pub fn loss(&self, images: &Tensor, texts: &Tensor, duplicates: &Tensor) -> Result<Tensor> {
        match self {
            Self::Clip(m) => m.loss(images, texts, duplicates),
            Self::Siglip(m) => m.loss(images, texts, duplicates),
        }
    }
}

fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, n), device)
}
