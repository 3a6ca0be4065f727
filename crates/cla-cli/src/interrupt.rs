//! Ctrl-C handling for the commands that run a model.
//!
//! The first Ctrl-C sets a flag. The running command polls it where it can stop cleanly
//! (generation's streaming callback and evaluation's progress callback return
//! `ControlFlow::Break` to `cla-model`; `bench` looks between forward steps), writes what it
//! has produced and exits with code 130. A second Ctrl-C exits at once, for when a step takes
//! too long to finish.

use crate::failure::EXIT_INTERRUPTED;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

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

/// What a `cla-model` callback returns: stop once Ctrl-C has been pressed.
pub fn control() -> ControlFlow<()> {
    if requested() {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}
