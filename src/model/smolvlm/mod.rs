//! SmolVLM and SmolVLM2 (Marafioti et al., "SmolVLM: Redefining small and efficient
//! multimodal models", arXiv:2504.05299): SigLIP vision encoder, pixel-shuffle connector,
//! Llama decoder. Weights follow transformers' tree (`model.vision_model`,
//! `model.connector`, `model.text_model`, `lm_head`). SmolVLM2 adds videos (`video`).

pub mod config;
pub mod connector;
pub mod image;
pub mod processor;
pub mod text;
pub mod video;
pub mod vision;

use candle_core::{DType, Device, Result, Tensor};

pub use config::SmolVlmConfig;
pub use processor::SmolVlmProcessor;

use crate::kv::{KvPool, KvSpec};
use crate::model::lora::{Adapter, AdapterLayout, LoraBatch};
use crate::model::registry::Family;
use crate::model::weights::SafetensorsWeights;
use crate::model::{
    ImageFeatures, InputProcessor, LoadError, ModelFiles, ModelInfo, Pixels, SequenceInput, VisionLanguageModel,
    on_compute_pool,
};
use connector::Connector;
use text::{SequenceRows, TextModel};
use vision::VisionTransformer;

/// SmolVLM (v1): images only.
pub const SMOLVLM: Family = Family {
    architectures: &["Idefics3ForConditionalGeneration"],
    load: load_model,
    input_processor: |files| Ok(Box::new(SmolVlmProcessor::load(files, false)?) as Box<dyn InputProcessor>),
};

/// SmolVLM2: images and videos.
pub const SMOLVLM2: Family = Family {
    architectures: &["SmolVLMForConditionalGeneration"],
    load: load_model,
    input_processor: |files| Ok(Box::new(SmolVlmProcessor::load(files, true)?) as Box<dyn InputProcessor>),
};

fn load_model(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
) -> std::result::Result<Box<dyn VisionLanguageModel>, LoadError> {
    let config = SmolVlmConfig::load(&files.config)?;
    Ok(Box::new(SmolVlm::load(config, files, dtype, device)?))
}

pub struct SmolVlm {
    vision: VisionTransformer,
    connector: Connector,
    text: TextModel,
    config: SmolVlmConfig,
    info: ModelInfo,
    device: Device,
    dtype: DType,
}

impl SmolVlm {
    pub fn load(
        config: SmolVlmConfig,
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let vb = SafetensorsWeights::open(&files.weights)?.into_var_builder(dtype, device);
        let tensor_error = |e: candle_core::Error| LoadError::Tensor { message: e.to_string() };
        let vision =
            VisionTransformer::new(&config.vision_config, vb.pp("model.vision_model")).map_err(tensor_error)?;
        let connector = Connector::new(
            config.vision_config.hidden_size,
            config.text_config.hidden_size,
            config.scale_factor,
            vb.pp("model.connector"),
        )
        .map_err(tensor_error)?;
        let text = TextModel::new(&config.text_config, config.tie_word_embeddings, vb).map_err(tensor_error)?;
        let info = config.info();
        Ok(Self {
            vision,
            connector,
            text,
            config,
            info,
            device: device.clone(),
            dtype,
        })
    }

    /// Token embeddings, with the image features of each input put in place of its image
    /// tokens. Inputs without features (decode steps, text) keep plain embeddings even for
    /// an image token id, as transformers does once the prompt is prefilled.
    fn embed(&self, ids: &[u32], batch: &[SequenceInput<'_>]) -> Result<Tensor> {
        let embeds = self.text.embed(&Tensor::new(ids, &self.device)?)?;
        let features: Vec<Tensor> = batch
            .iter()
            .filter_map(|i| i.image_features.as_ref().map(|f| f.embeds.clone()))
            .collect();
        if features.is_empty() {
            return Ok(embeds);
        }
        let mut next_feature = ids.len() as u32;
        let mut index: Vec<u32> = (0..ids.len() as u32).collect();
        let mut offset = 0;
        for input in batch {
            if input.image_features.is_some() {
                for (i, &id) in input.tokens.iter().enumerate() {
                    if id == self.config.image_token_id {
                        index[offset + i] = next_feature;
                        next_feature += 1;
                    }
                }
            }
            offset += input.tokens.len();
        }
        let mut sources = vec![embeds];
        sources.extend(
            features
                .iter()
                .map(|f| f.to_dtype(self.dtype))
                .collect::<Result<Vec<_>>>()?,
        );
        Tensor::cat(&sources, 0)?.index_select(&Tensor::new(index, &self.device)?, 0)
    }
}

impl VisionLanguageModel for SmolVlm {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn kv_spec(&self) -> KvSpec {
        let t = &self.config.text_config;
        KvSpec {
            num_layers: t.num_hidden_layers,
            num_kv_heads: t.num_kv_heads(),
            head_dim: t.head_dim(),
            dtype: self.dtype,
            device: self.device.clone(),
        }
    }

