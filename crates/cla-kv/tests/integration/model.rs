//! The cache against a naive model that keeps a separate dense copy of keys and values
//! per LAYER (a consumer copies its producer's), over random operation sequences, sharing
//! maps, block sizes and element types. Invalid operations are injected and must fail
//! with the right error, leaving the whole cache (tables, allocator, storage) unchanged.
//!
//! Appends store each producer's rows either through `write` or, as a GPU kernel does,
//! straight into the storage where the block table and layout say, followed by
//! `mark_written`; `mask` picks which, per producer.

use cla_core::{KvSharing, SharingPattern};
use cla_kv::{
    BlockId, KvCacheConfig, KvDType, KvError, KvShape, KvStorage, PagedKvCache, SequenceId,
};
use half::f16;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// Dense keys and values of every layer of a sequence, token-major.
type NaiveSeq = Vec<(Vec<f32>, Vec<f32>)>;

#[derive(Debug, Clone)]
enum Op {
    Add,
    /// Append `n` tokens to a live sequence (reserve, write or store-and-mark every
    /// producer, commit).
    Append {
        pick: usize,
        n: usize,
        mask: u64,
    },
    /// Reserve `n` tokens, write or store-and-mark some producers (checking that they read
    /// back with the reserved tokens), then abort.
    AbortedAppend {
        pick: usize,
        n: usize,
        writes: usize,
        mask: u64,
    },
    Fork {
        pick: usize,
    },
    Truncate {
        pick: usize,
        n: usize,
    },
    Free {
        pick: usize,
    },
    Invalid {
        pick: usize,
        kind: Invalid,
    },
}

#[derive(Debug, Clone, Copy)]
enum Invalid {
    UnknownSequence,
    OverCapacity,
    ConsumerWrite,
    OverTruncate,
    WrongLength,
    CommitIncomplete,
    WriteWithoutReservation,
    ReserveTwice,
    ReadBeforeWrite,
    LayerOutOfRange,
    MarkOtherPositions,
}

fn op() -> impl Strategy<Value = Op> {
    let invalid = prop_oneof![
        Just(Invalid::UnknownSequence),
        Just(Invalid::OverCapacity),
        Just(Invalid::ConsumerWrite),
        Just(Invalid::OverTruncate),
        Just(Invalid::WrongLength),
        Just(Invalid::CommitIncomplete),
        Just(Invalid::WriteWithoutReservation),
        Just(Invalid::ReserveTwice),
        Just(Invalid::ReadBeforeWrite),
        Just(Invalid::LayerOutOfRange),
        Just(Invalid::MarkOtherPositions),
    ];
    // Decode-sized (1-2 tokens) and prefill-sized (up to 40) appends.
    let n = prop_oneof![3 => 1usize..=2, 1 => 3usize..=40];
    prop_oneof![
        2 => Just(Op::Add),
        6 => (any::<usize>(), n.clone(), mask()).prop_map(|(pick, n, mask)| Op::Append {
            pick,
            n,
            mask
        }),
        1 => (any::<usize>(), n, any::<usize>(), mask()).prop_map(|(pick, n, writes, mask)| {
            Op::AbortedAppend {
                pick,
                n,
                writes,
                mask,
            }
        }),
        2 => any::<usize>().prop_map(|pick| Op::Fork { pick }),
        2 => (any::<usize>(), 0usize..=20).prop_map(|(pick, n)| Op::Truncate { pick, n }),
        1 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        3 => (any::<usize>(), invalid).prop_map(|(pick, kind)| Op::Invalid { pick, kind }),
    ]
}

/// Which producers (bit `i` for the `i`-th) store their rows outside the cache and mark
/// them: none, all, or a random mix.
fn mask() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), Just(u64::MAX), any::<u64>()]
}

