//! The vision encoder (SigLIP, as `model::smolvlm::vision`) and connector for training, in
//! candle ops that carry gradients: composed LayerNorm and softmax instead of the serving
//! path's fused kernels, every tile's heads at once. Under `--method full` every weight
//! trains; under LoRA the weights are frozen and pairs sit on the projections
//! `--lora-target-modules` names (`vision.q_proj`, ..., `connector`), as PEFT places them.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, Checkpoints, Layers};
use super::layers::{Builder, Linear};
use super::softmax::softmax_last_dim;
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
    /// `--gradient-checkpointing`: keep each layer's input only, recompute in
    /// `backward_layers`.
    checkpointing: bool,
    /// The last training forward's checkpoints, under `checkpointing`.
    tape: RefCell<Option<VisionTape>>,
}

/// What a checkpointed forward kept: the layers' checkpoints (the last layer's output a
/// leaf, from which the post-norm and connector run inside the loss's graph; the first
/// input attached to the patch embedding, which trains under `--method full`) and the tiles'
/// count.
pub struct VisionTape {
    kept: Checkpoints,
    tiles: usize,
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

/// The encoder's layers over one forward's tiles.
struct TileLayers<'a> {
    model: &'a TrainVision,
    tiles: usize,
}

impl Layers for TileLayers<'_> {
    fn count(&self) -> usize {
        self.model.layers.len()
    }

    fn run(&self, index: usize, xs: &Tensor, dropout: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        (self.model).layer(&self.model.layers[index], xs, self.tiles, dropout)
    }
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
            checkpointing: false,
            tape: RefCell::new(None),
        })
    }

    /// Turns gradient checkpointing of the encoder's layers on or off.
    pub fn checkpoint_layers(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// The checkpoints of the last training forward, if it kept any.
    pub fn take_tape(&self) -> Option<VisionTape> {
        self.tape.borrow_mut().take()
    }

    /// The leaf standing for the last layer's output in the loss's graph.
    pub fn tape_output(tape: &VisionTape) -> &Tensor {
        tape.kept.output()
    }

    /// The backward pass through the layers of a checkpointed forward, given the gradient of
    /// its output; `sink` gets each part's gradients.
    pub fn backward_layers(
        &self,
        tape: VisionTape,
        grad: &Tensor,
        sink: impl FnMut(&GradStore) -> Result<()>,
    ) -> Result<()> {
        let layers = TileLayers {
            model: self,
            tiles: tape.tiles,
        };
        tape.kept.backward(&layers, grad, sink)
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
        let xs = self.layers(xs.reshape((tiles * side * side, d))?, tiles, dropout)?;
        let xs = layer_norm(&xs, &self.post_norm, self.cfg.layer_norm_eps)?;
        let shuffled = pixel_shuffle(&xs.reshape((tiles, side * side, d))?, self.scale_factor)?;
        let (tiles, tokens, width) = shuffled.dims3()?;
        (self.connector).forward(&shuffled.reshape((tiles * tokens, width))?, self.dropout, dropout)
    }

    /// The encoder layers over `embedded` (checkpointed under `checkpointing`).
    fn layers(&self, embedded: Tensor, tiles: usize, dropout: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let layers = TileLayers { model: self, tiles };
        let (xs, kept) = checkpoint::forward(&layers, embedded, dropout, self.checkpointing)?;
        *self.tape.borrow_mut() = kept.map(|kept| VisionTape { kept, tiles });
        Ok(xs)
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
        // The scale on q, not on the scores: one tensor of the scores' size fewer kept.
        let scores = (q * (hd as f64).powf(-0.5))?.matmul(&k.t()?)?;
        let probs = softmax_last_dim(&scores)?;
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
