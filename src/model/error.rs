//! Errors from loading a model folder. Each names the file, and where it applies the
//! field or tensor, so that a broken folder can be fixed from the message alone.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model folder {dir} has no {file}")]
    MissingFile { dir: PathBuf, file: String },
    #[error(
        "{model} is neither a local folder, a built-in model (ocellus-demo, ocellus-demo-clip) nor a Hugging Face model id (owner/name)"
    )]
    NotAModel { model: String },
    #[error("{file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{file}: field `{field}`: {message}")]
    Json {
        file: PathBuf,
        field: String,
        message: String,
    },
    #[error("{file}: field `{field}`: {message}")]
    Invalid {
        file: PathBuf,
        field: String,
        message: String,
    },
    #[error("{file}: field `architectures`: unknown architecture `{name}`; supported: {supported}")]
    UnknownArchitecture {
        file: PathBuf,
        name: String,
        supported: String,
    },
    #[error("{file}: {message}")]
    Weights { file: PathBuf, message: String },
    /// A tensor the model needs is missing or misshapen; the message names file and tensor.
    #[error("{message}")]
    Tensor { message: String },
    #[error("{file}: {message}")]
    Tokenizer { file: PathBuf, message: String },
    #[error("{file}: chat template: {message}")]
    Template { file: PathBuf, message: String },
    #[error("Hugging Face hub, model `{model}`: {message}")]
    Hub { model: String, message: String },
}

impl LoadError {
    pub fn invalid(file: &std::path::Path, field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            file: file.to_path_buf(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}
