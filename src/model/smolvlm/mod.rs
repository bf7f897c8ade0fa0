//! SmolVLM and SmolVLM2 (Marafioti et al., "SmolVLM: Redefining small and efficient
//! multimodal models", arXiv:2504.05299): SigLIP vision encoder, pixel-shuffle connector,
//! Llama decoder. Weights follow transformers' tree (`model.vision_model`,
//! `model.connector`, `model.text_model`, `lm_head`). SmolVLM2 adds videos (`video`).

pub mod config;
pub mod connector;
pub mod image;
pub mod processor;
pub mod video;
pub mod vision;

use candle_core::{DType, Device, Result, Tensor};

pub use config::SmolVlmConfig;
pub use processor::SmolVlmProcessor;

use crate::kv::{KvPool, KvSpec};
use crate::model::decoder::{RotaryTable, StepRules, TextModel};
use crate::model::encoder::EncoderLora;
use crate::model::lora::{Adapter, AdapterLayout, LoraBatch};
use crate::model::registry::Family;
use crate::model::weights::SafetensorsWeights;
use crate::model::{
    ImageFeatures, InputProcessor, LoadError, ModelFiles, ModelInfo, Pixels, SequenceInput, VisionLanguageModel,
    on_compute_pool,
};
use connector::Connector;
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
    /// The text model's LoRA slots, then the vision encoder's and the connector's.
    layout: AdapterLayout,
    rope: RotaryTable,
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
        let t = &config.text_config;
        let rope = RotaryTable::new(t.head_dim(), t.rope_theta(), t.max_position_embeddings, dtype, device)
            .map_err(tensor_error)?;
        let text = TextModel::new(&t.decoder(config.tie_word_embeddings), vb).map_err(tensor_error)?;
        let info = config.info();
        let mut vision_slots = vision.adapter_slots().to_vec();
        vision_slots.push(connector.adapter_slot());
        let layout = text.adapter_layout().clone().with_vision(
            vision_slots,
            "adapters may change the text model's q/k/v/o, gate/up/down projections and lm_head, \
             the vision encoder's q/k/v/out projections and fc1/fc2, and the connector's \
             modality_projection.proj",
        );
        Ok(Self {
            vision,
            connector,
            text,
            layout,
            rope,
            config,
            info,
            device: device.clone(),
            dtype,
        })
    }
}

impl VisionLanguageModel for SmolVlm {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn kv_spec(&self) -> KvSpec {
        self.text.kv_spec(self.dtype, &self.device)
    }

    /// The tiles of every image in one pass, split back per image.
    fn encode_images(&self, images: &[&Pixels], adapter: Option<&Adapter>) -> Result<Vec<ImageFeatures>> {
        let tiles: Vec<Tensor> = images.iter().map(|p| p.values.clone()).collect();
        let counts: Vec<usize> = images.iter().map(|p| p.values.dim(0)).collect::<Result<_>>()?;
        let adapter = adapter.filter(|a| a.changes_vision());
        let features = on_compute_pool(|| {
            let pixels = Tensor::cat(&tiles, 0)?.to_device(&self.device)?.to_dtype(self.dtype)?;
            let Some(adapter) = adapter else {
                return self.connector.forward(&self.vision.forward(&pixels)?, None);
            };
            // Every tile of the call is the one sequence's: the adapter covers all rows.
            let lora = LoraBatch::new(&[Some(adapter)], &self.device)?;
            let first_slot = self.layout.first_vision_slot;
            let hidden = self.vision.forward_adapted(
                &pixels,
                Some(EncoderLora {
                    batch: &lora,
                    first_slot,
                }),
            )?;
            self.connector
                .forward(&hidden, Some((&lora, self.layout.slots.len() - 1)))
        })?;
        let rows: Vec<usize> = counts.iter().map(|tiles| tiles * self.config.image_seq_len()).collect();
        let all = ImageFeatures {
            embeds: features,
            deepstack: Vec::new(),
        };
        all.split(&rows)
    }

    fn forward(&self, batch: &mut [SequenceInput<'_>], pool: &mut KvPool) -> Result<Tensor> {
        on_compute_pool(|| (self.text).step(batch, pool, self.info.max_positions, self))
    }
    fn adapter_layout(&self) -> AdapterLayout {
        self.layout.clone()
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

impl StepRules for SmolVlm {
    fn is_image_token(&self, token: u32) -> bool {
        token == self.config.image_token_id
    }

    /// Every token at its index in its sequence.
    fn rope(&self, batch: &[SequenceInput<'_>]) -> Result<(Tensor, Tensor)> {
        let mut positions = Vec::new();
        for input in batch {
            if input.positions.is_some() {
                candle_core::bail!("SmolVLM places tokens at their index; it takes no other positions. This is a bug.")
            }
            let start = input.kv.len();
            positions.extend((start..start + input.tokens.len()).map(|p| p as u32));
        }
        self.rope.select(&Tensor::new(positions, &self.device)?)
    }
}
