//! `cla-core`: the configuration of Cross-Layer Attention (CLA) models and the arithmetic
//! of what they cost.
//!
//! This crate is the one place that knows which layer produces the keys and values that
//! another layer attends to ([`KvSharing`]), what a model looks like ([`ModelConfig`]),
//! and what it costs in KV-cache bytes, parameters and FLOPs ([`memory`]). It is pure: no
//! GPU, no file I/O beyond parsing text handed to it.
//!
//! Reference: Brandon et al. 2024, "Reducing Transformer Key-Value Cache Size with
//! Cross-Layer Attention".

pub mod config;
pub mod dtype;
pub mod error;
pub mod memory;
pub mod sharing;

pub use config::ModelConfig;
pub use dtype::DType;
pub use error::{ConfigError, Result};
pub use sharing::{KvSharing, SharingPattern};
