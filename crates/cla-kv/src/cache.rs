//! [`PagedKvCache`]: sequences, their block tables, and the append protocol.
//!
//! # Appending: reserve, write per producer, commit
//!
//! A forward pass adds the same `n` positions to every producer layer of a sequence, one
//! layer at a time. The cache follows that shape:
//!
//! 1. [`PagedKvCache::reserve`]`(seq, n)` once per forward: allocates the blocks for `n`
//!    new positions (and copies a shared, partly filled last block: copy-on-write). It is
//!    the only step that can run out of memory, and if it does nothing has changed.
//! 2. [`PagedKvCache::write`]`(seq, layer, keys, values)` for each producer layer, with
//!    `n` tokens of keys and values, token-major `[token][kv head][dim]`. A consumer layer
//!    is refused ([`KvError::ConsumerLayer`]): it has nothing to store.
//!
//!    A writer that addresses the pool itself (a GPU kernel appending through the block
//!    table and the [`KvLayout`]) stores the rows without the cache and then says so with
//!    [`PagedKvCache::mark_written`]`(seq, layer, positions)`, which moves nothing.
//! 3. Attention of any layer reads its producer's slot, reserved tokens included once the
//!    producer has written them ([`PagedKvCache::blocks`], [`PagedKvCache::slot_view`],
//!    [`PagedKvCache::read`]).
//! 4. [`PagedKvCache::commit`]`(seq)` once every producer wrote; or
//!    [`PagedKvCache::abort`]`(seq)` to drop the reservation.
//!
//! Every fallible method validates before it mutates: an `Err` leaves the cache unchanged.

use crate::block::{BlockAllocator, BlockId, BlockTable};
use crate::config::{KvCacheConfig, KvShape};
use crate::error::{KvError, Result};
use crate::layout::{KvLayout, KvPart};
use crate::storage::{CpuKvStorage, KvSlice, KvStorage};
use cla_core::KvSharing;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// A sequence in the cache. Ids are never reused, so a freed id stays unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(u64);

impl SequenceId {
    /// The id as a number (for logs and maps).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SequenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// An open append: `n` positions after the committed ones, and which producer slots have
/// written them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reservation {
    n: usize,
    written: Vec<bool>,
    /// Table length before the reservation's new blocks (released again by `abort`).
    blocks_before: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Sequence {
    table: BlockTable,
    /// Committed positions.
    len: usize,
    pending: Option<Reservation>,
}

impl Sequence {
    /// Positions held: committed plus reserved.
    fn held(&self) -> usize {
        self.len + self.pending.as_ref().map_or(0, |r| r.n)
    }
}

/// Where one layer's keys and values of one sequence are, for a kernel: the producer
/// `slot` whose planes to read, the `len` positions visible now, and the `blocks` holding
/// them (`ceil(len / block_size)` entries are meaningful; the rest, if any, are reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView<'a> {
    /// The producer slot (`KvSharing::slot_of(layer)`).
    pub slot: usize,
    /// Visible positions.
    pub len: usize,
    /// The sequence's block table.
    pub blocks: &'a [BlockId],
}

/// A snapshot of the pool's occupancy. Every producer slot holds the same blocks, so each
/// per-slot figure is the total divided by `num_slots`, exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvMemory {
    /// Producer slots.
    pub num_slots: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Bytes of one block in all slots (`block_size * kv_bytes_per_token`).
    pub block_bytes: u64,
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks held by some sequence (shared blocks count once).
    pub used_blocks: usize,
    /// Bytes of the pool: `total_blocks * block_bytes`.
    pub capacity_bytes: u64,
    /// Bytes of the held blocks: `used_blocks * block_bytes`.
    pub reserved_bytes: u64,
    /// Bytes of the positions actually stored in held blocks (committed or reserved, each
    /// physical position once): `stored_tokens * kv_bytes_per_token`.
    pub used_bytes: u64,
    /// Distinct physical positions stored (a shared block's positions count once).
    pub stored_tokens: usize,
}

impl KvMemory {
    /// Free blocks.
    pub fn free_blocks(&self) -> usize {
        self.total_blocks - self.used_blocks
    }

