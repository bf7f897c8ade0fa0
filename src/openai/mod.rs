//! OpenAI's API as the wire carries it and as Ocellus accepts it: the request and response
//! types (`types`, serde), and their validation into typed values (`validate`, `messages`)
//! with one `ValidationError` variant per rule. Knows nothing of HTTP, gRPC or the model:
//! the HTTP and gRPC front ends and fine-tuning's data reader all go through it.

pub mod embeddings;
pub mod error;
pub mod fields;
pub mod messages;
pub mod responses;
pub mod structured;
pub mod tokenize;
pub mod tool_calls;
pub mod tools;
pub mod types;
pub mod validate;

pub use error::ValidationError;
pub use messages::{Detail, ImagePart, Message, Part, PixelBudget, Role, ToolCall, VideoPart, messages};
pub use types::*;
pub use validate::{Limits, Options, ValidChat, ValidCompletion, chat, completion};

/// A request (or part of one) read from JSON; an error names the field's path
/// (`messages[0].content`) and what was wrong with it.
pub fn from_json<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        ValidationError::Json {
            message: err.into_inner().to_string(),
            param: (path != ".").then_some(path),
        }
    })
}

/// A JSON body's bytes as a value (malformed JSON is an error without a field).
pub fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, ValidationError> {
    serde_json::from_slice(bytes).map_err(|e| ValidationError::Json {
        message: e.to_string(),
        param: None,
    })
}
