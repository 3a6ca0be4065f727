//! `cla-kv`: the key/value cache of a Cross-Layer Attention decoder.
//!
//! Storage exists only for *producer* layers (cla-core's `KvSharing`); a consumer layer's
//! keys and values resolve to its producer's slot without a copy. Blocks are paged in the
//! style of PagedAttention, with one block table per sequence shared by every producer slot.
