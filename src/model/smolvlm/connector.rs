//! The connector between vision encoder and decoder: a pixel shuffle that trades spatial
//! resolution for channels (`scale_factor`² patches become one token), then one linear
//! projection into the decoder's embedding space (transformers' `Idefics3Connector`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear_no_bias};

use crate::model::lora::{LoraBatch, ModuleSpec};

/// PEFT's name for the connector's projection.
pub const MODULE: &str = "model.connector.modality_projection.proj";

pub struct Connector {
    proj: Linear,
    scale_factor: usize,
}

impl Connector {
    /// `vb` points at `model.connector`.
    pub fn new(vision_hidden: usize, text_hidden: usize, scale_factor: usize, vb: VarBuilder) -> Result<Self> {
        let input = vision_hidden * scale_factor * scale_factor;
        Ok(Self {
            proj: linear_no_bias(input, text_hidden, vb.pp("modality_projection.proj"))?,
            scale_factor,
        })
    }

    /// `[tiles, patches, vision_hidden]` -> `[tiles * patches / scale², text_hidden]`;
    /// `lora`: adapters and the connector's slot.
    pub fn forward(&self, xs: &Tensor, lora: Option<(&LoraBatch<'_>, usize)>) -> Result<Tensor> {
        let shuffled = pixel_shuffle(xs, self.scale_factor)?;
        let (tiles, seq, dim) = shuffled.dims3()?;
        let rows = shuffled.reshape((tiles * seq, dim))?;
        let ys = self.proj.forward(&rows)?;
        match lora {
            Some((lora, slot)) => lora.apply(slot, &rows, ys),
            None => Ok(ys),
        }
    }

    /// Its LoRA slot, as `lora::AdapterLayout` lists it.
    pub fn adapter_slot(&self) -> Vec<ModuleSpec> {
        let (out_features, in_features) = self.proj.weight().dims2().unwrap_or_default();
        vec![ModuleSpec {
            name: MODULE.into(),
            in_features,
            out_features,
        }]
    }
}

/// transformers' `Idefics3Connector.pixel_shuffle`, step for step.
pub fn pixel_shuffle(xs: &Tensor, s: usize) -> Result<Tensor> {
    let (b, seq, dim) = xs.dims3()?;
    let side = (seq as f64).sqrt() as usize;
    xs.reshape((b, side, side / s, dim * s))?
        .permute((0, 2, 1, 3))?
        .reshape((b, side / s, side / s, dim * s * s))?
        .permute((0, 2, 1, 3))?
        .reshape((b, seq / (s * s), dim * s * s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pixel_shuffle_groups_neighbouring_patches_like_transformers() -> Result<()> {
        // 4x4 patches of dim 1 holding their own index; scale 2 -> 4 tokens of dim 4.
        let xs = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 16, 1))?;
        let out = pixel_shuffle(&xs, 2)?.squeeze(0)?.to_vec2::<f32>()?;
        // Values computed with transformers' pixel_shuffle on torch.arange(16).view(1, 16, 1).
        assert_eq!(
            out,
            vec![
                vec![0.0, 1.0, 4.0, 5.0],
                vec![2.0, 3.0, 6.0, 7.0],
                vec![8.0, 9.0, 12.0, 13.0],
                vec![10.0, 11.0, 14.0, 15.0],
            ]
        );
        Ok(())
    }
}
