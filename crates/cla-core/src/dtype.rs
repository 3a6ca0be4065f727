//! Element types of weights and cached keys/values, with their sizes in bytes.

use crate::error::ConfigError;
use std::fmt;
use std::str::FromStr;

/// An element type for weights or the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit integer (scales not counted).
    Int8,
}

impl DType {
    /// All types, in a stable order.
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::Int8];

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Int8 => 1,
        }
    }

    /// The lower-case name (`f32`, `f16`, `bf16`, `int8`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Int8 => "int8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "int8" | "i8" | "q8" => Ok(DType::Int8),
            _ => Err(ConfigError::BadQuantity {
                key: "dtype".into(),
                input: s.into(),
                reason: "known types: f32, f16, bf16, int8".into(),
            }),
        }
    }
}
