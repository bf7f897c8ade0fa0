//! Ocellus: an inference server for vision-language models. The layers, top to bottom (see
//! the README's "Architecture" and scripts/check_layers.py, which holds them to it):
//! `api` (HTTP and gRPC) over `openai` (the wire types and their validation); `processor`
//! (a request to the engine's input, media through `media`); `engine` (continuous batching,
//! vision on its own thread, sampling) over `kv` (the paged KV cache) and `model` (the
//! families behind traits, their CPU kernels, LoRA); `train` fine-tunes; `runtime` is the
//! one composition root; `config` and `metrics` are plain data.

pub mod api;
pub mod config;
pub mod engine;
pub mod kv;
pub mod media;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod processor;
pub mod runtime;
pub mod train;