    /// The tiles of every image in one pass, split back per image.
    fn encode_images(&self, images: &[&Pixels]) -> Result<Vec<ImageFeatures>> {
        let tiles: Vec<Tensor> = images.iter().map(|p| p.values.clone()).collect();
        let counts: Vec<usize> = images.iter().map(|p| p.values.dim(0)).collect::<Result<_>>()?;
        let features = on_compute_pool(|| {
            let pixels = Tensor::cat(&tiles, 0)?.to_device(&self.device)?.to_dtype(self.dtype)?;
            let hidden = self.vision.forward(&pixels)?;
            self.connector.forward(&hidden)
        })?;
        let rows_per_tile = self.config.image_seq_len();
        let mut first = 0;
        counts
            .iter()
            .map(|&tiles| {
                let rows = tiles * rows_per_tile;
                // A copy when the output holds several images, so each owns its rows (the
                // vision cache counts what it holds).
                let embeds = match images.len() {
                    1 => features.clone(),
                    _ => features.narrow(0, first, rows)?.copy()?,
                };
                first += rows;
                Ok(ImageFeatures {
                    embeds,
                    deepstack: Vec::new(),
                })
            })
            .collect()
    }

    fn forward(&self, batch: &mut [SequenceInput<'_>], pool: &mut KvPool) -> Result<Tensor> {
        on_compute_pool(|| self.forward_batch(batch, pool))
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
        match quantization {
            crate::model::Quantization::Q8_0 => self.text.quantize_q8_0(),
        }
    }

    fn compact_text(&mut self) -> Result<usize> {
        self.text.compact()
    }
}

impl SmolVlm {
    fn forward_batch(&self, batch: &mut [SequenceInput<'_>], pool: &mut KvPool) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut logit_rows = Vec::new();
        let mut token_adapters: Vec<Option<&Adapter>> = Vec::new();
        let mut logit_adapters = Vec::new();
        for input in batch.iter() {
            let start = input.kv.len();
            let n = input.tokens.len();
            if n == 0 || start + n > input.kv.capacity() {
                candle_core::bail!("{n} tokens do not fit the sequence's KV blocks (len {start}). This is a bug.")
            }
            if start + n > self.info.max_positions {
                candle_core::bail!(
                    "sequence of {} tokens exceeds max_position_embeddings {}",
                    start + n,
                    self.info.max_positions
                )
            }
            if input.positions.is_some() {
                candle_core::bail!("SmolVLM places tokens at their index; it takes no other positions. This is a bug.")
            }
            if let Some(features) = &input.image_features {
                let image_tokens = input
                    .tokens
                    .iter()
                    .filter(|&&t| t == self.config.image_token_id)
                    .count();
                if features.rows() != image_tokens || !features.deepstack.is_empty() {
                    candle_core::bail!(
                        "{image_tokens} image tokens in a chunk but {} feature rows",
                        features.rows()
                    )
                }
            }
            ids.extend_from_slice(input.tokens);
            positions.extend((start..start + n).map(|p| p as u32));
            if input.wants_logits {
                logit_rows.push((ids.len() - 1) as u32);
                logit_adapters.push(input.adapter);
            }
            token_adapters.resize(ids.len(), input.adapter);
        }
        // Without adapters these are empty: no tensors, and `apply` returns its input.
        let token_lora = LoraBatch::new(&token_adapters, &self.device)?;
        let logit_lora = LoraBatch::new(&logit_adapters, &self.device)?;
        let embeds = self.embed(&ids, batch)?;
        let positions = Tensor::new(positions, &self.device)?;
        let mut offset = 0;
        let mut rows: Vec<SequenceRows> = batch
            .iter_mut()
            .map(|input| {
                let len = input.tokens.len();
                offset += len;
                SequenceRows {
                    offset: offset - len,
                    len,
                    kv: &mut *input.kv,
                }
            })
            .collect();
        let hidden = self.text.forward(&embeds, &positions, &mut rows, pool, &token_lora)?;
        if logit_rows.is_empty() {
            return Tensor::zeros((0, self.info.vocab_size), DType::F32, &self.device);
        }
        let last = hidden.index_select(&Tensor::new(logit_rows, &self.device)?, 0)?;
        self.text.logits(&last, &logit_lora)
    }
}
