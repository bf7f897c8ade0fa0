//! Ocellus: an inference server for vision-language models.
//!
//! The crate follows the request's path (see DESIGN.md): `processor` turns OpenAI-style
//! messages and images into token ids and pixel tensors, `engine` batches sequences and
//! samples tokens, `model` runs the network, `kv` holds the decoder's keys and values; `train` fine-tunes.

pub mod api;
pub mod config;
pub mod engine;
pub mod kv;
pub mod media;
pub mod metrics;
pub mod model;
pub mod processor;
pub mod train;

use candle_core::Device;

use model::{LoadError, ModelFiles, VisionLanguageModel, WeightDType};
use processor::Processor;

/// A model and its processor, loaded from one folder.
pub struct LoadedModel {
    pub files: ModelFiles,
    pub model: Box<dyn VisionLanguageModel>,
    pub processor: Processor,
    /// What the KV pool stores keys and values in: the model's dtype unless set
    /// (`--kv-cache-dtype`).
    pub kv_dtype: candle_core::DType,
}

impl LoadedModel {
    /// The model's KV cache shape, in `kv_dtype`.
    pub fn kv_spec(&self) -> kv::KvSpec {
        kv::KvSpec {
            dtype: self.kv_dtype,
            ..self.model.kv_spec()
        }
    }

    /// An engine over this model with a KV pool of `kv_blocks` blocks; the processor stays
    /// with the caller (it runs on the request side).
    pub fn into_engine(
        self,
        config: engine::EngineConfig,
        kv_blocks: usize,
    ) -> candle_core::Result<(Processor, engine::EngineCore)> {
        let pool = kv::KvPool::new(&self.kv_spec(), kv_blocks)?;
        let tokenizer = self.processor.tokenizer().clone();
        let eos = self.processor.eos_token_ids().to_vec();
        let model: std::sync::Arc<dyn VisionLanguageModel> = self.model.into();
        Ok((
            self.processor,
            engine::EngineCore::new(model, pool, tokenizer, eos, config),
        ))
    }
}

/// Loads a model given as a local folder or a hub id (resolved through the Hugging Face
/// cache, downloaded unless HF_HUB_OFFLINE is set).
pub fn load_model(model: &str, dtype: WeightDType, device: &Device) -> Result<LoadedModel, LoadError> {
    let dir = model::hub::resolve_model(model, &model::hub::cache_dir_from_env(), model::hub::offline_from_env())?;
    load_folder(&dir, dtype, device)
}

/// Loads a model from a local folder in the Hugging Face layout. f32 text layers whose
/// weights are all bf16 values (a bf16 checkpoint at `--dtype f32`) are kept in bf16 and
/// widened exactly as read (`VisionLanguageModel::compact_text`): the same outputs.
pub fn load_folder(dir: &std::path::Path, dtype: WeightDType, device: &Device) -> Result<LoadedModel, LoadError> {
    let mut loaded = load_folder_as_stored(dir, dtype, device)?;
    let layers = (loaded.model.compact_text()).map_err(|e| LoadError::Tensor { message: e.to_string() })?;
    if layers > 0 {
        tracing::info!(
            layers,
            "f32 text layers whose weights are all bf16 values are kept in bf16"
        );
    }
    Ok(loaded)
}

/// `load_folder` with every weight held in `dtype` (for comparisons with the compact form).
pub fn load_folder_as_stored(
    dir: &std::path::Path,
    dtype: WeightDType,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let files = ModelFiles::locate(dir)?;
    let model = model::load(&files, dtype, device)?;
    let processor = Processor::load(&files, model.info())?;
    let kv_dtype = model.kv_spec().dtype;
    Ok(LoadedModel {
        files,
        model,
        processor,
        kv_dtype,
    })
}
