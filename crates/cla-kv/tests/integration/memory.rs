//! Memory accounting: the cache's bytes agree exactly with cla-core's
//! `kv_bytes_per_token`, and sharing shrinks the footprint by exactly
//! `num_producers / num_layers` (one half for CLA2), as in the paper's Table 1.

use cla_core::memory::kv_bytes_per_token;
use cla_core::{KvSharing, ModelConfig, SharingPattern};
use cla_kv::{KvCacheConfig, KvDType, KvError, KvShape, PagedKvCache, SequenceId};

/// A 1B-class model of the paper (d_model 2048, 20 layers, head_dim 128).
fn model(kv_heads: usize, sharing: &KvSharing) -> ModelConfig {
    let json = format!(
        r#"{{"hidden_size": 2048, "intermediate_size": 5472, "num_hidden_layers": {},
            "num_attention_heads": 16, "num_key_value_heads": {kv_heads}, "head_dim": 128,
            "vocab_size": 32000, "max_position_embeddings": 2048,
            "kv_source_layers": {:?}}}"#,
        sharing.num_layers(),
        sharing.sources()
    );
    ModelConfig::from_json_str(&json, "test").unwrap()
}

/// Appends `n` tokens of zeros to every producer of `seq`.
fn append(cache: &mut PagedKvCache, seq: SequenceId, n: usize) -> Result<(), KvError> {
    cache.reserve(seq, n)?;
    let zeros = vec![0.0; n * cache.shape().kv_width()];
    for layer in cache.sharing().producers().to_vec() {
        cache.write(seq, layer, &zeros, &zeros)?;
    }
    cache.commit(seq).map(drop)
}

/// The same workload on any map: three sequences of 1, 37 and 100 tokens, a fork of the
/// second that appends 5 more (copy-on-write of its partial block).
fn workload(config: &ModelConfig, dtype: KvDType) -> PagedKvCache {
    let shape = KvShape::from_model(config).unwrap();
    let mut cache = PagedKvCache::new(shape, KvCacheConfig::new(64, dtype)).unwrap();
    let mut seqs = Vec::new();
    for n in [1, 37, 100] {
        let s = cache.add_sequence();
        append(&mut cache, s, n).unwrap();
        seqs.push(s);
    }
    let child = cache.fork(seqs[1]).unwrap();
    append(&mut cache, child, 5).unwrap();
    cache
}

#[test]
fn sharing_divides_the_footprint_by_exactly_layers_over_producers() {
    let none = SharingPattern::None.build(20).unwrap();
    for dtype in KvDType::ALL {
        let base = workload(&model(8, &none), dtype).memory();
        let patterns = [
            SharingPattern::Cla(2),
            SharingPattern::Cla(3),
            SharingPattern::Cla(4),
            SharingPattern::Hunyuan(3),
            SharingPattern::Cla2KeepEnds,
            SharingPattern::Cla2DenseFront,
            SharingPattern::Cla2DenseBack,
        ];
        for p in patterns {
            let sharing = p.build(20).unwrap();
            let mem = workload(&model(8, &sharing), dtype).memory();
            let (np, nl) = (sharing.num_producers() as u64, 20u64);
            // Same blocks, fewer slots: the bytes scale by num_producers / num_layers.
            assert_eq!(mem.used_blocks, base.used_blocks, "{p}");
            assert_eq!(
                mem.reserved_bytes * nl,
                base.reserved_bytes * np,
                "{p} {dtype}"
            );
            assert_eq!(mem.used_bytes * nl, base.used_bytes * np, "{p} {dtype}");
            assert_eq!(
                mem.capacity_bytes * nl,
                base.capacity_bytes * np,
                "{p} {dtype}"
            );
            // Per slot, nothing changes.
            assert_eq!(
                mem.reserved_bytes_per_slot(),
                base.reserved_bytes_per_slot()
            );
            if p == SharingPattern::Cla(2) {
                assert_eq!(mem.reserved_bytes * 2, base.reserved_bytes);
                assert_eq!(mem.used_bytes * 2, base.used_bytes);
            }
        }
    }
}

#[test]
fn bytes_agree_exactly_with_cla_core() {
    for p in [
        SharingPattern::None,
        SharingPattern::Cla(2),
        SharingPattern::Cla(3),
    ] {
        let sharing = p.build(20).unwrap();
        for kv_heads in [1, 4, 8] {
            let config = model(kv_heads, &sharing);
            for dtype in KvDType::ALL {
                let per_token = kv_bytes_per_token(&config, dtype.to_dtype());
                let shape = KvShape::from_model(&config).unwrap();
                let cfg = KvCacheConfig::new(40, dtype);
                let mut cache = PagedKvCache::new(shape, cfg).unwrap();
                assert_eq!(cache.bytes_per_token(), per_token);
                assert_eq!(cache.layout().total_bytes(), 40 * 16 * per_token);
                let mut held = 0;
                let mut tokens = 0;
                for n in [1usize, 16, 17, 100] {
                    let s = cache.add_sequence();
                    append(&mut cache, s, n).unwrap();
                    let blocks = n.div_ceil(16) as u64;
                    // Reserved = whole blocks; used = the tokens themselves.
                    assert_eq!(
                        cache.sequence_reserved_bytes(s).unwrap(),
                        blocks * 16 * per_token
                    );
                    held += blocks;
                    tokens += n as u64;
                }
                let mem = cache.memory();
                assert_eq!(mem.block_bytes, 16 * per_token);
                assert_eq!(mem.reserved_bytes, held * 16 * per_token);
                assert_eq!(mem.used_bytes, tokens * per_token);
                assert_eq!(mem.capacity_bytes, 40 * 16 * per_token);
                let slots = sharing.num_producers() as u64;
                assert_eq!(mem.reserved_bytes_per_slot() * slots, mem.reserved_bytes);
                assert_eq!(mem.used_bytes_per_slot() * slots, mem.used_bytes);
                assert_eq!(mem.capacity_bytes_per_slot() * slots, mem.capacity_bytes);
            }
        }
    }
}

