//! The pre-norm transformer encoder of CLIP and SigLIP (and of SmolVLM's SigLIP vision
//! tower): `x + attn(ln1(x))`, then `x + mlp(ln2(x))`, with transformers' weight names
//! (`layers.{i}.self_attn.q_proj`, `mlp.fc1`, `layer_norm1`). It runs a ragged batch: the
//! rows of every sequence (an image's patches, a text's tokens) in one `[rows, hidden]`
//! matrix through the linear layers, each with its bias, activation and residual in one
//! pass over its output (`epilogue`), and attention within each sequence only, either both
//! ways (vision, SigLIP's text) or causal (CLIP's text).

use candle_core::{Module, Result, Tensor, bail};
use candle_nn::{Linear, VarBuilder, linear};

use crate::model::lora::{LoraBatch, ModuleSpec};
use crate::model::ops::epilogue::{self, Then};
use crate::model::ops::norm::LayerNorm;
use crate::model::ops::{frame_attention, prefill_attention};

/// At most this many bytes of attention scores per task of `frame_attention` (at least one
/// query row's).
const SCORES_BYTES: usize = 4 << 20;

/// The MLP's activation, by transformers' `hidden_act` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (CLIP).
    QuickGelu,
    /// `gelu_pytorch_tanh` (SigLIP).
    GeluTanh,
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu_pytorch_tanh" | "gelu_new" => Some(Self::GeluTanh),
            "gelu" => Some(Self::GeluErf),
            _ => None,
        }
    }

    /// `act(ys)`.
    pub fn on(self, ys: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluTanh if crate::model::ops::kernels::applies(ys) => crate::model::ops::kernels::gelu_tanh(ys),
            Self::GeluTanh => ys.gelu(),
            Self::GeluErf => ys.gelu_erf(),
            Self::QuickGelu => ys * candle_nn::ops::sigmoid(&(ys * 1.702)?)?,
        }
    }

    /// `act(layer(xs))`, with the activation fused into the layer's output where a kernel
    /// exists.
    pub fn after(self, layer: &Linear, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluTanh => epilogue::linear(layer, xs, Then::GeluTanh),
            Self::GeluErf => layer.forward(xs)?.gelu_erf(),
            Self::QuickGelu => epilogue::linear(layer, xs, Then::QuickGelu),
        }
    }
}

/// Whether a position sees the whole sequence or only what comes before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    Bidirectional,
    Causal,
}

/// How a layer's attention weights are named: CLIP's and SigLIP's `q_proj`, `k_proj`,
/// `v_proj`, `out_proj`, or BLIP's stacked `qkv` and `projection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionNames {
    Separate,
    Stacked,
}

/// One encoder's sizes.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl EncoderConfig {
    /// A tower's sizes as transformers names them (`hidden_size`, `intermediate_size`,
    /// `num_hidden_layers`, `num_attention_heads`), `layer_norm_eps` and `hidden_act`
    /// (`default` where the name is unknown: `check_tower` refuses those at load).
    pub fn of(
        (hidden, intermediate, layers, heads): (usize, usize, usize, usize),
        eps: f64,
        act: &str,
        default: Activation,
    ) -> Self {
        Self {
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            layer_norm_eps: eps,
            activation: Activation::from_hf(act).unwrap_or(default),
        }
    }
}

/// LoRA slots of a layer: q/k/v (stacked), out, fc1, fc2.
pub const SLOTS_PER_LAYER: usize = 4;

/// The adapters of an encoding, and where the encoder's slots begin in their layout.
#[derive(Clone, Copy)]
pub struct EncoderLora<'a> {
    pub batch: &'a LoraBatch<'a>,
    pub first_slot: usize,
}

/// PEFT's module names for the encoder's slots (`SLOTS_PER_LAYER` a layer, in
/// `EncoderLayer::forward`'s order), under `prefix` (`model.vision_model.encoder`).
pub fn adapter_slots(prefix: &str, cfg: &EncoderConfig) -> Vec<Vec<ModuleSpec>> {
    let (d, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let mut slots = Vec::with_capacity(cfg.num_hidden_layers * SLOTS_PER_LAYER);
    for i in 0..cfg.num_hidden_layers {
        let spec = |name: &str, in_features, out_features| ModuleSpec {
            name: format!("{prefix}.layers.{i}.{name}"),
            in_features,
            out_features,
        };
        slots.push(vec![
            spec("self_attn.q_proj", d, d),
            spec("self_attn.k_proj", d, d),
            spec("self_attn.v_proj", d, d),
        ]);
        slots.push(vec![spec("self_attn.out_proj", d, d)]);
        slots.push(vec![spec("mlp.fc1", d, inter)]);
        slots.push(vec![spec("mlp.fc2", inter, d)]);
    }
    slots
}

/// One tower's shape as a config gives it: hidden size, attention heads, `hidden_act`.
pub type TowerShape<'a> = (usize, usize, &'a str);

