//! The models Ocellus runs, behind traits, and how they are loaded: a Hugging Face folder,
//! safetensors in one file or shards, a chosen dtype and device. Each family is a folder
//! (`smolvlm/`) that the architecture registry (`registry`) names; what differs between
//! families stays in its folder, behind `VisionLanguageModel` (the weights) and
//! `InputProcessor` (what it makes of images and videos).

pub mod blip;
pub mod clip;
pub mod decoder;
pub mod demo;
pub mod embedding;
pub mod encoder;
pub mod error;
pub mod files;
pub mod hub;
pub mod input;
pub mod lora;
pub mod ops;
pub mod qwen3vl;
pub mod registry;
pub mod resample;
pub mod siglip;
pub mod smolvlm;
pub mod square_image;
pub mod weights;

use candle_core::{DType, Device, Result, Tensor};

pub use error::LoadError;
pub use files::ModelFiles;
pub use input::{
    Detail, FrameSampling, ImageOptions, InputProcessor, MediaItem, ProcessedMedia, VideoInfo, VideoProcessor,
};
pub use registry::{load, load_input_processor};

use crate::kv::{KvPool, KvSpec, SequenceKv};

/// What the rest of the server needs to know about a model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub architecture: String,
    /// Tokens that stand for vision features in a prompt (images, video frames): each one
    /// is replaced by one row of its image's features, in order.
    pub image_token_ids: Vec<u32>,
    pub vocab_size: usize,
    pub max_positions: usize,
}

impl ModelInfo {
    pub fn is_image_token(&self, token: u32) -> bool {
        self.image_token_ids.contains(&token)
    }
}

/// A hash of an image's preprocessed pixels (and their layout): equal keys mean equal
/// model inputs, so vision features and KV blocks can be shared across requests. Keys are
/// of content only, never of position or surrounding text.
pub type ContentKey = [u8; 32];

/// One image's (or video's) pixels, laid out by its family's processor for the same
/// family's encoder: SmolVLM's tiles `[tiles, 3, S, S]`; a native-resolution family's
/// flattened patches `[patches, C·T·P·P]` with their grid (frames, rows, columns) in
/// patches. f32, on the CPU.
#[derive(Debug, Clone)]
pub struct Pixels {
    pub values: Tensor,
    pub grid: Option<[usize; 3]>,
}

impl Pixels {
    /// Pixels from their values, with the key of their content (values and layout).
    pub fn keyed(values: Vec<f32>, shape: &[usize], grid: Option<[usize; 3]>) -> Result<(Self, ContentKey)> {
        let mut hasher = blake3::Hasher::new();
        for dim in shape.iter().chain(grid.iter().flatten()) {
            hasher.update(&(*dim as u64).to_le_bytes());
        }
        hasher.update(bytemuck::cast_slice(&values));
        let values = Tensor::from_vec(values, shape, &Device::Cpu)?;
        Ok((Self { values, grid }, *hasher.finalize().as_bytes()))
    }

    pub fn bytes(&self) -> usize {
        self.values.elem_count() * self.values.dtype().size_in_bytes()
    }
}

/// What the vision side makes of one image: a row per placeholder token.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// Rows that replace the placeholder tokens' embeddings, `[rows, hidden]`.
    pub embeds: Tensor,
    /// Rows added to the hidden states of the first decoder layers at the same positions,
    /// one tensor per layer (Qwen3-VL's DeepStack); empty for families without them.
    pub deepstack: Vec<Tensor>,
}

impl ImageFeatures {
    pub fn rows(&self) -> usize {
        self.embeds.dim(0).unwrap_or(0)
    }