/// A random valid map: layer 0 produces; each later layer produces or reads an earlier
/// producer.
fn random_map(num_layers: usize) -> impl Strategy<Value = KvSharing> {
    proptest::collection::vec((any::<bool>(), any::<usize>()), num_layers).prop_map(|choices| {
        let mut sources = Vec::with_capacity(choices.len());
        let mut producers = Vec::new();
        for (i, (own, pick)) in choices.into_iter().enumerate() {
            if i == 0 || own {
                sources.push(i);
                producers.push(i);
            } else {
                sources.push(producers[pick % producers.len()]);
            }
        }
        KvSharing::from_sources("test", sources).expect("valid by construction")
    })
}

fn sharing() -> impl Strategy<Value = KvSharing> {
    (1usize..=8).prop_flat_map(|l| {
        let patterns = prop_oneof![
            Just(SharingPattern::None),
            (2usize..=4).prop_map(SharingPattern::Cla),
            (2usize..=3).prop_map(SharingPattern::Hunyuan),
            Just(SharingPattern::Cla2KeepEnds),
            Just(SharingPattern::Cla2DenseFront),
            Just(SharingPattern::Cla2DenseBack),
        ]
        .prop_filter_map("pattern needs more layers", move |p| p.build(l).ok());
        prop_oneof![patterns, random_map(l)]
    })
}

struct Harness {
    cache: PagedKvCache,
    naive: BTreeMap<SequenceId, NaiveSeq>,
    dead: Vec<SequenceId>,
    dtype: KvDType,
    rng: u64,
}

