//! The integration tests of `cla-model`, as one test binary: the helpers in `common` and the
//! code they call are compiled and linked once for all of them instead of once per file.

mod common;
mod conformance_stories260k;
mod decoder_vs_reference;
mod generation;
mod gpu_conformance_stories260k;
mod gpu_decoder;
mod gpu_sampling;
mod gpu_shipped_golden;
mod model_files;
