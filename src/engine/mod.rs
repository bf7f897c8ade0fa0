//! Turning prompts into tokens: scheduling steps over many sequences, sampling, and
//! deciding when a sequence ends. The KV caches of running sequences live here.

pub mod generator;
pub mod sampling;
pub mod scheduler;

pub use generator::{FinishReason, GenerateError, Generation, GenerationRequest, Generator, Timings};
pub use sampling::{Sampler, SamplingParams};