#[test]
fn paper_table_1_bytes_per_token() {
    // (kv heads, pattern, bytes per token at 16 bits) from Table 1.
    let rows = [
        (16, SharingPattern::None, 163_840),
        (1, SharingPattern::None, 10_240),
        (1, SharingPattern::Cla(2), 5_120),
        (4, SharingPattern::Cla(2), 20_480),
        (1, SharingPattern::Cla(3), 3_584),
        (1, SharingPattern::Cla(4), 2_560),
        (1, SharingPattern::Cla2KeepEnds, 5_632),
    ];
    for (kv_heads, p, bytes) in rows {
        let shape = KvShape::new(kv_heads, 128, p.build(20).unwrap()).unwrap();
        let cache = PagedKvCache::new(shape, KvCacheConfig::new(1, KvDType::F16)).unwrap();
        assert_eq!(
            cache.bytes_per_token(),
            bytes,
            "{p} with {kv_heads} kv heads"
        );
    }
}

#[test]
fn a_byte_budget_holds_twice_the_tokens_with_cla2() {
    let budget = 64 << 20;
    let none = KvShape::new(8, 128, SharingPattern::None.build(20).unwrap()).unwrap();
    let cla2 = KvShape::new(8, 128, SharingPattern::Cla(2).build(20).unwrap()).unwrap();
    let a = KvCacheConfig::from_byte_budget(&none, budget, 16, KvDType::F16).unwrap();
    let b = KvCacheConfig::from_byte_budget(&cla2, budget, 16, KvDType::F16).unwrap();
    assert_eq!(a.block_bytes(&none), 16 * 81_920);
    assert_eq!(a.num_blocks, (budget / (16 * 81_920)) as usize);
    assert_eq!(b.num_blocks, (budget / (16 * 40_960)) as usize);
    assert!(a.capacity_bytes(&none) <= budget && b.capacity_bytes(&cla2) <= budget);
    assert_eq!(b.num_blocks, 2 * a.num_blocks);
    let e = KvCacheConfig::from_byte_budget(&none, 1000, 16, KvDType::F16).unwrap_err();
    assert!(matches!(e, KvError::InvalidConfig { .. }));
}

#[test]
fn admission_and_free_tokens() {
    let shape = KvShape::new(1, 2, SharingPattern::Cla(2).build(4).unwrap()).unwrap();
    let config = KvCacheConfig::new(4, KvDType::F32).with_block_size(4);
    let mut cache = PagedKvCache::new(shape, config).unwrap();
    assert_eq!(cache.free_tokens(), 16);
    assert!(cache.can_admit(16) && !cache.can_admit(17));
    let s = cache.add_sequence();
    append(&mut cache, s, 5).unwrap(); // two blocks
    assert_eq!(cache.free_tokens(), 8);
    assert!(cache.can_admit(8) && !cache.can_admit(9));
    // Three more tokens fit in the partial block; a fourth needs a new block.
    assert_eq!(cache.blocks_needed(s, 3).unwrap(), 0);
    assert_eq!(cache.blocks_needed(s, 4).unwrap(), 1);
    assert!(cache.can_reserve(s, 11).unwrap() && !cache.can_reserve(s, 12).unwrap());
    let before = cache.clone();
    let e = append(&mut cache, s, 12).unwrap_err();
    assert_eq!(
        e,
        KvError::CacheFull {
            needed_blocks: 3,
            free_blocks: 2
        }
    );
    assert!(cache == before);
}

#[test]
fn fork_shares_blocks_and_copies_the_partial_one_on_write() {
    let shape = KvShape::new(1, 2, SharingPattern::Cla(2).build(4).unwrap()).unwrap();
    let config = KvCacheConfig::new(8, KvDType::F32).with_block_size(4);
    let mut cache = PagedKvCache::new(shape, config).unwrap();
    let parent = cache.add_sequence();
    append(&mut cache, parent, 6).unwrap(); // one full block, one with 2 tokens
    let child = cache.fork(parent).unwrap();
    let mem = cache.memory();
    assert_eq!((mem.used_blocks, mem.stored_tokens), (2, 6));
    let shared = cache.block_table(parent).unwrap().blocks().to_vec();
    assert_eq!(cache.block_table(child).unwrap().blocks(), shared);
    assert!(shared.iter().all(|&b| cache.allocator().ref_count(b) == 2));
    // The child appends into the shared partial block: it gets a copy.
    append(&mut cache, child, 1).unwrap();
    let t = cache.block_table(child).unwrap().blocks().to_vec();
    assert_eq!(t[0], shared[0]);
    assert_ne!(t[1], shared[1]);
    assert_eq!(cache.allocator().ref_count(shared[1]), 1);
    // The parent now owns its partial block alone and writes in place.
    append(&mut cache, parent, 1).unwrap();
    assert_eq!(cache.block_table(parent).unwrap().blocks(), shared);
    assert_eq!(cache.memory().used_blocks, 3);
    cache.free(parent).unwrap();
    cache.free(child).unwrap();
    assert_eq!(cache.num_free_blocks(), 8);
}
