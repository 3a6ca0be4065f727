//! The crate's error type.
//!
//! Two kinds are kept apart on purpose: [`GpuError::NotAvailable`] means "this adapter (or the
//! fast paths left switched on) cannot do that" and a caller may fall back or pick another
//! device; [`GpuError::InvalidArgument`] means the call itself was wrong (shape, dtype, size)
//! and no device would accept it.

use thiserror::Error;

/// Everything that can go wrong in this crate. No function of the crate panics on bad input:
/// it returns one of these.
#[derive(Debug, Error)]
pub enum GpuError {
    /// No adapter matched the selector. `found` lists every adapter that was seen, so the
    /// message says what could have been chosen instead.
    #[error(
        "no GPU adapter matches `{selector}`; adapters found: [{}]. {hint}",
        found.join("; ")
    )]
    NoAdapter {
        /// The selector, as text.
        selector: String,
        /// One line per adapter found (index, name, backend, device type).
        found: Vec<String>,
        /// What to do about it.
        hint: &'static str,
    },

    /// The selector text could not be understood.
    #[error(
        "invalid device selector `{0}`: expected auto, an index, a backend (vulkan, metal, dx12, gl), cpu, or a name substring"
    )]
    InvalidSelector(String),

    /// A fast-path list (`CLA_GPU_DISABLE`) named something that is not a fast path.
    #[error("{0}")]
    InvalidFastPaths(String),

    /// The adapter was found but refused to open a device.
    #[error("could not open a device on adapter `{adapter}`: {message}")]
    RequestDevice {
        /// Adapter name.
        adapter: String,
        /// wgpu's message.
        message: String,
    },

    /// The operation needs something this adapter lacks (or that `CLA_GPU_DISABLE` switched
    /// off), e.g. f16 storage without `SHADER_F16` or a binding above the adapter's limit.
    #[error("not available on this adapter: {0}")]
    NotAvailable(String),

    /// The call was wrong: a shape, dtype or size does not fit the operation.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A generated shader or pipeline was rejected. This is a bug in this crate (or in the
    /// driver); the message names the variant.
    #[error("pipeline `{name}` failed to build: {message}")]
    Pipeline {
        /// Deterministic variant name, e.g. `attn_decode_f16_hd128_r8_bk16`.
        name: String,
        /// wgpu's message.
        message: String,
    },

    /// wgpu reported an error while the device ran (validation, out of memory, device lost).
    #[error("device error: {0}")]
    Device(String),

    /// Mapping a buffer for reading failed.
    #[error("buffer read-back failed: {0}")]
    Readback(String),
}

/// Shorthand for this crate's results.
pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// Returns `InvalidArgument` with a formatted message when `cond` is false.
macro_rules! ensure_arg {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::GpuError::InvalidArgument(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure_arg;
