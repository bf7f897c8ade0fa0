//! The models Ocellus runs, behind one trait, and how they are loaded: a Hugging Face
//! folder or hub id, safetensors in one file or shards, a chosen dtype and device.

pub mod decode_attention;
pub mod epilogue;
pub mod error;
pub mod exact_bf16;
pub mod few_rows;
pub mod files;
pub mod hub;
pub mod kernels;
pub mod lora;
pub mod norm;
pub mod proj;
pub mod smolvlm;
pub mod weights;

use candle_core::{DType, Device, Result, Tensor};

pub use error::LoadError;
pub use files::ModelFiles;

use crate::kv::{KvPool, KvSpec, SequenceKv};

/// The dtype weights are loaded in (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDType {
    F32,
    Bf16,
    F16,
}

impl From<WeightDType> for DType {
    fn from(d: WeightDType) -> Self {
        match d {
            WeightDType::F32 => DType::F32,
            WeightDType::Bf16 => DType::BF16,
            WeightDType::F16 => DType::F16,
        }
    }
}

/// What the rest of the server needs to know about a model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub architecture: String,
    pub image_token_id: u32,
    /// Decoder tokens per image tile.
    pub image_seq_len: usize,
    /// Side of the square tiles the vision encoder takes.
    pub tile_size: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
}

/// One sequence's part of a step: a prefill chunk or one decode token.
pub struct SequenceInput<'a> {
    pub tokens: &'a [u32],
    /// Vision features for the image tokens among `tokens`, in order (`[n, hidden]`).
    /// `None` for decode steps and text: their tokens keep plain embeddings.
    pub image_features: Option<Tensor>,
    pub kv: &'a mut SequenceKv,
    /// Whether this step needs the next-token logits of the sequence (a decode step or
    /// the last chunk of a prompt).
    pub wants_logits: bool,
    /// The LoRA adapter this sequence runs with; `None` for the base model.
    pub adapter: Option<&'a lora::Adapter>,
}

/// A vision-language model. It holds weights only: KV caches are owned by the caller and
/// lent per step, so one instance serves any number of sequences.
pub trait VisionLanguageModel: Send + Sync {
    fn info(&self) -> &ModelInfo;

    fn kv_spec(&self) -> KvSpec;

    /// Vision features of image tiles: `[tiles, 3, S, S]` -> `[tiles * image_seq_len, hidden]`.
    fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor>;

    /// One step over a ragged batch. Each input's KV blocks (in `pool`) must already have
    /// room for its tokens; they are written and committed. Returns f32 logits `[k, vocab]`
    /// for the `k` inputs whose `wants_logits` is set, in batch order.
    fn forward(&self, batch: &mut [SequenceInput<'_>], pool: &mut KvPool) -> Result<Tensor>;

    /// The linear layers a LoRA adapter may change, as `lora::Adapter::load` takes them.
    fn adapter_layout(&self) -> lora::AdapterLayout;

    fn device(&self) -> &Device;

    fn dtype(&self) -> DType;

    /// Stores the text model's linear layers (and its head) as int8 blocks (`q8_0`): about a
    /// quarter of the f32 bytes, so a decode step, which reads every weight once, moves a
    /// quarter of the memory. Layers whose input width is not a multiple of the block size
    /// stay dense. Returns how many layers were quantized.
    fn quantize_text(&mut self, quantization: Quantization) -> Result<usize>;

    /// Keeps the text model's f32 linear layers (and its head) whose weights are all bf16
    /// values, as a bf16 checkpoint loaded at f32 gives, in bf16, widened exactly as they are
    /// read: the same outputs from half the memory and half a decode step's traffic. Only
    /// on the CPU; returns how many layers were kept in bf16.
    fn compact_text(&mut self) -> Result<usize>;
}

/// Weight quantization (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantization {
    /// ggml's Q8_0: blocks of 32 int8 weights with one f16 scale.
    #[value(name = "q8_0")]
    Q8_0,
}

/// Loads the model of a located folder, picking the implementation by architecture.
pub fn load(
    files: &ModelFiles,
    dtype: WeightDType,
    device: &Device,
) -> std::result::Result<Box<dyn VisionLanguageModel>, LoadError> {
    let config = smolvlm::SmolVlmConfig::load(&files.config)?;
    let model = smolvlm::SmolVlm::load(config, files, dtype.into(), device)?;
    Ok(Box::new(model))
}

/// Runs `f` on a worker of rayon's global pool, where candle's CPU backend and gemm
/// parallelise. Called from any other thread, each parallel op is injected into the pool
/// while the caller sleeps on a latch: hundreds of futex round trips per decode step. From a
/// worker, they are plain work-stealing jobs: decode at batch 1 went from 18.0 to 14.9 ms a
/// step, at batch 8 from 64 to 47 ms (SmolVLM-256M shapes, 2 threads).
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
