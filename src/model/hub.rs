//! Model ids (`HuggingFaceTB/SmolVLM-256M-Instruct`) resolved through the local Hugging
//! Face cache, in the layout the Python libraries share, and downloaded with `hf-hub`
//! where a network exists.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo};

use super::error::LoadError;

/// Files worth fetching besides the weights; all but config.json may be absent upstream.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
];

/// The hub cache folder, as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub,
/// else ~/.cache/huggingface/hub.
pub fn cache_dir_from_env() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether downloads are allowed (huggingface_hub's HF_HUB_OFFLINE convention).
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A local folder as given, a built-in demo model (`demo`, unpacked on first use), or the
/// snapshot folder of a hub id in `cache_dir`, downloading it first when it is not cached
/// and `offline` is false.
pub fn resolve_model(model: &str, cache_dir: &Path, offline: bool) -> Result<PathBuf, LoadError> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let demo_cache = super::demo::cache_dir_from_env();
    let unpacked = super::demo::unpack(model, &demo_cache).map_err(|source| LoadError::Io {
        file: demo_cache.clone(),
        source,
    })?;
    if let Some(dir) = unpacked {
        return Ok(dir);
    }
    if !looks_like_hub_id(model) {
        return Err(LoadError::NotAModel {
            model: model.to_string(),
        });
    }
    let cache = Cache::new(cache_dir.to_path_buf());
    if let Some(config) = cache.repo(Repo::model(model.to_string())).get("config.json") {
        return Ok(snapshot_dir(&config));
    }
    if offline {
        return Err(LoadError::Hub {
            model: model.to_string(),
            message: format!("not in the cache at {} and HF_HUB_OFFLINE is set", cache_dir.display()),
        });
    }
    download(model, cache)
}

pub(crate) fn looks_like_hub_id(model: &str) -> bool {
    let mut parts = model.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    valid(owner) && valid(name)
}

fn snapshot_dir(file_in_snapshot: &Path) -> PathBuf {
    file_in_snapshot
        .parent()
        .expect("a cached file lies in a snapshot folder. This is a bug.")
        .to_path_buf()
}

fn download(model: &str, cache: Cache) -> Result<PathBuf, LoadError> {
    let hub_error = |message: String| LoadError::Hub {
        model: model.to_string(),
        message,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(e.to_string()))?;
    let repo = api.model(model.to_string());
    let config = repo
        .get("config.json")
        .map_err(|e| hub_error(format!("config.json: {e}")))?;
    for file in &MODEL_FILES[1..] {
        // Optional files: a folder lacks some of them, and ModelFiles says which it needs.
        let _ = repo.get(file);
    }
    if repo.get("model.safetensors").is_err() {
        let index = repo
            .get("model.safetensors.index.json")
            .map_err(|e| hub_error(format!("neither model.safetensors nor its index: {e}")))?;
        let shards = super::files::shard_names(&index)?;
        for shard in shards {
            repo.get(&shard).map_err(|e| hub_error(format!("{shard}: {e}")))?;
        }
    }
    Ok(snapshot_dir(&config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_owner_slash_name() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolVLM-256M-Instruct"));
        assert!(!looks_like_hub_id("SmolVLM"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("owner/name with space"));
    }
}
