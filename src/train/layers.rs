//! What the training forms of the decoder (`text`) and the vision encoder (`vision`) share:
//! their linear layers (a trained or frozen weight, an optional bias, an optional LoRA pair
//! in PEFT's layout and scaling) and the builder that makes their weights trainable or not
//! as the method says, naming each trainable tensor as it is saved.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::frozen::Frozen;
use super::text::{LoraSpec, Method};
use crate::model::smolvlm::connector;

/// A trainable tensor and the name it is saved under.
pub struct Trainable {
    pub name: String,
    pub var: Var,
}

/// A linear layer's weight: trained (a variable's tensor, `--method full`) or frozen.
pub(super) enum Weight {
    Trained(Tensor),
    Frozen(Frozen),
}

pub(super) struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraPair>,
}

pub(super) struct LoraPair {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

/// Builds trainable tensors while a model is assembled, recording their names in order.
pub struct Builder<'a> {
    method: &'a Method,
    rng: ChaCha8Rng,
    trainables: Vec<Trainable>,
    /// QLoRA: frozen matrices in Q8_0 blocks (the text model's; the vision encoder's stay f32).
    quantize: bool,
}

impl<'a> Builder<'a> {
    /// `seed` draws the LoRA pairs' initial `A`s, in the order the model asks for them.
    pub fn new(method: &'a Method, seed: u64) -> Self {
        Self {
            method,
            rng: ChaCha8Rng::seed_from_u64(seed),
            trainables: Vec::new(),
            quantize: false,
        }
    }

    /// What trains, in the order it was built.
    pub fn into_trainables(self) -> Vec<Trainable> {
        self.trainables
    }

    /// Frozen matrices built from now on are quantized as the method says (on) or kept f32.
    pub(super) fn quantize_frozen(&mut self, on: bool) {
        self.quantize = on && matches!(self.method, Method::Lora(spec) if spec.quantize_base);
    }

    pub(super) fn method(&self) -> &Method {
        self.method
    }

    /// A full-method weight becomes a variable; otherwise it stays a constant.
    pub(super) fn weight(&mut self, name: String, tensor: Tensor) -> Result<Tensor> {
        if !matches!(self.method, Method::Full) {
            return Ok(tensor);
        }
        let var = Var::from_tensor(&tensor)?;
        let t = var.as_tensor().clone();
        self.trainables.push(Trainable { name, var });
        Ok(t)
    }

    /// A matrix: a variable under the full method, else frozen (in Q8_0 blocks under QLoRA).
    pub(super) fn matrix(&mut self, name: String, tensor: Tensor) -> Result<Weight> {
        match self.method {
            Method::Full => Ok(Weight::Trained(self.weight(name, tensor)?)),
            Method::Lora(_) => Ok(Weight::Frozen(Frozen::new(tensor, self.quantize)?)),
        }
    }

    /// `module`: PEFT's name for it (`model.text_model.layers.0.self_attn.q_proj`), `shape`
    /// `[out, in]`.
    pub(super) fn linear(
        &mut self,
        module: &str,
        vb: &VarBuilder,
        shape: (usize, usize),
        bias: bool,
    ) -> Result<Linear> {
        let out = shape.0;
        let weight = self.matrix(format!("{module}.weight"), vb.get(shape, &format!("{module}.weight"))?)?;
        let bias = if bias {
            Some(self.weight(format!("{module}.bias"), vb.get(out, &format!("{module}.bias"))?)?)
        } else {
            None
        };
        let lora = self.lora_pair(module, shape, vb.device())?;
        Ok(Linear { weight, bias, lora })
    }

