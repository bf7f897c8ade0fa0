//! The architecture registry: `config.json`'s `architectures[0]` names the family that loads
//! a folder. A family is a folder under `model/` and one line in `FAMILIES`.

use candle_core::{DType, Device};

use super::files::read_json;
use super::{InputProcessor, LoadError, ModelFiles, VisionLanguageModel, qwen3vl, smolvlm};

/// Loads a family's weights from a located folder, in a dtype, onto a device.
pub type LoadModel = fn(&ModelFiles, DType, &Device) -> Result<Box<dyn VisionLanguageModel>, LoadError>;

/// How a family is recognised and loaded.
pub struct Family {
    /// The `architectures` names transformers writes for it.
    pub architectures: &'static [&'static str],
    pub load: LoadModel,
    pub input_processor: fn(&ModelFiles) -> Result<Box<dyn InputProcessor>, LoadError>,
}

const FAMILIES: &[Family] = &[
    smolvlm::SMOLVLM,
    smolvlm::SMOLVLM2,
    qwen3vl::QWEN3_VL,
    qwen3vl::QWEN3_VL_MOE,
];

/// The family of a located folder.
pub fn family(files: &ModelFiles) -> Result<&'static Family, LoadError> {
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
    FAMILIES
        .iter()
        .find(|f| f.architectures.contains(&name.as_str()))
        .ok_or_else(|| LoadError::UnknownArchitecture {
            file: files.config.clone(),
            name: name.clone(),
            supported: FAMILIES
                .iter()
                .flat_map(|f| f.architectures)
                .copied()
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Loads the weights of a located folder, in `dtype` on `device`.
pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Box<dyn VisionLanguageModel>, LoadError> {
    (family(files)?.load)(files, dtype, device)
}

/// The family's input processor for a located folder.
pub fn load_input_processor(files: &ModelFiles) -> Result<Box<dyn InputProcessor>, LoadError> {
    (family(files)?.input_processor)(files)
}
