//! Append and read throughput of the paged KV cache on a 1B-class shape of the paper
//! (8 kv heads x 128 head_dim, CLA2 on 20 layers: 10 producer slots), for decode-sized
//! steps (1 token x many sequences) and prefill-sized ones (512 tokens).
//!
//! Throughput is reported in bytes of the cache touched: appends count the stored bytes
//! (`tokens * kv_bytes_per_token`); reads count what attention reads, every layer
//! re-reading its producer's slot (`num_layers * tokens * 2 * kv_width * element size`).

use cla_core::SharingPattern;
use cla_kv::{KvCacheConfig, KvDType, KvShape, PagedKvCache, SequenceId};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

const LAYERS: usize = 20;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const DECODE_SEQS: usize = 32;
const DECODE_HISTORY: usize = 256;
const PREFILL: usize = 512;

fn shape() -> KvShape {
    KvShape::new(
        KV_HEADS,
        HEAD_DIM,
        SharingPattern::Cla(2).build(LAYERS).unwrap(),
    )
    .unwrap()
}

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 251) as f32 * 0.01 - 1.0).collect()
}

/// Reserve, write every producer, commit.
fn append(cache: &mut PagedKvCache, seq: SequenceId, kv: &[f32], n: usize) {
    cache.reserve(seq, n).unwrap();
    for i in 0..cache.sharing().num_producers() {
        let layer = cache.sharing().producers()[i];
        cache.write(seq, layer, kv, kv).unwrap();
    }
    cache.commit(seq).unwrap();
}

/// A cache holding `seqs` sequences of `history` tokens, with room for more.
fn filled(
    dtype: KvDType,
    seqs: usize,
    history: usize,
    spare: usize,
) -> (PagedKvCache, Vec<SequenceId>) {
    let blocks = seqs * (history + spare).div_ceil(16) + 1;
    let mut cache = PagedKvCache::new(shape(), KvCacheConfig::new(blocks, dtype)).unwrap();
    let kv = data(history * KV_HEADS * HEAD_DIM);
    let ids = (0..seqs)
        .map(|_| {
            let s = cache.add_sequence();
            if history > 0 {
                append(&mut cache, s, &kv, history);
            }
            s
        })
        .collect();
    (cache, ids)
}

/// Attention-shaped scan of one layer of one sequence, in place: a score `q . k` for
/// every key row and a weighted sum of the value rows, one query per kv head.
fn scan(cache: &PagedKvCache, seq: SequenceId, layer: usize, q: &[f32], out: &mut [f32]) -> f32 {
    let mut acc = 0.0;
    for block in cache.blocks(seq, layer).unwrap() {
        for h in 0..KV_HEADS {
            let k = block.keys_of_head(h).unwrap();
            let v = block.values_of_head(h).unwrap();
            for t in 0..block.len {
                let s = k.sub(t * HEAD_DIM, HEAD_DIM).unwrap().dot(q);
                v.sub(t * HEAD_DIM, HEAD_DIM)
                    .unwrap()
                    .add_scaled_into(s * 1e-3, out);
                acc += s;
            }
        }
    }
    acc
}

fn bench(c: &mut Criterion) {
    let kv_width = KV_HEADS * HEAD_DIM;
    for dtype in KvDType::ALL {
        let per_token = shape().bytes_per_token(dtype);
        let read_per_token = (LAYERS * 2 * kv_width * dtype.size_bytes()) as u64;

        // Decode-sized append: 1 token into each of DECODE_SEQS sequences, then rolled
        // back (truncate moves no data) so every iteration sees the same state.
        let mut g = c.benchmark_group(format!("append/{dtype}"));
        let (mut cache, ids) = filled(dtype, DECODE_SEQS, DECODE_HISTORY, 16);
        let one = data(kv_width);
        g.throughput(Throughput::Bytes(DECODE_SEQS as u64 * per_token));
        g.bench_function(
            BenchmarkId::new("decode", format!("{DECODE_SEQS}x1")),
            |b| {
                b.iter(|| {
                    for &s in &ids {
                        append(&mut cache, s, &one, 1);
                    }
                    for &s in &ids {
                        cache.truncate(s, 1).unwrap();
                    }
                })
            },
        );
        drop(cache);

        // Prefill-sized append: PREFILL tokens into one sequence, then rolled back.
        let (mut cache, ids) = filled(dtype, 1, 0, PREFILL);
        let prompt = data(PREFILL * kv_width);
        g.throughput(Throughput::Bytes(PREFILL as u64 * per_token));
        g.bench_function(BenchmarkId::new("prefill", PREFILL), |b| {
            b.iter(|| {
                append(&mut cache, ids[0], &prompt, PREFILL);
                cache.truncate(ids[0], PREFILL).unwrap();
            })
        });
        g.finish();
        drop(cache);

        let mut g = c.benchmark_group(format!("read/{dtype}"));
        // Decode-sized read: every layer of every sequence, in place (the decoder's path).
        let (cache, ids) = filled(dtype, DECODE_SEQS, DECODE_HISTORY, 0);
        let q = data(HEAD_DIM);
        let mut out = vec![0.0; HEAD_DIM];
        g.throughput(Throughput::Bytes(
            (DECODE_SEQS * DECODE_HISTORY) as u64 * read_per_token,
        ));
        g.bench_function(
            BenchmarkId::new(
                "decode_view_scan",
                format!("{DECODE_SEQS}x{DECODE_HISTORY}"),
            ),
            |b| {
                b.iter(|| {
                    let mut acc = 0.0;
                    for &s in &ids {
                        for layer in 0..LAYERS {
                            acc += scan(&cache, s, layer, &q, &mut out);
                        }
                    }
                    black_box(acc)
                })
            },
        );
        // The same bytes gathered into dense f32 buffers (copy + conversion).
        let mut k = vec![0.0; DECODE_HISTORY * kv_width];
        let mut v = vec![0.0; DECODE_HISTORY * kv_width];
        g.bench_function(
            BenchmarkId::new("decode_gather", format!("{DECODE_SEQS}x{DECODE_HISTORY}")),
            |b| {
                b.iter(|| {
                    for &s in &ids {
                        for layer in 0..LAYERS {
                            cache.read_into(s, layer, &mut k, &mut v).unwrap();
                        }
                    }
                    black_box(k[0] + v[0])
                })
            },
        );
        drop(cache);

        // Prefill-sized read: one sequence of PREFILL tokens, every layer gathered.
        let (cache, ids) = filled(dtype, 1, PREFILL, 0);
        let mut k = vec![0.0; PREFILL * kv_width];
        let mut v = vec![0.0; PREFILL * kv_width];
        g.throughput(Throughput::Bytes(PREFILL as u64 * read_per_token));
        g.bench_function(BenchmarkId::new("prefill_gather", PREFILL), |b| {
            b.iter(|| {
                for layer in 0..LAYERS {
                    cache.read_into(ids[0], layer, &mut k, &mut v).unwrap();
                }
                black_box(k[0] + v[0])
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