    /// [`Self::capacity_bytes`] of one producer slot.
    pub fn capacity_bytes_per_slot(&self) -> u64 {
        self.capacity_bytes / self.num_slots as u64
    }

    /// [`Self::reserved_bytes`] of one producer slot.
    pub fn reserved_bytes_per_slot(&self) -> u64 {
        self.reserved_bytes / self.num_slots as u64
    }

    /// [`Self::used_bytes`] of one producer slot.
    pub fn used_bytes_per_slot(&self) -> u64 {
        self.used_bytes / self.num_slots as u64
    }
}

/// A paged KV cache that stores keys and values for producer layers only, over a storage
/// `S` (host memory by default).
#[derive(Debug, Clone, PartialEq)]
pub struct PagedKvCache<S = CpuKvStorage> {
    shape: KvShape,
    config: KvCacheConfig,
    layout: KvLayout,
    allocator: BlockAllocator,
    sequences: BTreeMap<SequenceId, Sequence>,
    next_id: u64,
    storage: S,
}

impl PagedKvCache<CpuKvStorage> {
    /// A cache in host memory.
    pub fn new(shape: KvShape, config: KvCacheConfig) -> Result<Self> {
        let layout = KvLayout::new(&shape, &config)?;
        Self::with_storage(shape, config, CpuKvStorage::new(layout))
    }

    /// The blocks holding `layer`'s visible keys and values of `seq`, read in place from
    /// its producer's slot (no copy), in position order.
    pub fn blocks(&self, seq: SequenceId, layer: usize) -> Result<KvBlocks<'_>> {
        let view = self.slot_view(seq, layer)?;
        Ok(KvBlocks {
            storage: &self.storage,
            view,
            next: 0,
        })
    }
}

impl<S: KvStorage> PagedKvCache<S> {
    /// A cache over `storage`, whose layout must be `KvLayout::new(&shape, &config)`.
    pub fn with_storage(shape: KvShape, config: KvCacheConfig, storage: S) -> Result<Self> {
        let layout = KvLayout::new(&shape, &config)?;
        if config.num_blocks > u32::MAX as usize {
            return Err(KvError::InvalidConfig {
                reason: format!(
                    "num_blocks ({}) exceeds {}, the most a u32 block id can name",
                    config.num_blocks,
                    u32::MAX
                ),
            });
        }
        check_layout(&layout, &storage)?;
        Ok(Self {
            shape,
            config,
            layout,
            allocator: BlockAllocator::new(config.num_blocks),
            sequences: BTreeMap::new(),
            next_id: 0,
            storage,
        })
    }

    /// What is cached per token.
    pub fn shape(&self) -> &KvShape {
        &self.shape
    }

    /// The layer -> K/V-source map.
    pub fn sharing(&self) -> &KvSharing {
        self.shape.sharing()
    }

    /// Block size, block count and element type.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Where every element lives.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The storage (e.g. to bind its buffers or read raw blocks).
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The storage, for a writer that stores reserved rows itself and then calls
    /// [`Self::mark_written`]. The storage must keep its layout: a storage replaced through
    /// this reference by one of another layout makes `mark_written` fail with
    /// [`KvError::LayoutMismatch`].
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// The free list and reference counts.
    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    // ----- sequences -------------------------------------------------------------------

    /// Adds an empty sequence. Allocates nothing, so it cannot fail.
    pub fn add_sequence(&mut self) -> SequenceId {
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(
            id,
            Sequence {
                table: BlockTable::default(),
                len: 0,
                pending: None,
            },
        );
        id
    }

    /// Whether `seq` is in the cache.
    pub fn contains(&self, seq: SequenceId) -> bool {
        self.sequences.contains_key(&seq)
    }

