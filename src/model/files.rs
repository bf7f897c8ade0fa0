//! A model folder in the Hugging Face layout: which files it holds, and reading its JSON
//! with errors that name the file and the field.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::error::LoadError;

/// Where the chat template of a folder lives; hub folders have used all three over time.
#[derive(Debug, Clone)]
pub enum ChatTemplateFile {
    /// `chat_template.jinja` (transformers 5)
    Jinja(PathBuf),
    /// `chat_template.json` with a `chat_template` string (processor files, transformers 4)
    Json(PathBuf),
    /// the `chat_template` field of `tokenizer_config.json`
    TokenizerConfig(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// One file, or the shards named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    /// `None` for models that do not chat (contrastive and matching models); the chat
    /// processor refuses a folder without one.
    pub chat_template: Option<ChatTemplateFile>,
    pub preprocessor_config: Option<PathBuf>,
    pub processor_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

impl ModelFiles {
    /// Finds the files of a model folder; a required file that is missing is an error.
    pub fn locate(dir: &Path) -> Result<Self, LoadError> {
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let required = |name: &str| {
            optional(name).ok_or_else(|| LoadError::MissingFile {
                dir: dir.to_path_buf(),
                file: name.to_string(),
            })
        };
        let config = required("config.json")?;
        let weights = weight_files(dir)?;
        let tokenizer = required("tokenizer.json")?;
        let tokenizer_config = optional("tokenizer_config.json");
        let chat_template = if let Some(p) = optional("chat_template.jinja") {
            Some(ChatTemplateFile::Jinja(p))
        } else if let Some(p) = optional("chat_template.json") {
            Some(ChatTemplateFile::Json(p))
        } else {
            (tokenizer_config.clone())
                .filter(|p| has_chat_template(p))
                .map(ChatTemplateFile::TokenizerConfig)
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
            tokenizer_config,
            chat_template,
            preprocessor_config: optional("preprocessor_config.json"),
            processor_config: optional("processor_config.json"),
            generation_config: optional("generation_config.json"),
        })
    }

    /// The chat template, which a chat model must have.
    pub fn require_chat_template(&self) -> Result<&ChatTemplateFile, LoadError> {
        self.chat_template.as_ref().ok_or_else(|| LoadError::MissingFile {
            dir: self.dir.clone(),
            file: "chat template (chat_template.jinja, chat_template.json or tokenizer_config.json's chat_template)"
                .into(),
        })
    }
}

fn has_chat_template(tokenizer_config: &Path) -> bool {
    read_json::<serde_json::Value>(tokenizer_config)
        .map(|v| v.get("chat_template").is_some_and(|t| !t.is_null()))
        .unwrap_or(false)
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(LoadError::MissingFile {
            dir: dir.to_path_buf(),
            file: "model.safetensors (or model.safetensors.index.json)".into(),
        });
    }
    let shards = shard_names(&index)?;
    shards
        .into_iter()
        .map(|shard| {
            let path = dir.join(&shard);
            if path.is_file() {
                Ok(path)
            } else {
                Err(LoadError::Invalid {
                    file: index.clone(),
                    field: "weight_map".into(),
                    message: format!("names shard {shard}, which is not in the folder"),
                })
            }
        })
        .collect()
}

/// The shard files `model.safetensors.index.json` names, each once.
pub fn shard_names(index: &Path) -> Result<BTreeSet<String>, LoadError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::HashMap<String, String>,
    }
    Ok(read_json::<Index>(index)?.weight_map.into_values().collect())
}

/// Reads and parses a JSON file; a parse error names the file and the path of the field
/// (`text_config.hidden_size`), or `(syntax)` with line and column for malformed JSON.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let field = err.path().to_string();
        let inner = err.into_inner();
        let field = if inner.is_syntax() || inner.is_eof() {
            "(syntax)".to_string()
        } else {
            field
        };
        LoadError::Json {
            file: path.to_path_buf(),
            field,
            message: inner.to_string(),
        }
    })
}
