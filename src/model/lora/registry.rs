//! The adapters a server holds, by name: loaded at startup (`--lora NAME=DIR`) or at
//! runtime (`/v1/load_lora_adapter`), looked up per request by its `model`. A request holds
//! its adapter by `Arc`, so unloading one lets the requests already using it finish.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device};

use super::{Adapter, AdapterError, AdapterLayout};

/// `--max-loras` and `--max-lora-rank`.
#[derive(Debug, Clone, Copy)]
pub struct AdapterLimits {
    pub max_loras: usize,
    pub max_rank: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Load(#[from] AdapterError),
    #[error("an adapter named `{name}` is already loaded")]
    Exists { name: String },
    #[error("`{name}` is the base model's name; an adapter needs another")]
    BaseName { name: String },
    #[error("adapter names must be 1 to 128 characters, none of them whitespace: `{name}`")]
    BadName { name: String },
    #[error("{max} adapters are loaded already, the limit (--max-loras); unload one first")]
    Full { max: usize },
    #[error("no adapter named `{name}` is loaded")]
    NotFound { name: String },
}

pub struct AdapterRegistry {
    base_name: String,
    layout: AdapterLayout,
    dtype: DType,
    device: Device,
    limits: AdapterLimits,
    loaded: RwLock<Vec<Loaded>>,
}

/// An adapter and the folder it came from.
#[derive(Clone)]
pub struct Loaded {
    pub adapter: Arc<Adapter>,
    pub path: PathBuf,
}

impl AdapterRegistry {
    pub fn new(base_name: &str, layout: AdapterLayout, dtype: DType, device: Device, limits: AdapterLimits) -> Self {
        Self {
            base_name: base_name.to_string(),
            layout,
            dtype,
            device,
            limits,
            loaded: RwLock::new(Vec::new()),
        }
    }

    /// Reads the adapter folder `dir` and serves it as `name`. Takes as long as reading the
    /// weights: call it off the async workers.
    pub fn load(&self, name: &str, dir: &Path) -> Result<Arc<Adapter>, RegistryError> {
        self.check_room(&self.list(), name)?;
        let adapter = Adapter::load(name, dir, &self.layout, self.limits.max_rank, self.dtype, &self.device)?;
        let adapter = Arc::new(adapter);
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        // Checked again: another load of the same name may have finished meanwhile.
        self.check_room(&loaded, name)?;
        loaded.push(Loaded {
            adapter: adapter.clone(),
            path: dir.to_path_buf(),
        });
        Ok(adapter)
    }

    pub fn unload(&self, name: &str) -> Result<(), RegistryError> {
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        let before = loaded.len();
        loaded.retain(|l| l.adapter.name() != name);
        if loaded.len() == before {
            return Err(RegistryError::NotFound { name: name.to_string() });
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Adapter>> {
        let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
        loaded
            .iter()
            .find(|l| l.adapter.name() == name)
            .map(|l| l.adapter.clone())
    }

    /// In the order they were loaded.
    pub fn list(&self) -> Vec<Loaded> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn check_room(&self, loaded: &[Loaded], name: &str) -> Result<(), RegistryError> {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_whitespace) {
            return Err(RegistryError::BadName { name: name.to_string() });
        }
        if name == self.base_name {
            return Err(RegistryError::BaseName { name: name.to_string() });
        }
        if loaded.iter().any(|l| l.adapter.name() == name) {
            return Err(RegistryError::Exists { name: name.to_string() });
        }
        if loaded.len() >= self.limits.max_loras {
            return Err(RegistryError::Full {
                max: self.limits.max_loras,
            });
        }
        Ok(())
    }
}
