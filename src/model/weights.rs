//! Safetensors weights, one file or many shards, behind candle's `VarBuilder`. Unlike
//! candle's own backend it remembers which file holds each tensor, so a missing tensor or
//! a wrong shape names the file as well as the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::error::LoadError;

pub struct SafetensorsWeights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`
    routing: HashMap<String, usize>,
}

impl SafetensorsWeights {
    pub fn open(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the
            // model files not being truncated while the server runs.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| LoadError::Weights {
                file: path.clone(),
                message: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path.clone(), st));
        }
        Ok(Self { files, routing })
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn locate(&self, name: &str) -> candle_core::Result<(&Path, &MmapedSafetensors)> {
        match self.routing.get(name) {
            Some(&i) => Ok((self.files[i].0.as_path(), &self.files[i].1)),
            None => {
                let files: Vec<String> = self.files.iter().map(|(p, _)| p.display().to_string()).collect();
                candle_core::bail!("{}: tensor `{name}` is missing", files.join(", "))
            }
        }
    }
}

impl SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        expected: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (file, st) = self.locate(name)?;
        let view = st.get(name)?;
        if view.shape() != expected.dims() {
            candle_core::bail!(
                "{}: tensor `{name}` has shape {:?}, the config implies {:?}",
                file.display(),
                view.shape(),
                expected.dims()
            )
        }
        st.load(name, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (_, st) = self.locate(name)?;
        st.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

/// A `VarBuilder` whose every weight is random (normal, std 0.5), whatever its name and
/// shape: for tests of a forward pass's structure, not of its values.
#[cfg(test)]
pub(crate) fn random_var_builder() -> VarBuilder<'static> {
    use candle_nn::Init;

    struct Random;

    impl SimpleBackend for Random {
        fn get(&self, shape: Shape, _: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
            Tensor::randn(0f32, 0.5, shape, dev)?.to_dtype(dtype)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("{name}: no shape")
        }

        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }

    VarBuilder::from_backend(Box::new(Random), DType::F32, Device::Cpu)
}
