//! Ocellus: an inference server for vision-language models.
//!
//! The crate follows the request's path (see DESIGN.md): `processor` turns OpenAI-style
//! messages and images into token ids and pixel tensors, `engine` batches sequences and
//! samples tokens, `model` runs the network, `kv` holds the decoder's keys and values.

pub mod kv;
pub mod model;
