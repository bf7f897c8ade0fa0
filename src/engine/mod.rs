//! Turning prompts into tokens for many sequences at once: its input types (`request`),
//! scheduling (continuous batching over a ragged batch), the KV blocks of running
//! sequences, vision encoding on its own thread, sampling, incremental detokenization, stop
//! strings, and the engine thread that owns it all. It depends on the model traits and the
//! KV pool only.

pub mod constraint;
pub mod core;
pub mod detokenizer;
pub mod embed;
pub mod handle;
pub mod offline;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod stop;
pub mod vision;
pub mod vision_cache;

pub use core::{EngineConfig, EngineCore, StepReport};
pub use handle::{Adapter, AdapterRegistry, EngineHandle, EngineObserver, EngineState, RegistryError, SubmitError};
pub use offline::{Generation, Timings, generate};
pub use request::{
    AddError, ChoiceEvent, EngineFailure, FinishReason, GenerationParams, GenerationRequest, Prompt, PromptImage,
    SequenceEvent, Usage, admit,
};
pub use sampling::{SamplingParams, TokenLogprobs};