    /// A fresh LoRA pair for `module` (`[out, in]`) if the method targets it.
    pub(super) fn lora_pair(
        &mut self,
        module: &str,
        (out, inp): (usize, usize),
        device: &Device,
    ) -> Result<Option<LoraPair>> {
        let Method::Lora(spec) = self.method else {
            return Ok(None);
        };
        if !targeted(spec, module) {
            return Ok(None);
        }
        // PEFT's initialisation: A ~ kaiming_uniform(a = sqrt 5), i.e. U(±1/sqrt(in)); B = 0,
        // so training starts from the base model exactly.
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..spec.rank * inp)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inp), device)?)?;
        let b = Var::zeros((out, spec.rank), DType::F32, device)?;
        let pair = LoraPair {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: spec.scale(),
        };
        let prefix = format!("base_model.model.{module}");
        self.trainables.push(Trainable {
            name: format!("{prefix}.lora_A.weight"),
            var: a,
        });
        self.trainables.push(Trainable {
            name: format!("{prefix}.lora_B.weight"),
            var: b,
        });
        Ok(Some(pair))
    }
}

/// The name `--lora-target-modules` gives a module: a text projection by its last name
/// (`q_proj`, `lm_head`), a vision encoder projection as `vision.` and its last name
/// (`vision.q_proj`, `vision.fc1`), the connector's projection as `connector`.
pub fn target_name(module: &str) -> String {
    let last = module.rsplit('.').next().unwrap_or(module);
    if module == connector::MODULE {
        "connector".into()
    } else if module.starts_with("model.vision_model.") {
        format!("vision.{last}")
    } else {
        last.into()
    }
}

/// Whether `--lora-target-modules` names `module`.
pub fn targeted(spec: &LoraSpec, module: &str) -> bool {
    spec.targets.contains(&target_name(module))
}

/// Whether the targets reach the vision encoder or the connector (the image features then
/// train, and are computed at every step).
pub fn targets_vision(spec: &LoraSpec) -> bool {
    (spec.targets.iter()).any(|t| t.starts_with("vision.") || t == "connector")
}

impl Linear {
    /// `xs · Wᵀ + b` for `xs` `[rows, in]`, plus PEFT's `scale · B(A(dropout(xs)))` where a
    /// LoRA pair sits (dropout at rate `p` when `rng` is given).
    pub fn forward(&self, xs: &Tensor, p: f32, rng: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let mut ys = match &self.weight {
            Weight::Trained(weight) => xs.matmul(&weight.t()?)?,
            Weight::Frozen(weight) => weight.linear(xs)?,
        };
        if let Some(bias) = &self.bias {
            ys = ys.broadcast_add(bias)?;
        }
        if let Some(lora) = &self.lora {
            let dropped = match rng {
                Some(rng) if p > 0.0 => drop(xs, p, rng)?,
                _ => xs.clone(),
            };
            let delta = dropped.matmul(&lora.a.t()?)?.matmul(&lora.b.t()?)?;
            ys = (ys + (delta * lora.scale)?)?;
        }
        Ok(ys)
    }
}

impl Weight {
    /// The same weight again (the tied head is the embedding).
    pub fn shared(&self) -> Weight {
        match self {
            Weight::Trained(t) => Weight::Trained(t.clone()),
            Weight::Frozen(f) => Weight::Frozen(f.clone()),
        }
    }

    /// Rows `ids` of the matrix (the embedding lookup).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Trained(t) => t.index_select(ids, 0),
            Weight::Frozen(f) => f.dense()?.index_select(ids, 0),
        }
    }
}

/// Inverted dropout with a seeded mask (candle's own draws from an unseeded generator).
fn drop(xs: &Tensor, p: f32, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..xs.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    xs * Tensor::from_vec(mask, xs.shape(), xs.device())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_text_projections_plainly_and_vision_ones_by_tower() {
        let name = |m: &str| target_name(m);
        assert_eq!(name("model.text_model.layers.3.self_attn.q_proj"), "q_proj");
        assert_eq!(name("lm_head"), "lm_head");
        assert_eq!(
            name("model.vision_model.encoder.layers.0.self_attn.q_proj"),
            "vision.q_proj"
        );
        assert_eq!(name("model.vision_model.encoder.layers.1.mlp.fc2"), "vision.fc2");
        assert_eq!(name("model.connector.modality_projection.proj"), "connector");
    }
}
