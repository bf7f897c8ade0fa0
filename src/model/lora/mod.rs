//! LoRA adapters (Hu et al., arXiv:2106.09685) in PEFT's format, served beside the base
//! weights rather than merged into them, so that one batch can mix sequences of several
//! adapters and of the base model (per-sequence adapters, as S-LoRA and Punica serve them).
//!
//! A model describes its linear layers as slots (`AdapterLayout`); a slot may compute
//! several of PEFT's modules side by side, as SmolVLM's stacked q/k/v do. An adapter is
//! loaded into one low-rank pair per slot, `xs · Aᵀ · Bᵀ` with the modules' `A`s stacked
//! and their `B`s block-diagonal (zero for a module the adapter leaves alone), the scale
//! folded into `B`: one pair of small matmuls per slot, whichever modules it targets.

mod batch;
mod config;
mod registry;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Module, Tensor};

use super::ContentKey;
use super::ops::proj::Proj;

pub use batch::LoraBatch;
pub use config::LoraConfig;
pub use registry::{AdapterLimits, AdapterRegistry, Loaded, RegistryError};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT saves a module's weights as `base_model.model.{module}.lora_A.weight`.
const PREFIX: &str = "base_model.model.";

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{file}: {message}")]
    Config { file: PathBuf, message: String },
    #[error("{file}: unsupported adapter option {feature}")]
    Unsupported { file: PathBuf, feature: String },
    #[error("{file}: {message}")]
    Weights { file: PathBuf, message: String },
    #[error("{file}: tensor `{tensor}`: {message}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{file}: module `{module}` is not one an adapter can change here; {supported}")]
    UnknownModule {
        file: PathBuf,
        module: String,
        supported: String,
    },
    #[error("{file}: module `{module}` has rank {rank}, over the limit of {limit} (--max-lora-rank)")]
    RankLimit {
        file: PathBuf,
        module: String,
        rank: usize,
        limit: usize,
    },
}

/// The linear layers of a model an adapter may change. `slots[i]` lists the PEFT modules
/// computed side by side by slot `i`, in output order, with their input and output widths.
#[derive(Debug, Clone)]
pub struct AdapterLayout {
    pub slots: Vec<Vec<ModuleSpec>>,
    /// Slots from this one on feed the image features (the vision tower, the connector):
    /// an adapter changing any of them encodes images its own way.
    pub first_vision_slot: usize,
    /// Said when an adapter names a module outside the layout.
    pub supported: String,
}

impl AdapterLayout {
    /// A text model's layout, with `vision` (the vision tower's and connector's slots)
    /// after its own; the text slots keep their numbers.
    pub fn with_vision(mut self, vision: Vec<Vec<ModuleSpec>>, supported: &str) -> Self {
        self.first_vision_slot = self.slots.len();
        self.slots.extend(vision);
        self.supported = supported.to_string();
        self
    }
}