    /// The sequences in the cache, in creation order.
    pub fn sequence_ids(&self) -> impl Iterator<Item = SequenceId> + '_ {
        self.sequences.keys().copied()
    }

    /// Number of sequences in the cache.
    pub fn num_sequences(&self) -> usize {
        self.sequences.len()
    }

    /// Committed positions of `seq` (reserved ones excluded).
    pub fn seq_len(&self, seq: SequenceId) -> Result<usize> {
        Ok(self.seq(seq)?.len)
    }

    /// Positions reserved and not yet committed (0 without a reservation).
    pub fn pending_len(&self, seq: SequenceId) -> Result<usize> {
        Ok(self.seq(seq)?.pending.as_ref().map_or(0, |r| r.n))
    }

    /// The block table of `seq` (committed and reserved blocks).
    pub fn block_table(&self, seq: SequenceId) -> Result<&BlockTable> {
        Ok(&self.seq(seq)?.table)
    }

    /// Releases every block of `seq` (a reservation included) and forgets it.
    pub fn free(&mut self, seq: SequenceId) -> Result<()> {
        let s = self
            .sequences
            .remove(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        for &b in &s.table.blocks {
            self.allocator.release(b);
        }
        Ok(())
    }

    /// A new sequence with the same committed tokens as `seq`, sharing all its blocks by
    /// reference count; the first write into a shared, partly filled block copies it
    /// (copy-on-write). Allocates nothing. Refused while `seq` has an open reservation.
    pub fn fork(&mut self, seq: SequenceId) -> Result<SequenceId> {
        let s = self.seq(seq)?;
        if s.pending.is_some() {
            return Err(KvError::ReservationOpen(seq));
        }
        let table = s.table.clone();
        let len = s.len;
        for &b in &table.blocks {
            self.allocator.retain(b);
        }
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(
            id,
            Sequence {
                table,
                len,
                pending: None,
            },
        );
        Ok(id)
    }

    /// Rolls back the last `n` committed tokens of `seq` (e.g. rejected speculative
    /// tokens), releasing blocks no longer needed. Refused while a reservation is open or
    /// if `n` exceeds the sequence's length.
    pub fn truncate(&mut self, seq: SequenceId, n: usize) -> Result<()> {
        let bs = self.config.block_size;
        let s = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        if s.pending.is_some() {
            return Err(KvError::ReservationOpen(seq));
        }
        if n > s.len {
            return Err(KvError::TruncateTooLong {
                seq,
                requested: n,
                len: s.len,
            });
        }
        s.len -= n;
        let keep = s.len.div_ceil(bs);
        for b in s.table.blocks.drain(keep..) {
            self.allocator.release(b);
        }
        Ok(())
    }

    // ----- appending -------------------------------------------------------------------

    /// Blocks that [`Self::reserve`]`(seq, n)` would allocate now (copy-on-write
    /// included). Refused while a reservation is open.
    pub fn blocks_needed(&self, seq: SequenceId, n: usize) -> Result<usize> {
        let s = self.seq(seq)?;
        if s.pending.is_some() {
            return Err(KvError::ReservationOpen(seq));
        }
        Ok(self.blocks_needed_for(s, n))
    }

    /// Whether `n` more tokens of `seq` fit now.
    pub fn can_reserve(&self, seq: SequenceId, n: usize) -> Result<bool> {
        Ok(self.blocks_needed(seq, n)? <= self.allocator.num_free())
    }

    fn blocks_needed_for(&self, s: &Sequence, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let bs = self.config.block_size;
        let Some(new_len) = s.len.checked_add(n) else {
            return usize::MAX;
        };
        let grow = new_len.div_ceil(bs) - s.table.blocks.len();
        let cow = !s.len.is_multiple_of(bs)
            && s.table
                .blocks
                .last()
                .is_some_and(|&b| self.allocator.ref_count(b) > 1);
        grow + usize::from(cow)
    }

    /// Reserves positions `len..len + n` of `seq` for one forward pass, allocating their
    /// blocks. Returns the reserved positions. Fails with [`KvError::CacheFull`] (cache
    /// unchanged) if the blocks are not free, and while another reservation is open.
    pub fn reserve(&mut self, seq: SequenceId, n: usize) -> Result<Range<usize>> {
        let needed = self.blocks_needed(seq, n)?;
        let free = self.allocator.num_free();
        if needed > free {
            return Err(KvError::CacheFull {
                needed_blocks: needed,
                free_blocks: free,
            });
        }
        let bs = self.config.block_size;
        let num_slots = self.shape.num_slots();
        let s = self.sequences.get_mut(&seq).expect("checked above");
        if n > 0 && !s.len.is_multiple_of(bs) {
            let last = *s.table.blocks.last().expect("a partial block exists");
            if self.allocator.ref_count(last) > 1 {
                let copy = self.allocator.allocate().expect("counted above");
                self.storage.copy_block(last, copy);
                self.allocator.release(last);
                *s.table.blocks.last_mut().expect("non-empty") = copy;
            }
        }
        let blocks_before = s.table.blocks.len();
        let new_len = s.len + n;
        while s.table.blocks.len() < new_len.div_ceil(bs) {
            let b = self.allocator.allocate().expect("counted above");
            s.table.blocks.push(b);
        }
        s.pending = Some(Reservation {
            n,
            written: vec![false; num_slots],
            blocks_before,
        });
        Ok(s.len..new_len)
    }

    /// Stores the reserved tokens' keys and values of producer `layer`: `keys` and
    /// `values` each hold `n * num_kv_heads * head_dim` elements, token-major
    /// `[token][kv head][dim]`, converted to the cache's element type. Writing a slot again
    /// before `commit` overwrites it.
    pub fn write(
        &mut self,
        seq: SequenceId,
        layer: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<()> {
        let s = self.seq(seq)?;
        let slot = self.producer_slot(layer)?;
        let n = s.pending.as_ref().ok_or(KvError::NoReservation(seq))?.n;
        for (what, buf) in [("keys", keys), ("values", values)] {
            self.check_len(what, buf.len(), n)?;
        }
        let width = self.shape.kv_width();
        let bs = self.config.block_size;
        let s = &self.sequences[&seq];
        let mut pos = s.len;
        let end = s.len + n;
        while pos < end {
            let offset = pos % bs;
            let m = (bs - offset).min(end - pos);
            let block = s.table.blocks[pos / bs];
            let from = (pos - s.len) * width;
            let to = from + m * width;
            self.storage
                .write_tokens(slot, block, offset, &keys[from..to], &values[from..to]);
            pos += m;
        }
        self.set_written(seq, slot);
        Ok(())
    }

    /// Records that producer `layer`'s keys and values of the reserved `positions` are
    /// already in the storage: a writer that addresses the pool itself (a kernel appending
    /// through the block table) stored them where [`KvLayout`] puts them. Moves nothing;
    /// afterwards the slot is read and committed as if [`Self::write`] had stored the rows.
    ///
    /// `positions` must be exactly the open reservation, the range [`Self::reserve`]
    /// returned ([`KvError::NotReserved`] otherwise). A consumer layer is refused as by
    /// `write`. Marking a slot again before `commit` changes nothing.
    pub fn mark_written(
        &mut self,
        seq: SequenceId,
        layer: usize,
        positions: Range<usize>,
    ) -> Result<()> {
        check_layout(&self.layout, &self.storage)?;
        let s = self.seq(seq)?;
        let slot = self.producer_slot(layer)?;
        let n = s.pending.as_ref().ok_or(KvError::NoReservation(seq))?.n;
        let reserved = s.len..s.len + n;
        if positions != reserved {
            return Err(KvError::NotReserved {
                seq,
                positions,
                reserved,
            });
        }
        self.set_written(seq, slot);
        Ok(())
    }

    /// Records that `slot`'s rows of `seq`'s open reservation are stored (the caller has
    /// checked that the reservation exists).
    fn set_written(&mut self, seq: SequenceId, slot: usize) {
        let r = self
            .sequences
            .get_mut(&seq)
            .and_then(|s| s.pending.as_mut())
            .expect("checked by the caller");
        r.written[slot] = true;
    }

    /// Makes the reserved tokens part of `seq`; every producer layer must have written
    /// them (or been marked written). Returns the new length.
    pub fn commit(&mut self, seq: SequenceId) -> Result<usize> {
        let producers = self.shape.sharing().producers();
        let s = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        let r = s.pending.as_ref().ok_or(KvError::NoReservation(seq))?;
        let missing: Vec<usize> = r
            .written
            .iter()
            .zip(producers)
            .filter(|(w, _)| !**w)
            .map(|(_, &layer)| layer)
            .collect();
        if !missing.is_empty() {
            return Err(KvError::Incomplete { seq, missing });
        }
        s.len += r.n;
        s.pending = None;
        Ok(s.len)
    }

    /// Drops the open reservation of `seq`, releasing the blocks it allocated. A
    /// copy-on-write copy made by `reserve` is kept (it holds the same tokens).
    pub fn abort(&mut self, seq: SequenceId) -> Result<()> {
        let s = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        let r = s.pending.take().ok_or(KvError::NoReservation(seq))?;
        for b in s.table.blocks.drain(r.blocks_before..) {
            self.allocator.release(b);
        }
        Ok(())
    }

    // ----- reading ---------------------------------------------------------------------

    /// Where `layer`'s keys and values of `seq` are: its producer's slot, the visible
    /// positions and the block table. Reserved positions are visible once the producer
    /// wrote them; reading a layer whose producer has not yet written an open reservation
    /// is refused ([`KvError::NotWritten`]).
    pub fn slot_view(&self, seq: SequenceId, layer: usize) -> Result<SlotView<'_>> {
        let s = self.seq(seq)?;
        self.check_layer(layer)?;
        let slot = self.shape.sharing().slot_of(layer);
        let len = match &s.pending {
            None => s.len,
            Some(r) if r.written[slot] => s.len + r.n,
            Some(_) => {
                return Err(KvError::NotWritten {
                    seq,
                    layer,
                    producer: self.shape.sharing().producer_of(layer),
                });
            }
        };
        Ok(SlotView {
            slot,
            len,
            blocks: &s.table.blocks,
        })
    }

    /// Copies `layer`'s visible keys and values of `seq` into `keys_out` and `values_out`,
    /// token-major `[position][kv head][dim]` as `f32`; each must hold exactly
    /// `visible * num_kv_heads * head_dim` elements (`visible` = [`SlotView::len`]).
    /// Returns the number of positions.
    pub fn read_into(
        &self,
        seq: SequenceId,
        layer: usize,
        keys_out: &mut [f32],
        values_out: &mut [f32],
    ) -> Result<usize> {
        let view = self.slot_view(seq, layer)?;
        self.check_len("keys_out", keys_out.len(), view.len)?;
        self.check_len("values_out", values_out.len(), view.len)?;
        let bs = self.config.block_size;
        let width = self.shape.kv_width();
        for (i, &block) in view.blocks.iter().enumerate() {
            let start = i * bs;
            if start >= view.len {
                break;
            }
            let m = bs.min(view.len - start);
            let r = start * width..(start + m) * width;
            self.storage.read_tokens(
                view.slot,
                block,
                0,
                &mut keys_out[r.clone()],
                &mut values_out[r],
            );
        }
        Ok(view.len)
    }

    /// `layer`'s visible keys and values of `seq` as new dense `f32` vectors, token-major.
    /// Convenient for tests; the decoder reads in place with [`PagedKvCache::blocks`].
    pub fn read(&self, seq: SequenceId, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = self.slot_view(seq, layer)?.len * self.shape.kv_width();
        let (mut k, mut v) = (vec![0.0; n], vec![0.0; n]);
        self.read_into(seq, layer, &mut k, &mut v)?;
        Ok((k, v))
    }

    // ----- accounting ------------------------------------------------------------------

    /// Blocks needed to hold `tokens` positions of a new sequence.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }

    /// Free blocks.
    pub fn num_free_blocks(&self) -> usize {
        self.allocator.num_free()
    }

    /// Positions that still fit, as new sequences' blocks (`free blocks * block_size`).
    pub fn free_tokens(&self) -> usize {
        self.allocator.num_free() * self.config.block_size
    }

    /// Whether a new sequence of `tokens` positions fits now.
    pub fn can_admit(&self, tokens: usize) -> bool {
        self.blocks_for(tokens) <= self.allocator.num_free()
    }

    /// KV bytes per position (all producer slots), = `cla_core::memory::kv_bytes_per_token`.
    pub fn bytes_per_token(&self) -> u64 {
        self.shape.bytes_per_token(self.config.dtype)
    }

    /// Bytes of the blocks in `seq`'s table, counted as if it shared none
    /// (`blocks * block_size * kv_bytes_per_token`).
    pub fn sequence_reserved_bytes(&self, seq: SequenceId) -> Result<u64> {
        Ok(self.seq(seq)?.table.blocks.len() as u64 * self.config.block_bytes(&self.shape))
    }

    /// The pool's occupancy now.
    pub fn memory(&self) -> KvMemory {
        let bs = self.config.block_size;
        let mut filled: BTreeMap<BlockId, usize> = BTreeMap::new();
        for s in self.sequences.values() {
            let held = s.held();
            for (i, &b) in s.table.blocks.iter().enumerate() {
                let n = held.saturating_sub(i * bs).min(bs);
                let e = filled.entry(b).or_insert(0);
                *e = (*e).max(n);
            }
        }
        let stored_tokens = filled.values().sum::<usize>();
        let block_bytes = self.config.block_bytes(&self.shape);
        let used_blocks = self.allocator.num_used();
        KvMemory {
            num_slots: self.shape.num_slots(),
            block_size: bs,
            block_bytes,
            total_blocks: self.config.num_blocks,
            used_blocks,
            capacity_bytes: self.config.num_blocks as u64 * block_bytes,
            reserved_bytes: used_blocks as u64 * block_bytes,
            used_bytes: stored_tokens as u64 * self.bytes_per_token(),
            stored_tokens,
        }
    }

    // ----- helpers ---------------------------------------------------------------------

    fn seq(&self, seq: SequenceId) -> Result<&Sequence> {
        self.sequences
            .get(&seq)
            .ok_or(KvError::UnknownSequence(seq))
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        let num_layers = self.shape.sharing().num_layers();
        if layer >= num_layers {
            return Err(KvError::LayerOutOfRange { layer, num_layers });
        }
        Ok(())
    }

    fn producer_slot(&self, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        let sharing = self.shape.sharing();
        sharing
            .slot_of_producer(layer)
            .ok_or(KvError::ConsumerLayer {
                layer,
                producer: sharing.producer_of(layer),
            })
    }

    fn check_len(&self, what: &'static str, found: usize, tokens: usize) -> Result<()> {
        let expected = tokens * self.shape.kv_width();
        if found != expected {
            return Err(KvError::WrongLength {
                what,
                expected,
                found,
                tokens,
                num_kv_heads: self.shape.num_kv_heads(),
                head_dim: self.shape.head_dim(),
            });
        }
        Ok(())
    }
}

