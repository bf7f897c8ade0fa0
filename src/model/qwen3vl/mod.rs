//! Qwen3-VL (Qwen team, "Qwen3-VL Technical Report", arXiv:2511.21631), dense variants:
//! a ViT at native resolution with 2-D RoPE and learned position embeddings, a patch
//! merger, DeepStack (features of a few vision layers added to the first decoder layers'
//! hidden states at image positions), and the Qwen3 decoder (RMSNorm of each head's queries
//! and keys) with interleaved M-RoPE: every token has a time, row and column position.
//! Weights follow transformers' tree (`model.visual`, `model.language_model`, `lm_head`).
//!
//! candle-transformers' `qwen3_vl` is not used: its patch merger uses tanh-approximate GELU
//! where transformers' is exact (`nn.GELU()`), and its decoder owns a contiguous KV cache,
//! where Ocellus's engine lends each step blocks of a paged one.

pub mod config;
pub mod processor;
pub mod video;
pub mod vision;

use candle_core::{DType, Device, Result, Tensor};

pub use config::Qwen3VlConfig;
pub use processor::Qwen3VlProcessor;

use crate::kv::{KvPool, KvSpec};
use crate::model::decoder::{StepRules, TextModel, inv_freq};
use crate::model::lora::AdapterLayout;
use crate::model::registry::Family;
use crate::model::weights::SafetensorsWeights;
use crate::model::{
    ImageFeatures, InputProcessor, LoadError, ModelFiles, ModelInfo, Pixels, SequenceInput, VisionLanguageModel,
    on_compute_pool,
};
use vision::VisionModel;

pub const QWEN3_VL: Family = Family {
    architectures: &["Qwen3VLForConditionalGeneration"],
    load: load_model,
    input_processor: |files| Ok(Box::new(Qwen3VlProcessor::load(files)?) as Box<dyn InputProcessor>),
};

/// The mixture-of-experts variants (Qwen3-VL-30B-A3B, 235B-A22B), refused by name.
pub const QWEN3_VL_MOE: Family = Family {
    architectures: &["Qwen3VLMoeForConditionalGeneration"],
    load: |files, _, _| Err(moe_refused(files)),
    input_processor: |files| Err(moe_refused(files)),
};

fn moe_refused(files: &ModelFiles) -> LoadError {
    LoadError::invalid(
        &files.config,
        "architectures",
        "Qwen3VLMoeForConditionalGeneration (mixture of experts) is not supported yet; the dense Qwen3VLForConditionalGeneration is",
    )
}

fn load_model(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
) -> std::result::Result<Box<dyn VisionLanguageModel>, LoadError> {
    let config = Qwen3VlConfig::load(&files.config)?;
    Ok(Box::new(Qwen3Vl::load(config, files, dtype, device)?))
}

pub struct Qwen3Vl {
    vision: VisionModel,
    text: TextModel,
    config: Qwen3VlConfig,
    info: ModelInfo,
    /// RoPE's frequencies, and which coordinate (time, row, column) each one turns by.
    inv_freq: Vec<f32>,
    axis: Vec<usize>,
    device: Device,
    dtype: DType,
}

impl Qwen3Vl {
    pub fn load(
        config: Qwen3VlConfig,
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let vb = SafetensorsWeights::open(&files.weights)?.into_var_builder(dtype, device);
        let tensor_error = |e: candle_core::Error| LoadError::Tensor { message: e.to_string() };
        let vision = VisionModel::new(&config.vision_config, vb.pp("model.visual")).map_err(tensor_error)?;
        let text = TextModel::new(&config.decoder(), vb).map_err(tensor_error)?;
        let t = &config.text_config;
        let inv_freq = inv_freq(t.head_dim(), t.rope_theta());
        let axis = mrope_axes(inv_freq.len(), t.mrope_section());
        let info = config.info();
        Ok(Self {
            vision,
            text,
            config,
            info,
            inv_freq,
            axis,
            device: device.clone(),
            dtype,
        })
    }
}

/// transformers' `apply_interleaved_mrope`: frequency `i` turns by the row position when
/// `i % 3 == 1` and `i < 3 · rows`, by the column when `i % 3 == 2` and `i < 3 · columns`,
/// else by time.
fn mrope_axes(frequencies: usize, [_, rows, columns]: [usize; 3]) -> Vec<usize> {
    (0..frequencies)
        .map(|i| match i % 3 {
            1 if i < 3 * rows => 1,
            2 if i < 3 * columns => 2,
            _ => 0,
        })
        .collect()
}

impl StepRules for Qwen3Vl {
    fn is_image_token(&self, token: u32) -> bool {
        self.info.is_image_token(token)
    }

    /// Each row's angles from its three coordinates, in f32 as transformers computes them.
    fn rope(&self, batch: &[SequenceInput<'_>]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let rows: usize = batch.iter().map(|i| i.tokens.len()).sum();
        let (mut cos, mut sin) = (Vec::with_capacity(rows * half), Vec::with_capacity(rows * half));
        for input in batch {
            let (start, n) = (input.kv.len(), input.tokens.len());
            let positions = match input.positions {
                Some(p) => p.range(start, n),
                None => (start..start + n).map(|p| [p as u32; 3]).collect(),
            };
            for position in positions {
                for (f, &axis) in self.inv_freq.iter().zip(&self.axis) {
                    let angle = position[axis] as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (rows, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (rows, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }
}

impl VisionLanguageModel for Qwen3Vl {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn kv_spec(&self) -> KvSpec {
        self.text.kv_spec(self.dtype, &self.device)
    }

    /// All images in one pass (attention stays within each), split back per image. Its
    /// adapters change the text model only (`adapter_layout`), so none changes these.
    fn encode_images(
        &self,
        images: &[&Pixels],
        _adapter: Option<&crate::model::lora::Adapter>,
    ) -> Result<Vec<ImageFeatures>> {
        let mut batch = Vec::with_capacity(images.len());
        for pixels in images {
            let Some(grid) = pixels.grid else {
                candle_core::bail!("Qwen3-VL takes patches with their grid. This is a bug.")
            };
            batch.push((&pixels.values, grid));
        }
        let out = on_compute_pool(|| self.vision.forward(&batch, self.dtype, &self.device))?;
        let merge = self.config.vision_config.spatial_merge_size.pow(2);
        let rows: Vec<usize> = batch.iter().map(|(_, [t, h, w])| t * h * w / merge).collect();
        let all = ImageFeatures {
            embeds: out.embeds,
            deepstack: out.deepstack,
        };
        all.split(&rows)
    }

    fn forward(&self, batch: &mut [SequenceInput<'_>], pool: &mut KvPool) -> Result<Tensor> {
        on_compute_pool(|| (self.text).step(batch, pool, self.info.max_positions, self))
    }

    fn adapter_layout(&self) -> AdapterLayout {
        self.text.adapter_layout().clone()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn quantize_text(&mut self, quantization: crate::model::Quantization) -> Result<usize> {
        self.text.quantize(quantization)
    }

    fn compact_text(&mut self) -> Result<usize> {
        self.text.compact()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_mrope_turns_rows_and_columns_in_turn() {
        // Qwen3-VL-2B: 64 frequencies, sections [24, 20, 20].
        let axes = mrope_axes(64, [24, 20, 20]);
        assert_eq!(&axes[..7], &[0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(&axes[57..64], &[0, 1, 2, 0, 0, 0, 0]);
        assert_eq!(axes.iter().filter(|&&a| a == 1).count(), 20);
        assert_eq!(axes.iter().filter(|&&a| a == 2).count(), 20);
    }
}