#[derive(Debug, Clone)]
pub struct ModuleSpec {
    /// As PEFT names it: the module's path in the transformers model.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// A loaded adapter: one low-rank pair per slot it changes.
pub struct Adapter {
    id: u64,
    name: String,
    rank: usize,
    modules: usize,
    slots: Vec<Option<SlotDelta>>,
    /// Whether it changes a vision slot: its image features are its own.
    changes_vision: bool,
}

/// `delta = b(a(xs))`: `a` `[ranks, in]` (the modules' A stacked), `b` `[out, ranks]`
/// (their B block-diagonal, scales folded in), as linear layers: on a decode step's few rows
/// they take `Proj`'s few-row kernels, where gemm's per-call cost was most of the delta
/// (decode at batch 8 on the tiny fixture, one adapter for all rows: 1.73 ms a step through
/// gemm, 0.51 ms so, 0.36 ms without adapters; four adapters: 5.68 ms, then 0.72 ms).
struct SlotDelta {
    a: Proj,
    b: Proj,
}

/// Ids tell adapters apart in the prefix cache and in batches; a reloaded adapter of the
/// same name gets a new one, so nothing cached under the old weights is reused.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Adapter {
    /// Loads the PEFT adapter folder `dir` for a model of `layout`, in `dtype` on `device`.
    pub fn load(
        name: &str,
        dir: &Path,
        layout: &AdapterLayout,
        max_rank: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, AdapterError> {
        let config = LoraConfig::load(&dir.join(CONFIG_FILE))?;
        let file = weights_file(dir)?;
        let weights = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| AdapterError::Weights {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let pairs = pair_up(&file, weights)?;
        let mut found: Vec<Vec<Option<(Tensor, Tensor)>>> = layout.slots.iter().map(|s| vec![None; s.len()]).collect();
        let (mut rank, modules) = (0, pairs.len());
        for (module, a, b) in pairs {
            let Some((slot, part)) = locate(layout, &module) else {
                return Err(AdapterError::UnknownModule {
                    file,
                    module,
                    supported: layout.supported.clone(),
                });
            };
            let spec = &layout.slots[slot][part];
            let tensor_error = |tensor: &str, message: String| AdapterError::Tensor {
                file: file.clone(),
                tensor: format!("{PREFIX}{module}.{tensor}.weight"),
                message,
            };
            let (r, in_features) = a.dims2().map_err(|e| tensor_error("lora_A", e.to_string()))?;
            let expected = config.rank(&module);
            if (r, in_features) != (expected, spec.in_features) {
                let message = format!(
                    "shape [{r}, {in_features}], expected [{expected}, {}]",
                    spec.in_features
                );
                return Err(tensor_error("lora_A", message));
            }
            if b.dims() != [spec.out_features, r] {
                let message = format!("shape {:?}, expected [{}, {r}]", b.dims(), spec.out_features);
                return Err(tensor_error("lora_B", message));
            }
            if r > max_rank {
                return Err(AdapterError::RankLimit {
                    file,
                    module,
                    rank: r,
                    limit: max_rank,
                });
            }
            rank = rank.max(r);
            let scale = config.scale(&module, r);
            let b =
                (b.to_dtype(DType::F64).and_then(|b| b * scale)).map_err(|e| tensor_error("lora_B", e.to_string()))?;
            found[slot][part] = Some((a, b));
        }
        let slots: Vec<Option<SlotDelta>> = (found.into_iter().zip(&layout.slots))
            .map(|(parts, specs)| slot_delta(parts, specs, dtype, device))
            .collect::<candle_core::Result<_>>()
            .map_err(|e| AdapterError::Weights {
                file: file.clone(),
                message: e.to_string(),
            })?;
        let changes_vision = (found_slots(&slots)).any(|slot| slot >= layout.first_vision_slot);
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            rank,
            modules,
            slots,
            changes_vision,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The largest rank among its modules.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many of PEFT's modules it changes.
    pub fn modules(&self) -> usize {
        self.modules
    }

    /// Whether it changes the vision tower or the connector, so that an image's features
    /// under it differ from the base model's.
    pub fn changes_vision(&self) -> bool {
        self.changes_vision
    }

    /// The key an image's features are cached (and its KV blocks hashed) under for sequences
    /// of this adapter: the content's own where the adapter leaves vision alone (the base
    /// model's features serve), else one of its own, so that no two adapters, nor an adapter
    /// and the base, share an encoding.
    pub fn image_key(&self, content: ContentKey) -> ContentKey {
        if !self.changes_vision {
            return content;
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ocellus lora vision");
        hasher.update(&content);
        hasher.update(&self.id.to_le_bytes());
        *hasher.finalize().as_bytes()
    }

    /// What it adds to slot `slot`'s output for inputs `xs`, if it changes that slot.
    fn delta(&self, slot: usize, xs: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self.slots.get(slot) {
            Some(Some(d)) => Ok(Some(d.b.forward(&d.a.forward(xs)?)?)),
            _ => Ok(None),
        }
    }
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (f.debug_struct("Adapter")
            .field("id", &self.id)
            .field("name", &self.name))
        .field("rank", &self.rank)
        .finish_non_exhaustive()
    }
}

/// The folder's safetensors file; pickled weights are refused by name.
fn weights_file(dir: &Path) -> Result<PathBuf, AdapterError> {
    let file = dir.join(WEIGHTS_FILE);
    if !file.exists() && dir.join("adapter_model.bin").exists() {
        return Err(AdapterError::Unsupported {
            file: dir.join("adapter_model.bin"),
            feature: "pickled weights (save with safe_serialization=True)".into(),
        });
    }
    Ok(file)
}

/// The file's tensors as `(module, A, B)`, refusing any tensor that is not a LoRA pair.
fn pair_up(
    file: &Path,
    weights: std::collections::HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor, Tensor)>, AdapterError> {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut pairs = Vec::new();
    for name in names {
        let unexpected = |message: &str| AdapterError::Tensor {
            file: file.to_path_buf(),
            tensor: name.clone(),
            message: message.into(),
        };
        let Some(module) = name.strip_prefix(PREFIX) else {
            return Err(unexpected("not under `base_model.model.`, as PEFT saves LoRA weights"));
        };
        if module.ends_with(".lora_B.weight") {
            continue;
        }
        let Some(module) = module.strip_suffix(".lora_A.weight") else {
            return Err(unexpected("not a LoRA `lora_A` / `lora_B` weight"));
        };
        let b_name = format!("{PREFIX}{module}.lora_B.weight");
        let Some(b) = weights.get(&b_name) else {
            return Err(unexpected(&format!("has no `{b_name}`")));
        };
        pairs.push((module.to_string(), weights[name].clone(), b.clone()));
    }
    for name in weights.keys().filter(|n| n.ends_with(".lora_B.weight")) {
        let a_name = name.replace(".lora_B.weight", ".lora_A.weight");
        if !weights.contains_key(&a_name) {
            return Err(AdapterError::Tensor {
                file: file.to_path_buf(),
                tensor: name.clone(),
                message: format!("has no `{a_name}`"),
            });
        }
    }
    Ok(pairs)
}

/// The indices of the slots an adapter changes.
fn found_slots(slots: &[Option<SlotDelta>]) -> impl Iterator<Item = usize> + '_ {
    (slots.iter().enumerate()).filter_map(|(i, s)| s.as_ref().map(|_| i))
}

fn locate(layout: &AdapterLayout, module: &str) -> Option<(usize, usize)> {
    (layout.slots.iter().enumerate())
        .find_map(|(slot, parts)| parts.iter().position(|p| p.name == module).map(|part| (slot, part)))
}

/// One slot's stacked `a` and block-diagonal `b` from the pairs of the modules it targets.
fn slot_delta(
    parts: Vec<Option<(Tensor, Tensor)>>,
    specs: &[ModuleSpec],
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Option<SlotDelta>> {
    if parts.iter().all(Option::is_none) {
        return Ok(None);
    }
    let ranks: usize = parts.iter().flatten().map(|(a, _)| a.dim(0).unwrap_or(0)).sum();
    let mut a_rows = Vec::new();
    let mut b_columns = Vec::new();
    let mut rank_offset = 0;
    for (part, spec) in parts.iter().zip(specs) {
        let Some((a, b)) = part else {
            b_columns.push(Tensor::zeros((ranks, spec.out_features), DType::F64, &Device::Cpu)?);
            continue;
        };
        let r = a.dim(0)?;
        a_rows.push(a.to_dtype(DType::F64)?);
        // This module's outputs read only its own ranks.
        let bt = b.t()?;
        let column = bt.pad_with_zeros(0, rank_offset, ranks - rank_offset - r)?;
        b_columns.push(column);
        rank_offset += r;
    }
    let a = Tensor::cat(&a_rows, 0)?;
    let b = Tensor::cat(&b_columns, 1)?.t()?;
    let place = |t: Tensor| -> candle_core::Result<Proj> {
        let weight = t.to_dtype(dtype)?.to_device(device)?.contiguous()?;
        Ok(Proj::Dense(candle_nn::Linear::new(weight, None)))
    };
    Ok(Some(SlotDelta {
        a: place(a)?,
        b: place(b)?,
    }))
}