/// One block of a layer's visible keys and values, borrowed from the pool.
#[derive(Debug, Clone, Copy)]
pub struct KvBlock<'a> {
    /// Position of the block's first token in the sequence.
    pub start: usize,
    /// Valid tokens in the block (`1..=block_size`).
    pub len: usize,
    keys: KvSlice<'a>,
    values: KvSlice<'a>,
    head_dim: usize,
    head_stride: usize,
}

impl<'a> KvBlock<'a> {
    /// The whole key tile, head-major `[kv head][token in block][dim]`
    /// (`block_stride` elements; tokens at and past `len` are not part of the sequence).
    pub fn keys(&self) -> KvSlice<'a> {
        self.keys
    }

    /// The whole value tile, laid out as [`Self::keys`].
    pub fn values(&self) -> KvSlice<'a> {
        self.values
    }

    /// The valid keys of kv `head`: `len` rows of `head_dim`, contiguous; `None` if `head`
    /// is out of range.
    pub fn keys_of_head(&self, head: usize) -> Option<KvSlice<'a>> {
        self.keys
            .sub(head * self.head_stride, self.len * self.head_dim)
    }

    /// The valid values of kv `head`, laid out as [`Self::keys_of_head`].
    pub fn values_of_head(&self, head: usize) -> Option<KvSlice<'a>> {
        self.values
            .sub(head * self.head_stride, self.len * self.head_dim)
    }
}

