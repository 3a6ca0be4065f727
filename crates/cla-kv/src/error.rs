//! The one error type of `cla-kv`.
//!
//! Every fallible operation of the cache checks its input before it changes anything, so
//! an `Err` always means the cache is exactly as it was before the call.

use crate::cache::SequenceId;
use std::ops::Range;
use thiserror::Error;

/// Why a cache operation was refused. The cache is unchanged after any of these.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KvError {
    /// The cache configuration or shape cannot be built.
    #[error("invalid KV-cache configuration: {reason}")]
    InvalidConfig {
        /// What is wrong and what to change.
        reason: String,
    },
    /// A storage was handed to the cache whose layout differs from the one the cache needs.
    #[error(
        "the storage's layout ({found}) differs from the cache's ({expected}); build the storage from `KvLayout::new` with the same shape and config"
    )]
    LayoutMismatch {
        /// The cache's layout, in words.
        expected: String,
        /// The storage's layout, in words.
        found: String,
    },
    /// The sequence was never added, or was freed.
    #[error("unknown sequence {0}: it was never added or has been freed")]
    UnknownSequence(SequenceId),
    /// Not enough free blocks for the request.
    #[error(
        "KV cache full: the request needs {needed_blocks} free blocks but only {free_blocks} \
         are free; free or truncate a sequence, or build the cache with more blocks"
    )]
    CacheFull {
        /// Blocks the request would allocate.
        needed_blocks: usize,
        /// Blocks free now.
        free_blocks: usize,
    },
    /// A layer index at or beyond the model's layer count.
    #[error("layer {layer} does not exist: the model has {num_layers} layers")]
    LayerOutOfRange {
        /// The layer asked for.
        layer: usize,
        /// Layers of the model.
        num_layers: usize,
    },
    /// Keys or values were written for a layer that consumes another layer's K/V.
    #[error(
        "layer {layer} is a consumer: it reads layer {producer}'s keys and values and has \
         none of its own to write; write layer {producer} instead"
    )]
    ConsumerLayer {
        /// The layer written.
        layer: usize,
        /// The producer it reads.
        producer: usize,
    },
    /// A buffer has the wrong number of elements.
    #[error(
        "{what}: expected {expected} elements ({tokens} tokens x {num_kv_heads} kv heads x \
         {head_dim} head_dim), found {found}"
    )]
    WrongLength {
        /// Which buffer (`"keys"`, `"values"`, ...).
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        found: usize,
        /// Tokens the buffer should hold.
        tokens: usize,
        /// Key/value heads per token.
        num_kv_heads: usize,
        /// Elements per head.
        head_dim: usize,
    },
    /// `write`, `mark_written` or `commit` without an open reservation.
    #[error("sequence {0} has no open reservation; call `reserve` first")]
    NoReservation(SequenceId),
    /// `reserve`, `truncate` or `fork` while a reservation is open.
    #[error("sequence {0} has an open reservation; `commit` or `abort` it first")]
    ReservationOpen(SequenceId),
    /// A layer was read while a reservation is open and its producer has not written the
    /// reserved tokens yet (a decoder bug: K/V must be written before attention reads them).
    #[error(
        "sequence {seq}: layer {layer} reads producer layer {producer}, which has not written \
         the reserved tokens yet; write layer {producer} before reading"
    )]
    NotWritten {
        /// The sequence.
        seq: SequenceId,
        /// The layer read.
        layer: usize,
        /// Its producer.
        producer: usize,
    },
    /// `mark_written` named positions other than the open reservation's.
    #[error(
        "sequence {seq}: positions {}..{} are not its open reservation ({}..{}); mark \
         exactly the range `reserve` returned",
        positions.start,
        positions.end,
        reserved.start,
        reserved.end
    )]
    NotReserved {
        /// The sequence.
        seq: SequenceId,
        /// The positions given.
        positions: Range<usize>,
        /// The positions reserved.
        reserved: Range<usize>,
    },
    /// `commit` before every producer layer wrote the reserved tokens.
    #[error(
        "sequence {seq}: cannot commit, producer layers {missing:?} have not written the \
         reserved tokens"
    )]
    Incomplete {
        /// The sequence.
        seq: SequenceId,
        /// Producer layers that still have to write.
        missing: Vec<usize>,
    },
    /// `truncate` asked to remove more tokens than the sequence holds.
    #[error("sequence {seq}: cannot roll back {requested} tokens, it holds only {len}")]
    TruncateTooLong {
        /// The sequence.
        seq: SequenceId,
        /// Tokens asked to remove.
        requested: usize,
        /// Tokens held.
        len: usize,
    },
}

/// `Result` with [`KvError`].
pub type Result<T, E = KvError> = std::result::Result<T, E>;