/// A two-tower config's shared checks as loaded: each tower's activation known and its heads
/// dividing its width (`text_config`, `vision_config`), the vision patch dividing the image;
/// errors name the file and `tower.field`.
pub fn check_towers(
    path: &std::path::Path,
    text: TowerShape,
    vision: TowerShape,
    (patch, image): (usize, usize),
) -> std::result::Result<(), crate::model::LoadError> {
    check_tower(path, "text_config", text)?;
    check_tower(path, "vision_config", vision)?;
    if patch == 0 || !image.is_multiple_of(patch) {
        return Err(crate::model::LoadError::invalid(
            path,
            "vision_config.patch_size",
            format!("{patch} does not divide image_size {image}"),
        ));
    }
    Ok(())
}

fn check_tower(
    path: &std::path::Path,
    tower: &str,
    (hidden, heads, act): TowerShape,
) -> std::result::Result<(), crate::model::LoadError> {
    use crate::model::LoadError;
    if Activation::from_hf(act).is_none() {
        return Err(LoadError::invalid(
            path,
            &format!("{tower}.hidden_act"),
            format!("{act} is not supported (quick_gelu, gelu, gelu_pytorch_tanh)"),
        ));
    }
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(LoadError::invalid(
            path,
            &format!("{tower}.num_attention_heads"),
            format!("{heads} does not divide hidden_size {hidden}"),
        ));
    }
    Ok(())
}

pub struct Encoder {
    layers: Vec<EncoderLayer>,
    mask: Mask,
    /// `SCORES_BYTES`, or less in tests.
    pub(crate) scores_bytes: usize,
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    /// q, k and v stacked into one matrix (one GEMM over the activations), q already
    /// multiplied by the attention scale where that is exact (see `new`).
    qkv_proj: Linear,
    /// The scale still to apply to q (1 when folded into the weights).
    q_scale: f64,
    /// The scale folded into q's weights (1 when not), which an adapter's q delta takes too.
    q_folded: f64,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
    activation: Activation,
}

impl Encoder {
    /// `vb` points at the encoder (`vision_model.encoder`), whose `layers.{i}` it reads.
    pub fn new(cfg: &EncoderConfig, mask: Mask, vb: VarBuilder) -> Result<Self> {
        Self::with_names(cfg, mask, AttentionNames::Separate, vb)
    }

    pub fn with_names(cfg: &EncoderConfig, mask: Mask, names: AttentionNames, vb: VarBuilder) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            )
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, names, vb.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            mask,
            scores_bytes: SCORES_BYTES,
        })
    }

    /// `xs`: `[rows, hidden]`, the rows of sequences of `lens` rows each, one after the other.
    pub fn forward(&self, xs: &Tensor, lens: &[usize]) -> Result<Tensor> {
        self.forward_adapted(xs, lens, None)
    }

    /// `forward` with LoRA adapters' deltas on the layers' projections.
    pub fn forward_adapted(&self, xs: &Tensor, lens: &[usize], lora: Option<EncoderLora<'_>>) -> Result<Tensor> {
        if lens.iter().sum::<usize>() != xs.dim(0)? {
            bail!("encoder: {} rows for sequences of {lens:?}", xs.dim(0)?)
        }
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let lora = lora.map(|l| (l.batch, l.first_slot + i * SLOTS_PER_LAYER));
            xs = layer.forward(&xs, lens, self.mask, self.scores_bytes, lora)?;
        }
        Ok(xs)
    }

    /// The last layer's output at one row of each sequence only, `[lens.len(), hidden]`:
    /// `pooled[i]`, a position within sequence `i` (CLIP's class token or end of text). The
    /// towers that pool read nothing else, so the last layer attends from those rows alone
    /// and runs its output projection and MLP on them (a twelfth of ViT-B's work at 50
    /// patches an image); every row still gives its key and value.
    pub fn forward_pooled(&self, xs: &Tensor, lens: &[usize], pooled: &[usize]) -> Result<Tensor> {
        let Some((last, layers)) = self.layers.split_last() else {
            bail!("encoder: no layers")
        };
        if pooled.len() != lens.len() || pooled.iter().zip(lens).any(|(p, len)| p >= len) {
            bail!("encoder: pooled positions {pooled:?} in sequences of {lens:?}")
        }
        if lens.iter().sum::<usize>() != xs.dim(0)? {
            bail!("encoder: {} rows for sequences of {lens:?}", xs.dim(0)?)
        }
        let mut xs = xs.clone();
        for layer in layers {
            xs = layer.forward(&xs, lens, self.mask, self.scores_bytes, None)?;
        }
        last.forward_pooled(&xs, lens, pooled, self.mask)
    }
}

