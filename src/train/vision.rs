//! The vision encoder (SigLIP, as `model::smolvlm::vision`) and connector for training, in
//! candle ops that carry gradients: composed LayerNorm and softmax instead of the serving
//! path's fused kernels, every tile's heads at once. Under `--method full` every weight
//! trains; under LoRA the weights are frozen and pairs sit on the projections
//! `--lora-target-modules` names (`vision.q_proj`, ..., `connector`), as PEFT places them.

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use super::layers::{Builder, Linear};
use super::text::Method;
use crate::model::smolvlm::config::VisionConfig;
use crate::model::smolvlm::connector::{self, pixel_shuffle};

pub struct TrainVision {
    patch_weight: Tensor,
    patch_bias: Tensor,
    position: Tensor,
    layers: Vec<Layer>,
    post_norm: (Tensor, Tensor),
    connector: Linear,
    cfg: VisionConfig,
    scale_factor: usize,
    /// LoRA dropout (0 under the full method).
    dropout: f32,
}

struct Layer {
    norm1: (Tensor, Tensor),
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: (Tensor, Tensor),
    fc1: Linear,
    fc2: Linear,
}

impl TrainVision {
    /// `vb` is the model's root; `b` makes its weights trainable or frozen as its method says
    /// (frozen ones stay f32, also under QLoRA).
    pub fn new(
        cfg: &VisionConfig,
        scale_factor: usize,
        text_hidden: usize,
        vb: &VarBuilder,
        b: &mut Builder,
    ) -> Result<Self> {
        b.quantize_frozen(false);
        let (d, p, c, inter) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.intermediate_size);
        let m = "model.vision_model";
        let get = |b: &mut Builder, name: String, shape: &[usize]| b.weight(name.clone(), vb.get(shape, &name)?);
        let patch_weight = get(b, format!("{m}.embeddings.patch_embedding.weight"), &[d, c, p, p])?;
        let patch_bias = get(b, format!("{m}.embeddings.patch_embedding.bias"), &[d])?;
        let patches = (cfg.image_size / p).pow(2);
        let position = get(b, format!("{m}.embeddings.position_embedding.weight"), &[patches, d])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{m}.encoder.layers.{i}");
            let norm = |b: &mut Builder, name: &str| -> Result<(Tensor, Tensor)> {
                Ok((
                    get(b, format!("{l}.{name}.weight"), &[d])?,
                    get(b, format!("{l}.{name}.bias"), &[d])?,
                ))
            };
            let norm1 = norm(b, "layer_norm1")?;
            let q = b.linear(&format!("{l}.self_attn.q_proj"), vb, (d, d), true)?;
            let k = b.linear(&format!("{l}.self_attn.k_proj"), vb, (d, d), true)?;
            let v = b.linear(&format!("{l}.self_attn.v_proj"), vb, (d, d), true)?;
            let out = b.linear(&format!("{l}.self_attn.out_proj"), vb, (d, d), true)?;
            let norm2 = norm(b, "layer_norm2")?;
            let fc1 = b.linear(&format!("{l}.mlp.fc1"), vb, (inter, d), true)?;
            let fc2 = b.linear(&format!("{l}.mlp.fc2"), vb, (d, inter), true)?;
            layers.push(Layer {
                norm1,
                q,
                k,
                v,
                out,
                norm2,
                fc1,
                fc2,
            });
        }
        let post_norm = (
            get(b, format!("{m}.post_layernorm.weight"), &[d])?,
            get(b, format!("{m}.post_layernorm.bias"), &[d])?,
        );
        let input = d * scale_factor * scale_factor;
        let connector = b.linear(connector::MODULE, vb, (text_hidden, input), false)?;
        let dropout = match b.method() {
            Method::Lora(spec) => spec.dropout,
            Method::Full => 0.0,
        };
        Ok(Self {
            patch_weight: patch_weight.reshape((d, c * p * p))?,
            patch_bias,
            position,
            layers,
            post_norm,
            connector,
            cfg: cfg.clone(),
            scale_factor,
            dropout,
        })
    }

    /// `[tiles, 3, S, S]` -> the decoder's image-token rows `[tiles * tokens, text_hidden]`.
    /// `dropout`: a seeded source for LoRA dropout, `None` to evaluate.
    pub fn forward(&self, pixel_values: &Tensor, dropout: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let (tiles, channels, _, _) = pixel_values.dims4()?;
        let (p, side, d) = (
            self.cfg.patch_size,
            self.cfg.image_size / self.cfg.patch_size,
            self.cfg.hidden_size,
        );
        let patches = (pixel_values.reshape((tiles, channels, side, p, side, p))?)
            .permute([0usize, 2, 4, 1, 3, 5])?
            .reshape((tiles * side * side, channels * p * p))?;
        let embeds = patches
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;
        let xs = embeds.reshape((tiles, side * side, d))?.broadcast_add(&self.position)?;
        let mut xs = xs.reshape((tiles * side * side, d))?;
        for layer in &self.layers {
            xs = self.layer(layer, &xs, tiles, dropout)?;
        }
        let xs = layer_norm(&xs, &self.post_norm, self.cfg.layer_norm_eps)?;
        let shuffled = pixel_shuffle(&xs.reshape((tiles, side * side, d))?, self.scale_factor)?;
        let (tiles, tokens, width) = shuffled.dims3()?;
        (self.connector).forward(&shuffled.reshape((tiles * tokens, width))?, self.dropout, dropout)
    }

    /// `xs`: `[tiles * patches, hidden]`, the tiles' patches one after the other.
    fn layer(&self, l: &Layer, xs: &Tensor, tiles: usize, dropout: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let patches = rows / tiles;
        let heads = self.cfg.num_attention_heads;
        let hd = d / heads;
        let eps = self.cfg.layer_norm_eps;
        let p = self.dropout;
        let hs = layer_norm(xs, &l.norm1, eps)?;
        let split = |t: Tensor| t.reshape((tiles, patches, heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split(l.q.forward(&hs, p, dropout)?)?;
        let k = split(l.k.forward(&hs, p, dropout)?)?;
        let v = split(l.v.forward(&hs, p, dropout)?)?;
        let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let attended = probs.matmul(&v)?.transpose(1, 2)?.reshape((rows, d))?;
        let xs = (l.out.forward(&attended, p, dropout)? + xs)?;
        let hs = layer_norm(&xs, &l.norm2, eps)?;
        let hs = l.fc1.forward(&hs, p, dropout)?;
        let hs = if self.cfg.hidden_act == "gelu" {
            hs.gelu_erf()?
        } else {
            hs.gelu()?
        };
        l.fc2.forward(&hs, p, dropout)? + xs
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