    /// Rows `start..start + len` of every tensor.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            embeds: self.embeds.narrow(0, start, len)?,
            deepstack: self
                .deepstack
                .iter()
                .map(|t| t.narrow(0, start, len))
                .collect::<Result<_>>()?,
        })
    }

    /// These rows split into consecutive parts of `rows` each (the images encoded together).
    /// Each part is a copy when there are several, so that each owns its rows (the vision
    /// cache counts what it holds).
    pub fn split(self, rows: &[usize]) -> Result<Vec<Self>> {
        if rows.len() == 1 {
            return Ok(vec![self]);
        }
        let mut first = 0;
        rows.iter()
            .map(|&n| {
                let part = |t: &Tensor| t.narrow(0, first, n)?.copy();
                let features = Self {
                    embeds: part(&self.embeds)?,
                    deepstack: self.deepstack.iter().map(part).collect::<Result<_>>()?,
                };
                first += n;
                Ok(features)
            })
            .collect()
    }

    /// The rows of several images, one after the other.
    pub fn cat(parts: &[&ImageFeatures]) -> Result<Self> {
        let embeds: Vec<&Tensor> = parts.iter().map(|p| &p.embeds).collect();
        let levels = parts.first().map_or(0, |p| p.deepstack.len());
        let deepstack = (0..levels)
            .map(|level| Tensor::cat(&parts.iter().map(|p| &p.deepstack[level]).collect::<Vec<_>>(), 0))
            .collect::<Result<_>>()?;
        Ok(Self {
            embeds: Tensor::cat(&embeds, 0)?,
            deepstack,
        })
    }

    /// Memory held (for the vision cache's budget): the tensors must own their storage.
    pub fn bytes(&self) -> usize {
        std::iter::once(&self.embeds)
            .chain(&self.deepstack)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Where a prompt's tokens sit for rotary embeddings when that is not their index: Qwen-VL's
/// M-RoPE gives every token three coordinates (time, row, column), image tokens those of
/// their patch and text tokens their index shifted past the images before them. Tokens after
/// the prompt continue from it: token `i` sits at `i + offset` on all three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPositions {
    pub prompt: Vec<[u32; 3]>,
    pub offset: i64,
}

impl TokenPositions {
    /// The positions of tokens `start..start + len`.
    pub fn range(&self, start: usize, len: usize) -> Vec<[u32; 3]> {
        (start..start + len)
            .map(|i| match self.prompt.get(i) {
                Some(&p) => p,
                None => [(i as i64 + self.offset).max(0) as u32; 3],
            })
            .collect()
    }
}

/// One sequence's part of a step: a prefill chunk or one decode token.
pub struct SequenceInput<'a> {
    pub tokens: &'a [u32],
    /// Where its tokens sit when not at their index (`TokenPositions`); `None`: at their
    /// index in the sequence.
    pub positions: Option<&'a TokenPositions>,
    /// Vision features for the image tokens among `tokens`, in order. `None` for decode
    /// steps and text: their tokens keep plain embeddings.
    pub image_features: Option<ImageFeatures>,
    pub kv: &'a mut SequenceKv,
    /// Whether this step needs the next-token logits of the sequence (a decode step or
    /// the last chunk of a prompt).
    pub wants_logits: bool,
    /// The LoRA adapter this sequence runs with; `None` for the base model.
    pub adapter: Option<&'a lora::Adapter>,
}

/// A generative vision-language model. It holds weights only: KV caches are owned by the
/// caller and lent per step, so one instance serves any number of sequences. Contrastive and
/// matching families (CLIP, SigLIP, BLIP's image-text matching) need no KV cache and no
/// generation: theirs is `embedding::EmbeddingModel`.
pub trait VisionLanguageModel: Send + Sync {
    fn info(&self) -> &ModelInfo;

    fn kv_spec(&self) -> KvSpec;

    /// Vision features of images, one result per image, in order: as many rows as the
    /// image has placeholder tokens. The images may be encoded together. `adapter`: the
    /// LoRA adapter of the sequence they belong to, which may change the vision tower and
    /// connector (`lora::Adapter::changes_vision`).
    fn encode_images(&self, images: &[&Pixels], adapter: Option<&lora::Adapter>) -> Result<Vec<ImageFeatures>>;

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

/// Weight quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// ggml's Q8_0: blocks of 32 int8 weights with one f16 scale.
    Q8_0,
}

/// Runs `f` on a worker of rayon's global pool, where candle's CPU backend and gemm
/// parallelise. Called from any other thread, each parallel op is injected into the pool
/// while the caller sleeps on a latch: hundreds of futex round trips per decode step. From a
/// worker, they are plain work-stealing jobs: decode at batch 1 went from 18.0 to 14.9 ms a
/// step, at batch 8 from 64 to 47 ms (SmolVLM-256M shapes, 2 threads).
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
