//! `cla-core`: the configuration of Cross-Layer Attention (CLA) models and the arithmetic
//! of what they cost.
//!
//! This crate is the one place that knows which layer produces the keys and values that
//! another layer attends to ([`KvSharing`]), what a model looks like ([`ModelConfig`]),
//! and what it costs: KV-cache and weight bytes ([`memory`]), parameters ([`params`]),
//! FLOPs ([`flops`]) and what fits in a memory budget ([`planner`]). [`presets`] holds the
//! paper's models; [`ByteSize`] reads budgets such as `80GiB`. It is pure: no GPU, no file
//! I/O beyond parsing text handed to it.
//!
//! Reference: Brandon et al. 2024, "Reducing Transformer Key-Value Cache Size with
//! Cross-Layer Attention".

#![warn(missing_docs)]

pub mod bytesize;
pub mod config;
pub mod dtype;
pub mod error;
pub mod flops;
pub mod memory;
pub mod params;
pub mod planner;
pub mod presets;
pub mod sharing;

pub use bytesize::ByteSize;
pub use config::ModelConfig;
pub use dtype::DType;
pub use error::{ConfigError, Result};
pub use flops::FlopCount;
pub use params::{ParamCount, ParamOptions};
pub use planner::MemoryPlanner;
pub use presets::Preset;
pub use sharing::{KvSharing, SharingPattern};