impl EncoderLayer {
    fn new(cfg: &EncoderConfig, names: AttentionNames, vb: VarBuilder) -> Result<Self> {
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
        let (qkv, out_name) = match names {
            AttentionNames::Separate => {
                let (q, k, v) = (
                    linear(d, d, attn.pp("q_proj"))?,
                    linear(d, d, attn.pp("k_proj"))?,
                    linear(d, d, attn.pp("v_proj"))?,
                );
                let weight = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
                let bias = match (q.bias(), k.bias(), v.bias()) {
                    (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
                    _ => None,
                };
                (Linear::new(weight, bias), "out_proj")
            }
            AttentionNames::Stacked => (linear(d, 3 * d, attn.pp("qkv"))?, "projection"),
        };
        // Rows 0..d are q's: scale them (and their bias) where that is exact.
        let scale_q = |t: &Tensor| -> Result<Tensor> {
            Tensor::cat(&[(t.narrow(0, 0, d)? * q_weight_scale)?, t.narrow(0, d, 2 * d)?], 0)
        };
        let qkv_proj = Linear::new(scale_q(qkv.weight())?, qkv.bias().map(scale_q).transpose()?);
        let norm = |name: &str| LayerNorm::new(d, cfg.layer_norm_eps, vb.pp(name));
        Ok(Self {
            layer_norm1: norm("layer_norm1")?,
            qkv_proj,
            q_scale,
            q_folded: q_weight_scale,
            out_proj: linear(d, d, attn.pp(out_name))?,
            layer_norm2: norm("layer_norm2")?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            num_heads: cfg.num_attention_heads,
            activation: cfg.activation,
        })
    }

    /// `lora`: the adapters and this layer's first slot.
    fn forward(
        &self,
        xs: &Tensor,
        lens: &[usize],
        mask: Mask,
        scores_bytes: usize,
        lora: Option<(&LoraBatch<'_>, usize)>,
    ) -> Result<Tensor> {
        let hs = self.attention(&self.layer_norm1.forward(xs)?, lens, mask, xs, scores_bytes, lora)?;
        let normed = self.layer_norm2.forward(&hs)?;
        let Some((lora, slot)) = lora else {
            let mlp = self.activation.after(&self.fc1, &normed)?;
            return epilogue::linear(&self.fc2, &mlp, Then::Add(&hs));
        };
        // The activation follows fc1's delta, so it cannot be fused into fc1's output.
        let fc1 = epilogue::linear(&self.fc1, &normed, Then::Nothing)?;
        let mlp = self.activation.on(&lora.apply(slot + 2, &normed, fc1)?)?;
        let ys = epilogue::linear(&self.fc2, &mlp, Then::Add(&hs))?;
        lora.apply(slot + 3, &mlp, ys)
    }

    /// `xs · [q k v]ᵀ` with the adapters' deltas, q's scaled as its weights are.
    fn qkv(&self, xs: &Tensor, lora: Option<(&LoraBatch<'_>, usize)>) -> Result<Tensor> {
        let qkv = epilogue::linear(&self.qkv_proj, xs, Then::Nothing)?;
        let Some((lora, slot)) = lora.filter(|(lora, slot)| lora.touches(*slot)) else {
            return Ok(qkv);
        };
        if self.q_folded == 1.0 {
            return lora.apply(slot, xs, qkv);
        }
        let delta = lora.apply(slot, xs, qkv.zeros_like()?)?;
        let d = delta.dim(1)? / 3;
        let delta = Tensor::cat(
            &[(delta.narrow(1, 0, d)? * self.q_folded)?, delta.narrow(1, d, 2 * d)?],
            1,
        )?;
        qkv + delta
    }

    /// `forward` at `pooled[i]` of each sequence only (see `Encoder::forward_pooled`).
    fn forward_pooled(&self, xs: &Tensor, lens: &[usize], pooled: &[usize], mask: Mask) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let head_dim = d / self.num_heads;
        let qkv = epilogue::linear(&self.qkv_proj, &self.layer_norm1.forward(xs)?, Then::Nothing)?.reshape((
            rows,
            3,
            self.num_heads,
            head_dim,
        ))?;
        let part = |i: usize, first: usize, len: usize| qkv.narrow(0, first, len)?.narrow(1, i, 1)?.squeeze(1);
        let (mut outputs, mut at, mut first) = (Vec::with_capacity(lens.len()), Vec::with_capacity(lens.len()), 0);
        for (&len, &p) in lens.iter().zip(pooled) {
            let mut q = part(0, first + p, 1)?;
            if self.q_scale != 1.0 {
                q = (q * self.q_scale)?;
            }
            // One query that sees keys `0..seen`: causal attention from position `seen - 1`.
            let seen = if mask == Mask::Causal { p + 1 } else { len };
            let (k, v) = (part(1, first, seen)?, part(2, first, seen)?);
            outputs.push(prefill_attention::attention(&q, &k, &v, seen - 1)?);
            at.push((first + p) as u32);
            first += len;
        }
        let residual = xs.index_select(&Tensor::new(at, xs.device())?, 0)?;
        let hs = epilogue::linear(&self.out_proj, &Tensor::cat(&outputs, 0)?, Then::Add(&residual))?;
        let mlp = self.activation.after(&self.fc1, &self.layer_norm2.forward(&hs)?)?;
        epilogue::linear(&self.fc2, &mlp, Then::Add(&hs))
    }

    /// Self-attention of `xs` within each sequence, plus `residual`.
    fn attention(
        &self,
        xs: &Tensor,
        lens: &[usize],
        mask: Mask,
        residual: &Tensor,
        scores_bytes: usize,
        lora: Option<(&LoraBatch<'_>, usize)>,
    ) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let head_dim = d / self.num_heads;
        let qkv = self.qkv(xs, lora)?.reshape((rows, 3, self.num_heads, head_dim))?;
        let mut q = qkv.narrow(1, 0, 1)?.squeeze(1)?;
        if self.q_scale != 1.0 {
            q = (q * self.q_scale)?;
        }
        let (k, v) = (qkv.narrow(1, 1, 1)?.squeeze(1)?, qkv.narrow(1, 2, 1)?.squeeze(1)?);
        let causal = mask == Mask::Causal;
        let out = frame_attention::attention_masked(&q, &k, &v, lens, scores_bytes, causal)?;
        let ys = epilogue::linear(&self.out_proj, &out, Then::Add(residual))?;
        match lora {
            Some((lora, slot)) => lora.apply(slot + 1, &out, ys),
            None => Ok(ys),
        }
    }
}

/// Texts laid end to end as the sum of their token and position embeddings
/// `[rows, hidden]` (positions from 0 in each), and their lengths; a text that is empty,
/// longer than the positions or holds an id past the vocabulary is an error.
pub fn embed_tokens(
    token_embedding: &Tensor,
    position_embedding: &Tensor,
    texts: &[&[u32]],
) -> Result<(Tensor, Vec<usize>)> {
    let (vocab, max) = (token_embedding.dim(0)?, position_embedding.dim(0)?);
    let (mut ids, mut positions) = (Vec::new(), Vec::new());
    for text in texts {
        if text.is_empty() || text.len() > max || text.iter().any(|&id| id as usize >= vocab) {
            bail!("a text of {} tokens (at most {max}, ids below {vocab})", text.len())
        }
        ids.extend_from_slice(text);
        positions.extend(0..text.len() as u32);
    }
    let device = token_embedding.device();
    let xs = (token_embedding.index_select(&Tensor::new(ids, device)?, 0)?
        + position_embedding.index_select(&Tensor::new(positions, device)?, 0)?)?;
    Ok((xs, texts.iter().map(|t| t.len()).collect()))
}

/// Square images `[n, channels, size, size]` as rows of flattened patches
/// `[n * (size / patch)², channels * patch²]`, in the order a convolution of kernel and
/// stride `patch` visits them (row by row), each patch channel-major as its weight.
pub fn patches(pixel_values: &Tensor, patch: usize) -> Result<Tensor> {
    let (n, channels, h, w) = pixel_values.dims4()?;
    if h != w || h % patch != 0 {
        bail!("images must be squares of whole {patch}-pixel patches, got {h}x{w}")
    }
    let side = h / patch;
    pixel_values
        .reshape((n, channels, side, patch, side, patch))?
        .permute([0usize, 2, 4, 1, 3, 5])?
        .reshape((n * side * side, channels * patch * patch))
}

/// A patch convolution's weight `[out, channels, patch, patch]` as the matrix that multiplies
/// `patches`' rows.
pub fn patch_weight(vb: &VarBuilder, (out, channels, patch): (usize, usize, usize)) -> Result<Tensor> {
    vb.get((out, channels, patch, patch), "patch_embedding.weight")?
        .reshape((out, channels * patch * patch))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn config(activation: Activation) -> EncoderConfig {
        EncoderConfig {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            layer_norm_eps: 1e-5,
            activation,
        }
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn a_ragged_batch_equals_each_sequence_alone() -> Result<()> {
        for (activation, mask) in [
            (Activation::QuickGelu, Mask::Causal),
            (Activation::GeluTanh, Mask::Bidirectional),
            (Activation::GeluErf, Mask::Bidirectional),
        ] {
            let encoder = Encoder::new(&config(activation), mask, crate::model::weights::random_var_builder())?;
            let lens = [3, 7, 1];
            let xs = Tensor::randn(0f32, 1.0, (11, 16), &Device::Cpu)?;
            let batched = encoder.forward(&xs, &lens)?;
            let mut first = 0;
            for len in lens {
                let alone = encoder.forward(&xs.narrow(0, first, len)?, &[len])?;
                let diff = largest_difference(&alone, &batched.narrow(0, first, len)?);
                assert!(diff < 1e-5, "{activation:?} {mask:?}: {diff}");
                first += len;
            }
            assert!(encoder.forward(&xs, &[3, 7]).is_err());
        }
        Ok(())
    }

    #[test]
    fn the_pooled_forward_equals_the_full_forward_at_the_pooled_rows() -> Result<()> {
        for mask in [Mask::Causal, Mask::Bidirectional] {
            let encoder = Encoder::new(
                &config(Activation::QuickGelu),
                mask,
                crate::model::weights::random_var_builder(),
            )?;
            let (lens, pooled) = ([3, 7, 1], [2, 4, 0]);
            let xs = Tensor::randn(0f32, 1.0, (11, 16), &Device::Cpu)?;
            let full = encoder.forward(&xs, &lens)?;
            let rows = Tensor::new(&[2u32, 3 + 4, 10], &Device::Cpu)?;
            let diff = largest_difference(
                &encoder.forward_pooled(&xs, &lens, &pooled)?,
                &full.index_select(&rows, 0)?,
            );
            assert!(diff < 1e-5, "{mask:?}: {diff}");
            assert!(encoder.forward_pooled(&xs, &lens, &[2, 7, 0]).is_err());
        }
        Ok(())
    }

    #[test]
    fn causal_positions_do_not_see_what_follows() -> Result<()> {
        let vb = crate::model::weights::random_var_builder();
        let causal = Encoder::new(&config(Activation::QuickGelu), Mask::Causal, vb.clone())?;
        let xs = Tensor::randn(0f32, 1.0, (6, 16), &Device::Cpu)?;
        let longer = Tensor::cat(&[&xs, &Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu)?], 0)?;
        let (short, long) = (causal.forward(&xs, &[6])?, causal.forward(&longer, &[9])?);
        assert!(largest_difference(&short, &long.narrow(0, 0, 6)?) < 1e-5);
        // Both ways, the first rows do see the rest.
        let both = Encoder::new(&config(Activation::QuickGelu), Mask::Bidirectional, vb)?;
        let (short, long) = (both.forward(&xs, &[6])?, both.forward(&longer, &[9])?);
        assert!(largest_difference(&short, &long.narrow(0, 0, 6)?) > 1e-3);
        Ok(())
    }

    #[test]
    fn patches_are_the_convolutions_windows() -> Result<()> {
        // Values in [0, 1), as pixels are: at 0..96 the two summation orders differed by
        // more than 1e-4 now and then (f32 rounding of sums in the hundreds).
        let pixels = (Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 4.0, &Device::Cpu)? / 96.0)?.reshape((2, 3, 4, 4))?;
        let weight = Tensor::randn(0f32, 1.0, (5, 3, 2, 2), &Device::Cpu)?;
        let conv = pixels.conv2d(&weight, 0, 2, 1, 1)?; // [2, 5, 2, 2]
        let expected = conv.flatten_from(2)?.transpose(1, 2)?.reshape((8, 5))?;
        let got = patches(&pixels, 2)?.matmul(&weight.reshape((5, 12))?.t()?)?;
        assert!(largest_difference(&got, &expected) < 1e-4);
        assert!(patches(&pixels.narrow(3, 0, 3)?, 2).is_err());
        assert_eq!(got.dtype(), DType::F32);
        Ok(())
    }
}
