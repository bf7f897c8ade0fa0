//! Gradient checkpointing (`--gradient-checkpointing`): a forward that keeps each decoder
//! layer's input only, and the backward pass that runs each layer again from it.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::TrainText;

/// What a checkpointed forward kept: each layer's input (detached), the seed of its dropout,
/// and what attention needs to run a layer again; `output` is the last layer's output as a
/// leaf whose gradient the loss's backward gives, `embedded` the first layer's input still
/// attached to the embedding (and, under `--method full`, the vision encoder).
pub struct Tape {
    pub(super) inputs: Vec<Tensor>,
    pub(super) seeds: Vec<u64>,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) lens: Vec<usize>,
    pub(super) masks: Vec<Tensor>,
    pub(super) output: Var,
    pub(super) embedded: Tensor,
}

impl TrainText {
    /// The leaf standing for the last layer's output in the loss's graph.
    pub fn tape_output(tape: &Tape) -> &Tensor {
        tape.output.as_tensor()
    }

    /// Turns gradient checkpointing on or off (`--gradient-checkpointing`).
    pub fn checkpoint_layers(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// The checkpoints of the last training forward, if it kept any.
    pub fn take_tape(&self) -> Option<Tape> {
        self.tape.borrow_mut().take()
    }

    /// The backward pass through the layers of a checkpointed forward, given the gradient of
    /// its output: each layer runs again from its saved input (last first) and back-propagates
    /// the gradient it receives; `sink` gets each part's gradients.
    pub fn backward_layers(
        &self,
        tape: Tape,
        grad: &Tensor,
        mut sink: impl FnMut(&GradStore) -> Result<()>,
    ) -> Result<()> {
        let mut grad = grad.clone();
        for index in (0..self.layers.len()).rev() {
            let input = Var::from_tensor(&tape.inputs[index])?;
            let mut rng = ChaCha8Rng::seed_from_u64(tape.seeds[index]);
            let (cos, sin, lens, masks) = (&tape.cos, &tape.sin, &tape.lens, &tape.masks);
            let output = self.layer(
                &self.layers[index],
                input.as_tensor(),
                cos,
                sin,
                lens,
                masks,
                &mut Some(&mut rng),
            )?;
            let store = (output * &grad)?.sum_all()?.backward()?;
            sink(&store)?;
            grad = match store.get(input.as_tensor()) {
                Some(g) => g.clone(),
                None => input.zeros_like()?,
            };
        }
        if tape.embedded.track_op() {
            sink(&(tape.embedded * grad)?.sum_all()?.backward()?)?;
        }
        Ok(())
    }
}
