//! Qwen3-VL's vision encoder, as transformers' `Qwen3VLVisionModel` runs it: a ViT over
//! patches at the image's native resolution, with learned position embeddings resampled
//! (bilinear, corners aligned) from a square grid to the image's, 2-D rotary embeddings
//! over rows and columns, attention within each frame, and patch mergers that turn each
//! 2×2 block of patches into one row for the decoder: the last layer's (`merger`) and, for
//! DeepStack, those of a few earlier layers (`deepstack_merger_list`).
//!
//! Patches arrive in the processor's order: block by block (a block is the 2×2 patches
//! one merged row is made of), so that merging is a reshape.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear};

use crate::model::ops::epilogue::{self, Then};
use crate::model::ops::frame_attention;
use crate::model::ops::norm::LayerNorm;

use super::config::VisionConfig;

const NORM_EPS: f64 = 1e-6;
/// At most this many bytes of attention scores per task of `frame_attention` (at least one
/// query row's).
const SCORES_BYTES: usize = 4 << 20;

pub struct VisionModel {
    patch_weight: Tensor,
    patch_bias: Tensor,
    pos_embed: Vec<f32>,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<(usize, Merger)>,
    /// The learned position grid is `side × side`.
    side: usize,
    merge: usize,
    hidden: usize,
    heads: usize,
    /// The 2-D rotary embedding's frequencies (a quarter of a head's width each for rows
    /// and columns).
    inv_freq: Vec<f32>,
    /// `SCORES_BYTES`, or less in tests.
    scores_bytes: usize,
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// 2×2 patches → one decoder row: LayerNorm before (`merger`) or after (DeepStack's) the
/// four are concatenated, then fc1, exact GELU, fc2.
struct Merger {
    norm: LayerNorm,
    postshuffle: bool,
    fc1: Linear,
    fc2: Linear,
}

/// What the encoder makes of a batch of images: rows for the decoder, and DeepStack's rows
/// per level, both `[merged patches, out_hidden]`.
pub struct VisionOutput {
    pub embeds: Tensor,
    pub deepstack: Vec<Tensor>,
}

impl VisionModel {
    /// `vb` points at `model.visual`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let patch = vb.pp("patch_embed.proj");
        let (c, t, p) = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size);
        // The 3-D convolution (kernel = stride = patch) is a matmul over flattened patches.
        let patch_weight = patch.get((d, c, t, p, p), "weight")?.reshape((d, cfg.patch_values()))?;
        let patch_bias = patch.get(d, "bias")?;
        let pos_embed = vb
            .get((cfg.num_position_embeddings, d), "pos_embed.weight")?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<_>>()?;
        let deepstack = (cfg.deepstack_visual_indexes.iter().enumerate())
            .map(|(i, &layer)| {
                Ok((
                    layer,
                    Merger::new(cfg, true, vb.pp(format!("deepstack_merger_list.{i}")))?,
                ))
            })
            .collect::<Result<_>>()?;
        let quarter = cfg.head_dim() / 2;
        let theta = cfg.rope_theta() as f32;
        let inv_freq = (0..quarter)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / quarter as f32))
            .collect();
        Ok(Self {
            patch_weight,
            patch_bias,
            pos_embed,
            blocks,
            merger: Merger::new(cfg, false, vb.pp("merger"))?,
            deepstack,
            side: (cfg.num_position_embeddings as f64).sqrt() as usize,
            merge: cfg.spatial_merge_size,
            hidden: d,
            heads: cfg.num_heads,
            inv_freq,
            scores_bytes: SCORES_BYTES,
        })
    }

    /// Several images' patches (`[patches, values]` each, with their grids `[t, h, w]`), as
    /// one batch; attention stays within each frame.
    pub fn forward(&self, images: &[(&Tensor, [usize; 3])], dtype: DType, device: &Device) -> Result<VisionOutput> {
        let mut frames = Vec::new();
        let mut pos = Vec::new();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &(_, [t, h, w]) in images {
            frames.extend(std::iter::repeat_n(h * w, t));
            let (p, (c, s)) = (self.position_embeddings(h, w), self.rotary(h, w));
            for _ in 0..t {
                pos.extend_from_slice(&p);
                cos.extend_from_slice(&c);
                sin.extend_from_slice(&s);
            }
        }
        let rows: usize = frames.iter().sum();
        let patches: Vec<Tensor> = images.iter().map(|(p, _)| (*p).clone()).collect();
        let patches = Tensor::cat(&patches, 0)?.to_device(device)?.to_dtype(dtype)?;
        let pos = Tensor::from_vec(pos, (rows, self.hidden), device)?.to_dtype(dtype)?;
        let embedded = patches
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;
        let mut xs = (embedded + pos)?;
        let half = self.hidden / self.heads / 2;
        let cos = Tensor::from_vec(cos, (rows, half), device)?;
        let sin = Tensor::from_vec(sin, (rows, half), device)?;
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (index, block) in self.blocks.iter().enumerate() {
            xs = block.forward(&xs, &frames, (&cos, &sin), self.heads, self.scores_bytes)?;
            for (_, merger) in self.deepstack.iter().filter(|(layer, _)| *layer == index) {
                deepstack.push(merger.forward(&xs, self.merge)?);
            }
        }
        Ok(VisionOutput {
            embeds: self.merger.forward(&xs, self.merge)?,
            deepstack,
        })
    }

    /// One frame's position embeddings, `[h · w, hidden]` in block order: the learned grid
    /// resampled bilinearly with corners aligned (transformers'
    /// `get_vision_interpolation_indices_and_weights`).
    fn position_embeddings(&self, h: usize, w: usize) -> Vec<f32> {
        let (side, d) = (self.side, self.hidden);
        let taps = |index: usize, size: usize| -> [(usize, f32); 2] {
            let src = index as f32 * (side - 1) as f32 / (size.max(2) - 1) as f32;
            let floor = src.floor();
            let at = |offset: f32| {
                let tap = ((floor + offset) as usize).min(side - 1);
                (tap, (1.0 - (src - floor - offset).abs()).max(0.0))
            };
            [at(0.0), at(1.0)]
        };
        let mut out = Vec::with_capacity(h * w * d);
        for (row, col) in block_order(h, w, self.merge) {
            let (rows, cols) = (taps(row, h), taps(col, w));
            let mut acc = vec![0f32; d];
            for (r, rw) in rows {
                for (c, cw) in cols {
                    let weight = rw * cw;
                    let embed = &self.pos_embed[(r * side + c) * d..][..d];
                    acc.iter_mut().zip(embed).for_each(|(a, e)| *a += e * weight);
                }
            }
            out.extend(acc);
        }
        out
    }

    /// One frame's rotary cos and sin, `[h · w, head_dim / 2]` each in block order: a
    /// patch's row angles, then its column angles.
    fn rotary(&self, h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
        let width = 2 * self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(h * w * width), Vec::with_capacity(h * w * width));
        for (row, col) in block_order(h, w, self.merge) {
            for position in [row, col] {
                for f in &self.inv_freq {
                    let angle = position as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        (cos, sin)
    }
}

/// (row, column) of each patch of an `h × w` grid, block by block (`merge × merge` blocks,
/// row-major), row-major within a block.
pub fn block_order(h: usize, w: usize, merge: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..h / merge).flat_map(move |br| {
        (0..w / merge).flat_map(move |bc| {
            (0..merge).flat_map(move |ir| (0..merge).map(move |ic| (br * merge + ir, bc * merge + ic)))
        })
    })
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            norm1: LayerNorm::new(d, NORM_EPS, vb.pp("norm1"))?,
            qkv: linear(d, 3 * d, vb.pp("attn.qkv"))?,
            proj: linear(d, d, vb.pp("attn.proj"))?,
            norm2: LayerNorm::new(d, NORM_EPS, vb.pp("norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.linear_fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.linear_fc2"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        frames: &[usize],
        rope: (&Tensor, &Tensor),
        heads: usize,
        scores_bytes: usize,
    ) -> Result<Tensor> {
        let hs = self.attention(&self.norm1.forward(xs)?, frames, rope, heads, xs, scores_bytes)?;
        let mlp = epilogue::linear(&self.fc1, &self.norm2.forward(&hs)?, Then::GeluTanh)?;
        epilogue::linear(&self.fc2, &mlp, Then::Add(&hs))
    }

    /// Attention within each frame (`frames`: its patches, in order), plus `residual`.
    fn attention(
        &self,
        xs: &Tensor,
        frames: &[usize],
        (cos, sin): (&Tensor, &Tensor),
        heads: usize,
        residual: &Tensor,
        scores_bytes: usize,
    ) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let head_dim = d / heads;
        let qkv = epilogue::linear(&self.qkv, xs, Then::Nothing)?.reshape((rows, 3, heads, head_dim))?;
        // transformers rotates q and k in f32.
        let rotate = |i: usize| -> Result<Tensor> {
            let t = qkv.narrow(1, i, 1)?.squeeze(1)?.to_dtype(DType::F32)?.contiguous()?;
            let t = candle_nn::rotary_emb::rope_thd(&t.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
            t.to_dtype(xs.dtype())
        };
        let scale = (head_dim as f64).powf(-0.5);
        let q = (rotate(0)? * scale)?;
        let k = rotate(1)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
        let out = frame_attention::attention(&q, &k, &v, frames, scores_bytes)?;
        epilogue::linear(&self.proj, &out, Then::Add(residual))
    }
}

impl Merger {
    fn new(cfg: &VisionConfig, postshuffle: bool, vb: VarBuilder) -> Result<Self> {
        let merged = cfg.hidden_size * cfg.spatial_merge_size.pow(2);
        let norm_size = if postshuffle { merged } else { cfg.hidden_size };
        Ok(Self {
            norm: LayerNorm::new(norm_size, NORM_EPS, vb.pp("norm"))?,
            postshuffle,
            fc1: linear(merged, merged, vb.pp("linear_fc1"))?,
            fc2: linear(merged, cfg.out_hidden_size, vb.pp("linear_fc2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, merge: usize) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let merged = (rows / (merge * merge), d * merge * merge);
        let xs = match self.postshuffle {
            true => self.norm.forward(&xs.reshape(merged)?)?,
            false => self.norm.forward(xs)?.reshape(merged)?,
        };
        let hidden = self.fc1.forward(&xs)?.gelu_erf()?;
        self.fc2.forward(&hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_a_block_of_queries_at_a_time_equals_all_at_once() -> Result<()> {
        let cfg: VisionConfig = serde_json::from_str(
            r#"{"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
                "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 16,
                "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}"#,
        )
        .expect("a vision config");
        let vb = crate::model::weights::random_var_builder();
        let mut model = VisionModel::new(&cfg, vb)?;
        // Two images, one of two frames: 8x6 and 2x(4x4) patches.
        let a = Tensor::randn(0f32, 1.0, (48, cfg.patch_values()), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (32, cfg.patch_values()), &Device::Cpu)?;
        let images = [(&a, [1, 8, 6]), (&b, [2, 4, 4])];
        let run = |model: &VisionModel| -> Result<Vec<f32>> {
            let out = model.forward(&images, DType::F32, &Device::Cpu)?;
            assert_eq!(out.embeds.dims(), [20, 16]);
            let all = Tensor::cat(&[&out.embeds, &out.deepstack[0]], 0)?;
            all.flatten_all()?.to_vec1::<f32>()
        };
        let whole = run(&model)?;
        // One head and one query row at a time (48 keys x 4 bytes), then three rows.
        for rows in [1, 3] {
            model.scores_bytes = rows * 48 * 4;
            // Equal up to the summation order of the matmuls, which changes with their size.
            let diff = run(&model)?
                .iter()
                .zip(&whole)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = whole.iter().map(|x| x.abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-5 * scale, "{rows} rows at a time: {diff} of {scale}");
        }
        Ok(())
    }

    #[test]
    fn patches_are_ordered_block_by_block() {
        let order: Vec<_> = block_order(2, 4, 2).collect();
        assert_eq!(order, [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
    }
}
