//! Turning prompts into tokens for many sequences at once: scheduling (continuous
//! batching over a ragged batch), the KV blocks of running sequences, sampling,
//! incremental detokenization, stop strings, and the engine thread that owns it all.

pub mod core;
pub mod detokenizer;
pub mod handle;
pub mod offline;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod stop;
pub mod vision;
pub mod vision_cache;

pub use core::{AddError, EngineConfig, EngineCore, StepReport};
pub use handle::{EngineHandle, SubmitError};
pub use offline::{Generation, Timings, generate};
pub use request::{ChoiceEvent, EngineFailure, FinishReason, GenerationRequest, SequenceEvent, Usage};
pub use sampling::{SamplingParams, TokenLogprobs};
