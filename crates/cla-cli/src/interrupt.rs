//! Ctrl-C handling for the commands that run a model.
//!
//! The first Ctrl-C sets a flag; the running command sees it before its next forward step
//! (see [`Interruptible`]), writes what it has produced and exits with code 130. A second
//! Ctrl-C exits at once, for when a step takes too long to finish.

use crate::failure::EXIT_INTERRUPTED;
use cla_core::ModelConfig;
use cla_model::{Decoder, ModelError, SequenceCache, SequenceStep};
use ndarray::Array2;
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler. Failing to install it only loses the clean exit, so it is
/// logged, not reported.
pub fn install() {
    let result = ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        }
    });
    if let Err(e) = result {
        log::warn!("cannot install the Ctrl-C handler: {e}");
    }
}

/// Whether Ctrl-C has been pressed.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Asks the running command to stop without Ctrl-C (its output was closed).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// A decoder that refuses to run another forward step once Ctrl-C has been pressed
/// (or [`request_stop`] called).
///
/// Generation and evaluation in `cla-model` report tokens through callbacks that cannot ask
/// them to stop; failing the next step ends them instead, and frees their sequences. The
/// caller tells an interruption from a real failure with [`requested`] and
/// [`stop_requested`].
pub struct Interruptible<'a> {
    inner: &'a mut dyn Decoder,
}

impl<'a> Interruptible<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a mut dyn Decoder) -> Self {
        Self { inner }
    }
}

impl Decoder for Interruptible<'_> {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn sequences(&self) -> &dyn SequenceCache {
        self.inner.sequences()
    }

    fn sequences_mut(&mut self) -> &mut dyn SequenceCache {
        self.inner.sequences_mut()
    }

    fn forward(&mut self, batch: &[SequenceStep<'_>]) -> cla_model::Result<Vec<Array2<f32>>> {
        if requested() || stop_requested() {
            return Err(ModelError::InvalidArgument {
                name: "interrupted".into(),
                message: "stopped by Ctrl-C or a closed output".into(),
            });
        }
        self.inner.forward(batch)
    }
}