impl Harness {
    fn live(&self, pick: usize) -> Option<SequenceId> {
        let ids: Vec<_> = self.naive.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[pick % ids.len()])
    }

    fn sharing(&self) -> &KvSharing {
        self.cache.sharing()
    }

    fn width(&self) -> usize {
        self.cache.shape().kv_width()
    }

    /// Pseudo-random data in [-4, 4).
    fn data(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                self.rng = self
                    .rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.rng >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
            })
            .collect()
    }

    /// What the cache should return for a written value.
    fn stored(&self, x: &[f32]) -> Vec<f32> {
        match self.dtype {
            KvDType::F32 => x.to_vec(),
            KvDType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        }
    }

    /// K/V for `n` tokens of every producer layer, keyed by layer.
    fn make_kv(&mut self, n: usize) -> BTreeMap<usize, (Vec<f32>, Vec<f32>)> {
        let producers = self.sharing().producers().to_vec();
        let w = self.width();
        producers
            .into_iter()
            .map(|p| (p, (self.data(n * w), self.data(n * w))))
            .collect()
    }

    /// Asserts that `f` fails with an error matching `expected`, and changes nothing.
    fn expect_unchanged(
        &mut self,
        f: impl FnOnce(&mut PagedKvCache) -> Result<(), KvError>,
        expected: impl Fn(&KvError) -> bool,
    ) {
        let before = self.cache.clone();
        let err = f(&mut self.cache).expect_err("an invalid operation succeeded");
        assert!(expected(&err), "unexpected error: {err}");
        assert!(
            self.cache == before,
            "a failed operation changed the cache: {err}"
        );
    }

    /// Stores producer `layer`'s rows of the reserved `positions`: through `write`, or
    /// (`external`) straight into the storage, addressed through the block table and the
    /// layout as a kernel does, then `mark_written`.
    fn store(
        &mut self,
        seq: SequenceId,
        layer: usize,
        positions: std::ops::Range<usize>,
        keys: &[f32],
        values: &[f32],
        external: bool,
    ) {
        if !external {
            self.cache.write(seq, layer, keys, values).unwrap();
            return;
        }
        let w = self.width();
        let bs = self.cache.config().block_size;
        let slot = self.sharing().slot_of(layer);
        let blocks = self.cache.block_table(seq).unwrap().blocks().to_vec();
        for (i, pos) in positions.clone().enumerate() {
            let row = i * w..(i + 1) * w;
            self.cache.storage_mut().write_tokens(
                slot,
                blocks[pos / bs],
                pos % bs,
                &keys[row.clone()],
                &values[row],
            );
        }
        // Marking again changes nothing.
        for _ in 0..1 + positions.len() % 2 {
            self.cache
                .mark_written(seq, layer, positions.clone())
                .unwrap();
        }
    }

    fn append(&mut self, seq: SequenceId, n: usize, mask: u64) {
        let fits = self.cache.can_reserve(seq, n).unwrap();
        let needed = self.cache.blocks_needed(seq, n).unwrap();
        if !fits {
            self.expect_unchanged(
                |c| c.reserve(seq, n).map(drop),
                |e| matches!(e, KvError::CacheFull { needed_blocks, .. } if *needed_blocks == needed),
            );
            return;
        }
        let free_before = self.cache.num_free_blocks();
        let len = self.cache.seq_len(seq).unwrap();
        assert_eq!(self.cache.reserve(seq, n).unwrap(), len..len + n);
        assert_eq!(self.cache.num_free_blocks(), free_before - needed);
        let kv = self.make_kv(n);
        for (i, (&layer, (k, v))) in kv.iter().enumerate() {
            self.store(seq, layer, len..len + n, k, v, marked(mask, i));
        }
        assert_eq!(self.cache.commit(seq).unwrap(), len + n);
        let sharing = self.sharing().clone();
        let stored: BTreeMap<usize, (Vec<f32>, Vec<f32>)> = kv
            .iter()
            .map(|(&l, (k, v))| (l, (self.stored(k), self.stored(v))))
            .collect();
        let naive = self.naive.get_mut(&seq).unwrap();
        for (layer, (k, v)) in naive.iter_mut().enumerate() {
            let (pk, pv) = &stored[&sharing.producer_of(layer)];
            k.extend_from_slice(pk);
            v.extend_from_slice(pv);
        }
    }

    fn aborted_append(&mut self, seq: SequenceId, n: usize, writes: usize, mask: u64) {
        if !self.cache.can_reserve(seq, n).unwrap() {
            return;
        }
        let free_before = self.cache.num_free_blocks();
        let reserved = self.cache.reserve(seq, n).unwrap();
        let kv = self.make_kv(n);
        let sharing = self.sharing().clone();
        let writes = writes % (sharing.num_producers() + 1);
        let written: Vec<usize> = sharing.producers()[..writes].to_vec();
        for (i, &layer) in written.iter().enumerate() {
            let (k, v) = &kv[&layer];
            self.store(seq, layer, reserved.clone(), k, v, marked(mask, i));
        }
        // Layers whose producer wrote see the reserved tokens; the others are refused.
        for layer in 0..sharing.num_layers() {
            let p = sharing.producer_of(layer);
            match self.cache.read(seq, layer) {
                Ok((k, v)) => {
                    let (nk, nv) = &self.naive[&seq][layer];
                    let (wk, wv) = &kv[&p];
                    assert_eq!(k, [nk.clone(), self.stored(wk)].concat());
                    assert_eq!(v, [nv.clone(), self.stored(wv)].concat());
                }
                Err(e) => {
                    assert!(!written.contains(&p), "layer {layer}: {e}");
                    assert!(matches!(e, KvError::NotWritten { producer, .. } if producer == p));
                }
            }
        }
        if writes < sharing.num_producers() {
            let missing = sharing.producers()[writes..].to_vec();
            self.expect_unchanged(
                |c| c.commit(seq).map(drop),
                |e| matches!(e, KvError::Incomplete { missing: m, .. } if *m == missing),
            );
        }
        self.cache.abort(seq).unwrap();
        // A copy-on-write copy may stay; nothing else.
        assert!(free_before - self.cache.num_free_blocks() <= 1);
    }

    fn invalid(&mut self, pick: usize, kind: Invalid) {
        let Some(seq) = self.live(pick) else {
            return;
        };
        let sharing = self.sharing().clone();
        let w = self.width();
        match kind {
            Invalid::UnknownSequence => {
                let Some(&dead) = self.dead.last() else {
                    return;
                };
                let unknown = |e: &KvError| matches!(e, KvError::UnknownSequence(s) if *s == dead);
                self.expect_unchanged(|c| c.reserve(dead, 1).map(drop), unknown);
                self.expect_unchanged(|c| c.write(dead, 0, &[], &[]), unknown);
                self.expect_unchanged(|c| c.mark_written(dead, 0, 0..1), unknown);
                self.expect_unchanged(|c| c.commit(dead).map(drop), unknown);
                self.expect_unchanged(|c| c.abort(dead), unknown);
                self.expect_unchanged(|c| c.truncate(dead, 0), unknown);
                self.expect_unchanged(|c| c.fork(dead).map(drop), unknown);
                self.expect_unchanged(|c| c.free(dead), unknown);
                self.expect_unchanged(|c| c.read(dead, 0).map(drop), unknown);
            }
            Invalid::OverCapacity => {
                let bs = self.cache.config().block_size;
                let n = (self.cache.num_free_blocks() + 1) * bs + 1;
                self.expect_unchanged(
                    |c| c.reserve(seq, n).map(drop),
                    |e| matches!(e, KvError::CacheFull { .. }),
                );
                self.expect_unchanged(
                    |c| c.reserve(seq, usize::MAX).map(drop),
                    |e| matches!(e, KvError::CacheFull { .. }),
                );
            }
            Invalid::ConsumerWrite => {
                let Some(layer) = (0..sharing.num_layers()).find(|&l| !sharing.is_producer(l))
                else {
                    return;
                };
                if !self.cache.can_reserve(seq, 1).unwrap() {
                    return;
                }
                let reserved = self.cache.reserve(seq, 1).unwrap();
                let kv = self.data(w);
                let consumer = |e: &KvError| {
                    matches!(e, KvError::ConsumerLayer { layer: l, producer }
                        if *l == layer && *producer == sharing.producer_of(layer))
                };
                self.expect_unchanged(|c| c.write(seq, layer, &kv, &kv), consumer);
                self.expect_unchanged(|c| c.mark_written(seq, layer, reserved), consumer);
                self.cache.abort(seq).unwrap();
            }
            Invalid::OverTruncate => {
                let len = self.cache.seq_len(seq).unwrap();
                self.expect_unchanged(
                    |c| c.truncate(seq, len + 1 + pick % 3),
                    |e| matches!(e, KvError::TruncateTooLong { len: l, .. } if *l == len),
                );
            }
            Invalid::WrongLength => {
                if !self.cache.can_reserve(seq, 2).unwrap() {
                    return;
                }
                self.cache.reserve(seq, 2).unwrap();
                let good = self.data(2 * w);
                let bad = self.data(2 * w - 1 - pick % 2);
                let wrong = |e: &KvError| matches!(e, KvError::WrongLength { .. });
                self.expect_unchanged(|c| c.write(seq, 0, &bad, &good), wrong);
                self.expect_unchanged(|c| c.write(seq, 0, &good, &bad), wrong);
                self.expect_unchanged(|c| c.write(seq, 0, &[], &[]), wrong);
                self.cache.abort(seq).unwrap();
            }
            Invalid::CommitIncomplete => {
                if !self.cache.can_reserve(seq, 1).unwrap() {
                    return;
                }
                self.cache.reserve(seq, 1).unwrap();
                let missing = sharing.producers().to_vec();
                self.expect_unchanged(
                    |c| c.commit(seq).map(drop),
                    |e| matches!(e, KvError::Incomplete { missing: m, .. } if *m == missing),
                );
                self.cache.abort(seq).unwrap();
            }
            Invalid::WriteWithoutReservation => {
                let kv = self.data(w);
                let len = self.cache.seq_len(seq).unwrap();
                let none = |e: &KvError| matches!(e, KvError::NoReservation(_));
                self.expect_unchanged(|c| c.write(seq, 0, &kv, &kv), none);
                self.expect_unchanged(|c| c.mark_written(seq, 0, len..len + 1), none);
                self.expect_unchanged(|c| c.commit(seq).map(drop), none);
                self.expect_unchanged(|c| c.abort(seq), none);
            }
            Invalid::ReserveTwice => {
                if !self.cache.can_reserve(seq, 1).unwrap() {
                    return;
                }
                self.cache.reserve(seq, 1).unwrap();
                let open = |e: &KvError| matches!(e, KvError::ReservationOpen(_));
                self.expect_unchanged(|c| c.reserve(seq, 1).map(drop), open);
                self.expect_unchanged(|c| c.truncate(seq, 0), open);
                self.expect_unchanged(|c| c.fork(seq).map(drop), open);
                self.cache.abort(seq).unwrap();
            }
            Invalid::ReadBeforeWrite => {
                if !self.cache.can_reserve(seq, 1).unwrap() {
                    return;
                }
                self.cache.reserve(seq, 1).unwrap();
                let layer = pick % sharing.num_layers();
                self.expect_unchanged(
                    |c| c.read(seq, layer).map(drop),
                    |e| matches!(e, KvError::NotWritten { .. }),
                );
                self.cache.abort(seq).unwrap();
            }
            Invalid::LayerOutOfRange => {
                let layer = sharing.num_layers() + pick % 3;
                let out = |e: &KvError| matches!(e, KvError::LayerOutOfRange { .. });
                self.expect_unchanged(|c| c.read(seq, layer).map(drop), out);
                let kv = self.data(w);
                self.expect_unchanged(|c| c.write(seq, layer, &kv, &kv), out);
                self.expect_unchanged(|c| c.mark_written(seq, layer, 0..1), out);
            }
            Invalid::MarkOtherPositions => {
                let n = 1 + pick % 3;
                if !self.cache.can_reserve(seq, n).unwrap() {
                    return;
                }
                let r = self.cache.reserve(seq, n).unwrap();
                let producer = sharing.producers()[pick % sharing.num_producers()];
                let (s, e) = (r.start, r.end);
                let mut wrong = vec![s + 1..e + 1, s..e + 1, s..e - 1, e..e, s..s, 0..e + n];
                if s > 0 {
                    wrong.push(s - 1..e - 1);
                    wrong.push(0..e);
                }
                for positions in wrong {
                    let given = positions.clone();
                    self.expect_unchanged(
                        |c| c.mark_written(seq, producer, positions),
                        |err| {
                            matches!(err, KvError::NotReserved { seq: q, positions: p, reserved }
                                if *q == seq && *p == given && *reserved == r)
                        },
                    );
                }
                // Nothing was recorded: the producer still has to write.
                self.expect_unchanged(
                    |c| c.commit(seq).map(drop),
                    |err| matches!(err, KvError::Incomplete { missing, .. } if missing.contains(&producer)),
                );
                self.cache.abort(seq).unwrap();
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Add => {
                let id = self.cache.add_sequence();
                let layers = self.sharing().num_layers();
                self.naive
                    .insert(id, vec![(Vec::new(), Vec::new()); layers]);
            }
            Op::Append { pick, n, mask } => {
                if let Some(seq) = self.live(pick) {
                    self.append(seq, n, mask);
                }
            }
            Op::AbortedAppend {
                pick,
                n,
                writes,
                mask,
            } => {
                if let Some(seq) = self.live(pick) {
                    self.aborted_append(seq, n, writes, mask);
                }
            }
            Op::Fork { pick } => {
                if let Some(seq) = self.live(pick) {
                    let used = self.cache.memory().used_blocks;
                    let child = self.cache.fork(seq).unwrap();
                    assert_eq!(self.cache.memory().used_blocks, used, "fork allocated");
                    let copy = self.naive[&seq].clone();
                    self.naive.insert(child, copy);
                }
            }
            Op::Truncate { pick, n } => {
                if let Some(seq) = self.live(pick) {
                    let n = n.min(self.cache.seq_len(seq).unwrap());
                    self.cache.truncate(seq, n).unwrap();
                    let w = self.width();
                    for (k, v) in self.naive.get_mut(&seq).unwrap() {
                        k.truncate(k.len() - n * w);
                        v.truncate(v.len() - n * w);
                    }
                }
            }
            Op::Free { pick } => {
                if let Some(seq) = self.live(pick) {
                    self.cache.free(seq).unwrap();
                    self.naive.remove(&seq);
                    self.dead.push(seq);
                }
            }
            Op::Invalid { pick, kind } => self.invalid(pick, kind),
        }
    }

    /// Every layer of every sequence reads what the naive model holds, through both the
    /// dense read and the in-place block view; the bookkeeping is consistent.
    fn check(&self) {
        let w = self.width();
        let bs = self.cache.config().block_size;
        let d = self.cache.shape().head_dim();
        let heads = self.cache.shape().num_kv_heads();
        let mut refs: BTreeMap<BlockId, usize> = BTreeMap::new();
        for (&seq, layers) in &self.naive {
            let len = self.cache.seq_len(seq).unwrap();
            let table = self.cache.block_table(seq).unwrap();
            assert_eq!(table.blocks().len(), len.div_ceil(bs));
            assert_eq!(table.as_u32().len(), table.blocks().len());
            for &b in table.blocks() {
                *refs.entry(b).or_default() += 1;
            }
            for (layer, (nk, nv)) in layers.iter().enumerate() {
                assert_eq!(nk.len(), len * w);
                let (k, v) = self.cache.read(seq, layer).unwrap();
                assert!(k == *nk && v == *nv, "{seq} layer {layer} differs");
                // The in-place view, re-assembled token-major.
                let mut vk = vec![0.0; len * w];
                let mut vv = vec![0.0; len * w];
                let mut blocks = 0;
                for block in self.cache.blocks(seq, layer).unwrap() {
                    assert_eq!(block.start, blocks * bs);
                    blocks += 1;
                    for h in 0..heads {
                        let kh = block.keys_of_head(h).unwrap().to_f32_vec();
                        let vh = block.values_of_head(h).unwrap().to_f32_vec();
                        assert_eq!(kh.len(), block.len * d);
                        for t in 0..block.len {
                            let at = (block.start + t) * w + h * d;
                            vk[at..at + d].copy_from_slice(&kh[t * d..(t + 1) * d]);
                            vv[at..at + d].copy_from_slice(&vh[t * d..(t + 1) * d]);
                        }
                    }
                }
                assert_eq!(blocks, len.div_ceil(bs));
                assert!(
                    vk == *nk && vv == *nv,
                    "{seq} layer {layer}: block view differs"
                );
            }
        }
        let alloc = self.cache.allocator();
        assert_eq!(alloc.num_used(), refs.len());
        for (&b, &n) in &refs {
            assert_eq!(alloc.ref_count(b), n, "{b}");
        }
        let mem = self.cache.memory();
        assert_eq!(mem.used_blocks, refs.len());
        assert_eq!(mem.reserved_bytes, refs.len() as u64 * mem.block_bytes);
        assert_eq!(mem.free_blocks() * bs, self.cache.free_tokens());
    }
}