/// The blocks of one layer's visible keys and values, in position order (see
/// [`PagedKvCache::blocks`]).
#[derive(Debug, Clone)]
pub struct KvBlocks<'a> {
    storage: &'a CpuKvStorage,
    view: SlotView<'a>,
    next: usize,
}

impl<'a> Iterator for KvBlocks<'a> {
    type Item = KvBlock<'a>;

    fn next(&mut self) -> Option<KvBlock<'a>> {
        let l = self.storage.layout();
        let start = self.next * l.block_size;
        if start >= self.view.len {
            return None;
        }
        let block = self.view.blocks[self.next];
        self.next += 1;
        let slot = self.view.slot;
        Some(KvBlock {
            start,
            len: l.block_size.min(self.view.len - start),
            keys: self.storage.block(slot, KvPart::Keys, block)?,
            values: self.storage.block(slot, KvPart::Values, block)?,
            head_dim: l.head_dim,
            head_stride: l.head_stride,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let bs = self.storage.layout().block_size;
        let n = self.view.len.div_ceil(bs).saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for KvBlocks<'_> {}

/// The storage's layout must be the cache's (a storage built for another shape or config, or
/// one swapped in through [`PagedKvCache::storage_mut`], would put rows elsewhere).
fn check_layout<S: KvStorage>(layout: &KvLayout, storage: &S) -> Result<()> {
    if storage.layout() != layout {
        return Err(KvError::LayoutMismatch {
            expected: layout.to_string(),
            found: storage.layout().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KvDType;
    use cla_core::SharingPattern;

    fn shape() -> KvShape {
        KvShape::new(1, 2, SharingPattern::Cla(2).build(4).unwrap()).unwrap()
    }

    #[test]
    fn bad_configs_are_refused() {
        let zero = KvCacheConfig::new(0, KvDType::F32);
        assert!(matches!(
            PagedKvCache::new(shape(), zero),
            Err(KvError::InvalidConfig { .. })
        ));
        let zero_bs = KvCacheConfig::new(4, KvDType::F32).with_block_size(0);
        assert!(matches!(
            PagedKvCache::new(shape(), zero_bs),
            Err(KvError::InvalidConfig { .. })
        ));
        assert!(KvShape::new(0, 2, KvSharing::all_producers(1)).is_err());
        assert!(KvDType::try_from(cla_core::DType::BF16).is_err());
        let config = KvCacheConfig::new(4, KvDType::F32);
        let other = KvLayout::new(&shape(), &KvCacheConfig::new(5, KvDType::F32)).unwrap();
        let e = PagedKvCache::with_storage(shape(), config, CpuKvStorage::new(other));
        assert!(matches!(e, Err(KvError::LayoutMismatch { .. })));
    }

    #[test]
    fn consumers_read_the_producer_slot_in_place() {
        let mut cache = PagedKvCache::new(shape(), KvCacheConfig::new(4, KvDType::F32)).unwrap();
        let s = cache.add_sequence();
        cache.reserve(s, 3).unwrap();
        cache.write(s, 0, &[1.0; 6], &[2.0; 6]).unwrap();
        // Layer 1 reads layer 0's slot; layers 2 and 3 wait for layer 2.
        assert_eq!(cache.slot_view(s, 1).unwrap().len, 3);
        assert!(matches!(
            cache.slot_view(s, 3),
            Err(KvError::NotWritten { producer: 2, .. })
        ));
        cache.write(s, 2, &[3.0; 6], &[4.0; 6]).unwrap();
        cache.commit(s).unwrap();
        let a = cache.blocks(s, 0).unwrap().next().unwrap().keys();
        let b = cache.blocks(s, 1).unwrap().next().unwrap().keys();
        match (a, b) {
            (KvSlice::F32(a), KvSlice::F32(b)) => assert!(std::ptr::eq(a, b)),
            _ => unreachable!("f32 cache"),
        }
        assert_eq!(cache.read(s, 3).unwrap().1, vec![4.0; 6]);
        assert_eq!(cache.blocks(s, 3).unwrap().len(), 1);
    }

    #[test]
    fn a_storage_swapped_for_another_layout_is_refused() {
        let config = KvCacheConfig::new(4, KvDType::F32).with_block_size(2);
        let mut cache = PagedKvCache::new(shape(), config).unwrap();
        let s = cache.add_sequence();
        let r = cache.reserve(s, 1).unwrap();
        let other = KvLayout::new(&shape(), &config.with_block_size(4)).unwrap();
        *cache.storage_mut() = CpuKvStorage::new(other);
        assert!(matches!(
            cache.mark_written(s, 0, r),
            Err(KvError::LayoutMismatch { .. })
        ));
    }

    #[test]
    fn rows_stored_outside_the_cache_are_marked_not_copied() {
        let config = KvCacheConfig::new(4, KvDType::F32).with_block_size(2);
        let mut cache = PagedKvCache::new(shape(), config).unwrap();
        let s = cache.add_sequence();
        let r = cache.reserve(s, 3).unwrap();
        // A "kernel" stores layer 0's rows where the block table and layout say.
        let table = cache.block_table(s).unwrap().blocks().to_vec();
        let slot = cache.sharing().slot_of(0);
        let storage = cache.storage_mut();
        storage.write_tokens(slot, table[0], 0, &[1.0, 2.0, 3.0, 4.0], &[5.0; 4]);
        storage.write_tokens(slot, table[1], 0, &[6.0, 7.0], &[8.0; 2]);
        assert!(matches!(
            cache.slot_view(s, 1),
            Err(KvError::NotWritten { producer: 0, .. })
        ));
        cache.mark_written(s, 0, r.clone()).unwrap();
        assert_eq!(cache.slot_view(s, 1).unwrap().len, 3);
        assert_eq!(
            cache.read(s, 1).unwrap(),
            (
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 7.0],
                vec![5.0, 5.0, 5.0, 5.0, 8.0, 8.0]
            )
        );
        assert!(matches!(
            cache.commit(s),
            Err(KvError::Incomplete { ref missing, .. }) if *missing == [2]
        ));
        cache.mark_written(s, 2, r.clone()).unwrap();
        assert_eq!(cache.commit(s).unwrap(), 3);

        // Misuse is refused, and changes nothing.
        let before = cache.clone();
        let no_reservation = cache.mark_written(s, 0, 3..4);
        assert_eq!(no_reservation, Err(KvError::NoReservation(s)));
        let r = cache.reserve(s, 1).unwrap();
        assert_eq!(r, 3..4);
        let reserved = cache.clone();
        for wrong in [2..3, 3..5, 4..5, 3..3, 0..4] {
            assert_eq!(
                cache.mark_written(s, 0, wrong.clone()),
                Err(KvError::NotReserved {
                    seq: s,
                    positions: wrong,
                    reserved: 3..4
                })
            );
        }
        assert!(matches!(
            cache.mark_written(s, 3, r.clone()),
            Err(KvError::ConsumerLayer {
                layer: 3,
                producer: 2
            })
        ));
        assert!(matches!(
            cache.mark_written(s, 4, r.clone()),
            Err(KvError::LayerOutOfRange { layer: 4, .. })
        ));
        assert!(cache == reserved);
        cache.abort(s).unwrap();
        assert_eq!(cache.seq_len(s), before.seq_len(s));
    }

    #[test]
    fn abort_returns_the_reserved_blocks() {
        let config = KvCacheConfig::new(4, KvDType::F16).with_block_size(2);
        let mut cache = PagedKvCache::new(shape(), config).unwrap();
        let s = cache.add_sequence();
        assert_eq!(cache.reserve(s, 5).unwrap(), 0..5);
        assert_eq!(cache.num_free_blocks(), 1);
        assert_eq!(cache.pending_len(s).unwrap(), 5);
        cache.abort(s).unwrap();
        assert_eq!(cache.num_free_blocks(), 4);
        assert_eq!(cache.seq_len(s).unwrap(), 0);
        assert_eq!(cache.memory().stored_tokens, 0);
    }
}
