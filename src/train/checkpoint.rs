//! Gradient checkpointing (`--gradient-checkpointing`), shared by the decoder and the vision
//! encoder: a forward over a stack of layers that keeps each layer's input only (detaching
//! each output drops the graph, and the activations, of the layer that made it), and the
//! backward pass that runs each layer again from its input, last first. Each layer's
//! dropout has its own seed, so a layer run again draws the same masks and a run is the same
//! with checkpointing or without.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One layer of the stack: `layer(index, xs, dropout)`.
pub trait Layers {
    fn count(&self) -> usize;
    fn run(&self, index: usize, xs: &Tensor, dropout: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor>;
}

/// What a checkpointed training forward kept: each layer's input (detached) and dropout
/// seed; `output` is the last layer's output as a leaf whose gradient the loss's backward
/// gives, `embedded` the first layer's input still attached to what made it.
pub struct Checkpoints {
    inputs: Vec<Tensor>,
    seeds: Vec<u64>,
    output: Var,
    embedded: Tensor,
}

/// The layers over `embedded`, each with dropout from its own seed (drawn from `dropout`;
/// none to evaluate). Under `checkpoint`, only the layers' inputs stay alive, and a training
/// forward returns them with the output leaf.
pub fn forward(
    layers: &impl Layers,
    embedded: Tensor,
    dropout: &mut Option<&mut ChaCha8Rng>,
    checkpoint: bool,
) -> Result<(Tensor, Option<Checkpoints>)> {
    let seeds: Vec<u64> = match dropout {
        Some(rng) => (0..layers.count()).map(|_| rng.random()).collect(),
        None => Vec::new(),
    };
    let run = |index: usize, xs: &Tensor| -> Result<Tensor> {
        let mut rng = seeds.get(index).map(|&seed| ChaCha8Rng::seed_from_u64(seed));
        layers.run(index, xs, &mut rng.as_mut())
    };
    if !checkpoint {
        let mut xs = embedded;
        for index in 0..layers.count() {
            xs = run(index, &xs)?;
        }
        return Ok((xs, None));
    }
    let mut inputs = Vec::with_capacity(layers.count());
    let mut xs = embedded.detach();
    for index in 0..layers.count() {
        let next = run(index, &xs)?.detach();
        inputs.push(xs);
        xs = next;
    }
    if seeds.is_empty() {
        return Ok((xs, None));
    }
    let output = Var::from_tensor(&xs)?;
    let leaf = output.as_tensor().clone();
    let kept = Checkpoints {
        inputs,
        seeds,
        output,
        embedded,
    };
    Ok((leaf, Some(kept)))
}

impl Checkpoints {
    /// The leaf standing for the last layer's output in the loss's graph.
    pub fn output(&self) -> &Tensor {
        self.output.as_tensor()
    }

    /// The backward pass through the layers, given the gradient of their output: each layer
    /// runs again from its saved input (last first) and back-propagates the gradient it
    /// receives; `sink` gets each part's gradients, down to what made the first input.
    pub fn backward(
        self,
        layers: &impl Layers,
        grad: &Tensor,
        mut sink: impl FnMut(&GradStore) -> Result<()>,
    ) -> Result<()> {
        let mut grad = grad.clone();
        for index in (0..layers.count()).rev() {
            let input = Var::from_tensor(&self.inputs[index])?;
            let mut rng = ChaCha8Rng::seed_from_u64(self.seeds[index]);
            let output = layers.run(index, input.as_tensor(), &mut Some(&mut rng))?;
            let store = (output * &grad)?.sum_all()?.backward()?;
            sink(&store)?;
            grad = match store.get(input.as_tensor()) {
                Some(g) => g.clone(),
                None => input.zeros_like()?,
            };
        }
        if self.embedded.track_op() {
            sink(&(self.embedded * grad)?.sum_all()?.backward()?)?;
        }
        Ok(())
    }
}