/// Whether the `i`-th producer stores its rows outside the cache.
fn marked(mask: u64, i: usize) -> bool {
    mask >> (i % 64) & 1 == 1
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn cache_matches_a_dense_per_layer_model(
        sharing in sharing(),
        num_kv_heads in 1usize..=2,
        head_dim in prop_oneof![Just(2usize), Just(4)],
        block_size in prop_oneof![Just(1usize), Just(2), Just(3), Just(4), Just(16)],
        num_blocks in 1usize..=24,
        dtype in prop_oneof![Just(KvDType::F32), Just(KvDType::F16)],
        ops in proptest::collection::vec(op(), 1..60),
        seed in any::<u64>(),
    ) {
        let shape = KvShape::new(num_kv_heads, head_dim, sharing).unwrap();
        let config = KvCacheConfig::new(num_blocks, dtype).with_block_size(block_size);
        let mut h = Harness {
            cache: PagedKvCache::new(shape, config).unwrap(),
            naive: BTreeMap::new(),
            dead: Vec::new(),
            dtype,
            rng: seed,
        };
        for op in ops {
            h.apply(op);
            h.check();
        }
        // No leaks: freeing every sequence frees every block.
        let ids: Vec<_> = h.naive.keys().copied().collect();
        for id in ids {
            h.cache.free(id).unwrap();
        }
        prop_assert_eq!(h.cache.num_free_blocks(), num_blocks);
        prop_assert_eq!(h.cache.memory().reserved_bytes, 0);
        prop_assert_eq!(h.cache.memory().stored_tokens, 0);
    }
}
