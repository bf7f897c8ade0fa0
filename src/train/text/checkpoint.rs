//! Gradient checkpointing of the decoder's layers (`train::checkpoint`), with what attention
//! needs to run a layer again.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use rand_chacha::ChaCha8Rng;

use super::TrainText;
use crate::train::checkpoint::{Checkpoints, Layers};

/// What a checkpointed forward kept: the layers' checkpoints (the first input attached to
/// the embedding and, under `--method full` or a vision LoRA, the vision encoder) and the
/// step's rotary tables, lengths and masks.
pub struct Tape {
    pub(super) kept: Checkpoints,
    pub(super) step: Step,
}

/// What every layer of one forward shares.
pub(super) struct Step {
    pub cos: Tensor,
    pub sin: Tensor,
    pub lens: Vec<usize>,
    pub masks: Vec<Tensor>,
}

/// The decoder's layers over one forward's sequences.
pub(super) struct StepLayers<'a> {
    pub model: &'a TrainText,
    pub step: &'a Step,
}

impl Layers for StepLayers<'_> {
    fn count(&self) -> usize {
        self.model.layers.len()
    }

    fn run(&self, index: usize, xs: &Tensor, dropout: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let Step { cos, sin, lens, masks } = self.step;
        (self.model).layer(&self.model.layers[index], xs, cos, sin, lens, masks, dropout)
    }
}

impl TrainText {
    /// The leaf standing for the last layer's output in the loss's graph.
    pub fn tape_output(tape: &Tape) -> &Tensor {
        tape.kept.output()
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
    /// its output; `sink` gets each part's gradients.
    pub fn backward_layers(&self, tape: Tape, grad: &Tensor, sink: impl FnMut(&GradStore) -> Result<()>) -> Result<()> {
        let layers = StepLayers {
            model: self,
            step: &tape.step,
        };
        tape.kept.backward(&layers, grad, sink)
    }
}
