//! The vision encoder (SigLIP, as `model::smolvlm::vision`) and connector for `--method
//! full`, in candle ops that carry gradients: composed LayerNorm and softmax instead of the
//! serving path's fused kernels, every tile's heads at once.

use candle_core::{D, Result, Tensor, Var};
use candle_nn::VarBuilder;

use super::text::Trainable;
use crate::model::smolvlm::config::VisionConfig;
use crate::model::smolvlm::connector::pixel_shuffle;

pub struct TrainVision {
    patch_weight: Tensor,
    patch_bias: Tensor,
    position: Tensor,
    layers: Vec<Layer>,
    post_norm: (Tensor, Tensor),
    connector: Tensor,
    cfg: VisionConfig,
    scale_factor: usize,
}

struct Layer {
    norm1: (Tensor, Tensor),
    q: (Tensor, Tensor),
    k: (Tensor, Tensor),
    v: (Tensor, Tensor),
    out: (Tensor, Tensor),
    norm2: (Tensor, Tensor),
    fc1: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
}

impl TrainVision {
    /// `vb` is the model's root; every weight becomes a trainable variable.
    pub fn new(
        cfg: &VisionConfig,
        scale_factor: usize,
        text_hidden: usize,
        vb: &VarBuilder,
    ) -> Result<(Self, Vec<Trainable>)> {
        let mut trainables = Vec::new();
        let mut var = |name: String, shape: &[usize]| -> Result<Tensor> {
            let var = Var::from_tensor(&vb.get(shape, &name)?)?;
            let t = var.as_tensor().clone();
            trainables.push(Trainable { name, var });
            Ok(t)
        };
        let (d, p, c, inter) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.intermediate_size);
        let m = "model.vision_model";
        let patch_weight = var(format!("{m}.embeddings.patch_embedding.weight"), &[d, c, p, p])?;
        let patch_bias = var(format!("{m}.embeddings.patch_embedding.bias"), &[d])?;
        let patches = (cfg.image_size / p).pow(2);
        let position = var(format!("{m}.embeddings.position_embedding.weight"), &[patches, d])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{m}.encoder.layers.{i}");
            let mut pair = |name: &str, out: usize, inp: Option<usize>| -> Result<(Tensor, Tensor)> {
                let weight_shape: Vec<usize> = inp.map_or(vec![out], |i| vec![out, i]);
                Ok((
                    var(format!("{l}.{name}.weight"), &weight_shape)?,
                    var(format!("{l}.{name}.bias"), &[out])?,
                ))
            };
            layers.push(Layer {
                norm1: pair("layer_norm1", d, None)?,
                q: pair("self_attn.q_proj", d, Some(d))?,
                k: pair("self_attn.k_proj", d, Some(d))?,
                v: pair("self_attn.v_proj", d, Some(d))?,
                out: pair("self_attn.out_proj", d, Some(d))?,
                norm2: pair("layer_norm2", d, None)?,
                fc1: pair("mlp.fc1", inter, Some(d))?,
                fc2: pair("mlp.fc2", d, Some(inter))?,
            });
        }
        let post_norm = (
            var(format!("{m}.post_layernorm.weight"), &[d])?,
            var(format!("{m}.post_layernorm.bias"), &[d])?,
        );
        let input = d * scale_factor * scale_factor;
        let connector = var(
            "model.connector.modality_projection.proj.weight".into(),
            &[text_hidden, input],
        )?;
        let model = Self {
            patch_weight: patch_weight.reshape((d, c * p * p))?,
            patch_bias,
            position,
            layers,
            post_norm,
            connector,
            cfg: cfg.clone(),
            scale_factor,
        };
        Ok((model, trainables))
    }

    /// `[tiles, 3, S, S]` -> the decoder's image-token rows `[tiles * tokens, text_hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
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
        let mut xs = embeds.reshape((tiles, side * side, d))?.broadcast_add(&self.position)?;
        for layer in &self.layers {
            xs = self.layer(layer, &xs)?;
        }
        let xs = layer_norm(&xs, &self.post_norm, self.cfg.layer_norm_eps)?;
        let shuffled = pixel_shuffle(&xs, self.scale_factor)?;
        let (tiles, tokens, width) = shuffled.dims3()?;
        shuffled.reshape((tiles * tokens, width))?.matmul(&self.connector.t()?)
    }

    /// `xs`: `[tiles, patches, hidden]`.
    fn layer(&self, l: &Layer, xs: &Tensor) -> Result<Tensor> {
        let (tiles, patches, d) = xs.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let hd = d / heads;
        let eps = self.cfg.layer_norm_eps;
        let hs = layer_norm(xs, &l.norm1, eps)?;
        let split = |t: Tensor| t.reshape((tiles, patches, heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split(linear(&hs, &l.q)?)?;
        let k = split(linear(&hs, &l.k)?)?;
        let v = split(linear(&hs, &l.v)?)?;
        let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let attended = probs.matmul(&v)?.transpose(1, 2)?.reshape((tiles, patches, d))?;
        let xs = (linear(&attended, &l.out)? + xs)?;
        let hs = layer_norm(&xs, &l.norm2, eps)?;
        let hs = linear(&hs, &l.fc1)?;
        let hs = if self.cfg.hidden_act == "gelu" {
            hs.gelu_erf()?
        } else {
            hs.gelu()?
        };
        linear(&hs, &l.fc2)? + xs
    }
}

/// `xs · Wᵀ + b` over the last dimension.
fn linear(xs: &Tensor, (weight, bias): &(Tensor, Tensor)) -> Result<Tensor> {
    xs.broadcast_matmul(&weight.t()?)?.broadcast_add(bias)
}

fn layer_norm(xs: &Tensor, (weight, bias): &(Tensor, Tensor), eps: f64) -> Result<Tensor> {
    let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}
