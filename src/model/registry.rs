//! The architecture registry: `config.json`'s `architectures[0]` names the family that loads
//! a folder. A family is a folder under `model/` and one line in `FAMILIES`.

use candle_core::{DType, Device};

use super::embedding::{EmbeddingInputs, EmbeddingModel};
use super::files::read_json;
use super::{InputProcessor, LoadError, ModelFiles, VisionLanguageModel, blip, clip, qwen3vl, siglip, smolvlm};

/// Loads a family's weights from a located folder, in a dtype, onto a device.
pub type LoadModel = fn(&ModelFiles, DType, &Device) -> Result<Box<dyn VisionLanguageModel>, LoadError>;

/// How a family is recognised and loaded.
pub struct Family {
    /// The `architectures` names transformers writes for it.
    pub architectures: &'static [&'static str],
    pub load: LoadModel,
    pub input_processor: fn(&ModelFiles) -> Result<Box<dyn InputProcessor>, LoadError>,
}

/// Loads a contrastive family's weights from a located folder.
pub type LoadEmbedding = fn(&ModelFiles, DType, &Device) -> Result<Box<dyn EmbeddingModel>, LoadError>;

/// How a contrastive family is recognised and loaded.
pub struct EmbeddingFamily {
    pub architectures: &'static [&'static str],
    pub load: LoadEmbedding,
    pub inputs: fn(&ModelFiles) -> Result<Box<dyn EmbeddingInputs>, LoadError>,
}

const FAMILIES: &[Family] = &[
    smolvlm::SMOLVLM,
    smolvlm::SMOLVLM2,
    qwen3vl::QWEN3_VL,
    qwen3vl::QWEN3_VL_MOE,
];

const EMBEDDING_FAMILIES: &[EmbeddingFamily] = &[clip::CLIP, siglip::SIGLIP, blip::BLIP_RETRIEVAL];

/// What a model folder's architecture does.
pub enum Task {
    /// Chat and completions (`VisionLanguageModel`).
    Generate(&'static Family),
    /// Embeddings and scores (`EmbeddingModel`).
    Embed(&'static EmbeddingFamily),
}

/// The task and family of a located folder.
pub fn task(files: &ModelFiles) -> Result<Task, LoadError> {
    #[derive(serde::Deserialize)]
    struct Architectures {
        #[serde(default)]
        architectures: Option<Vec<String>>,
    }
    let listed = read_json::<Architectures>(&files.config)?
        .architectures
        .unwrap_or_default();
    let Some(name) = listed.first() else {
        return Err(LoadError::invalid(
            &files.config,
            "architectures",
            "is missing or empty",
        ));
    };
    let name = name.as_str();
    if let Some(family) = FAMILIES.iter().find(|f| f.architectures.contains(&name)) {
        return Ok(Task::Generate(family));
    }
    if let Some(family) = EMBEDDING_FAMILIES.iter().find(|f| f.architectures.contains(&name)) {
        return Ok(Task::Embed(family));
    }
    let supported = (FAMILIES.iter().flat_map(|f| f.architectures))
        .chain(EMBEDDING_FAMILIES.iter().flat_map(|f| f.architectures))
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    Err(LoadError::UnknownArchitecture {
        file: files.config.clone(),
        name: name.to_string(),
        supported,
    })
}

/// The generative family of a located folder; a contrastive model is an error here.
pub fn family(files: &ModelFiles) -> Result<&'static Family, LoadError> {
    match task(files)? {
        Task::Generate(family) => Ok(family),
        Task::Embed(_) => Err(LoadError::invalid(
            &files.config,
            "architectures",
            "names an embedding model, which does not chat or generate",
        )),
    }
}

/// The contrastive family of a located folder; a generative model is an error here.
pub fn embedding_family(files: &ModelFiles) -> Result<&'static EmbeddingFamily, LoadError> {
    match task(files)? {
        Task::Embed(family) => Ok(family),
        Task::Generate(_) => Err(LoadError::invalid(
            &files.config,
            "architectures",
            "names a generative model, which does not embed",
        )),
    }
}

/// Loads the weights of a located folder, in `dtype` on `device`.
pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Box<dyn VisionLanguageModel>, LoadError> {
    (family(files)?.load)(files, dtype, device)
}

/// The family's input processor for a located folder.
pub fn load_input_processor(files: &ModelFiles) -> Result<Box<dyn InputProcessor>, LoadError> {
    (family(files)?.input_processor)(files)
}
