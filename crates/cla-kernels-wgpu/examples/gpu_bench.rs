//! Kernel benchmark: measures what the decoder kernels achieve against the ceiling measured in
//! the same run (buffer-copy bandwidth), and writes a table to stdout and JSON to a file.
//!
//! ```text
//! cargo run --release -p cla-kernels-wgpu --example gpu_bench -- [--quick] [--device SEL] OUT.json
//! ```
//!
//! - copy: `copy_buffer_to_buffer` bandwidth (bytes read + written per second), and the same
//!   copy done by a compute shader (16-byte loads on every SM, [`GpuContext::copy_tensor`]).
//!   The larger of the two is the ceiling for memory-bound kernels: every bandwidth figure is
//!   printed as a percentage of it (and of the compute copy).
//! - dispatch_floor: two dependent one-workgroup dispatches repeated in one compute pass, the
//!   fixed cost of a split + reduce decode call.
//! - attn_decode: paged flash-decoding attention, f16 K/V, head_dim 128: MQA (32 q heads / 1
//!   kv head, and 16 / 1 as in the 1B-class preset) and GQA (32 / 8) by default, GQA2
//!   (32 / 16), MHA (32 / 32) and GQA4 with head_dim 64 when `--layouts` names them;
//!   contexts 1k..32k, batches 1..64 (`--contexts`, `--batches` narrow the sweep); achieved
//!   K/V bytes per second, for each decode kernel the device runs (tiled, lanes, lanes-wide,
//!   coop; see `DecodeKernel`), with the split heuristic's keys per split and with each of
//!   `--chunks N,..`; the repetitions are recorded into one compute pass, as the decoder
//!   records a step. Configurations whose K/V region exceeds the adapter's storage-binding
//!   limit are skipped.
//! - matmul: tiled prefill matmul at 4096^3, f32 and f16 weights, every portable tile
//!   (T4, T8, register-tiled R64); FLOP/s, and the percentage of `--ref-tflops X` (e.g. the
//!   card's measured bf16 tensor rate) when given.
//! - matmul_coopmat: the cooperative-matrix (tensor core) f16 matmul when the adapter offers
//!   it, at 4096^3 and 8192x4096x4096, two shapes with edges (4000x3000x4096: m, n off the
//!   tiles; 1000x1002x1000: n not a multiple of 4, k not of 16), then 4096^3 again (a shape
//!   that is slower only in the first pass points at the run, not the shape). Per shape: a
//!   `coop_to_f16` row timing the f32 -> f16 activation conversion alone, then per kernel
//!   design (`CoopVariant::ALL`) the full call on f32 activations (conversion into the
//!   context's staging buffer, then the tiles) and, for the designs that read f16, the tile
//!   kernel alone on an f16 copy of the benchmark's own (`x=f16 (tiles only)`). Each result
//!   is checked against the R64 kernel on the same inputs (max |diff| relative to max |ref|,
//!   at most 2e-3; `check` says ok or MISMATCH); FLOP/s and percentage of `--ref-tflops`. A
//!   summary line per shape names the fastest correct full call and tile kernel, the
//!   conversion time, and for the variant `linear` uses how its full call splits into
//!   tiles, conversion and the rest.
//! - token_choice: argmax and sampling (temperature with top-k or top-p) over vocabularies of
//!   32k, 128k and 256k, batch 1 and 32; time per call.
//! - matvec: decode-shaped matrix-vector products (the 1B-class preset's projections and
//!   larger ones); weight bytes per second and FLOP/s. Each repetition reads the next of
//!   enough copies of the weights (256 MiB in all) that they do not stay in the last-level
//!   cache, as in a decode step; the repetitions are recorded into one compute pass. Then
//!   batched-decode shapes (16-64 rows, `linear_rows`) through the matrix-vector kernel, the
//!   register-tiled matmul and (f16, where available) the tensor-core matmul.
//!
//! GPU timestamp queries time the recorded work when the adapter has them; otherwise wall-clock
//! time around submit-and-wait is used (and the JSON says which). `--quick` uses tiny sizes so
//! that the benchmark can be checked on a software adapter (selected with CLA_DEVICE=cpu or
//! `--device cpu`). The cooperative-matrix row says why when the path is unavailable.
//!
//! ```text
//! cargo run --release -p cla-kernels-wgpu --example gpu_bench -- [--quick] [--device SEL] [--ref-tflops X]
//!     [--only attn,matmul,matvec,sample] [--contexts N,..] [--batches N,..] [--chunks N,..]
//!     [--layouts mqa,mqa16,gqa4,gqa2,mha,gqa4-hd64] [--kernels tiled,lanes,lanes-wide,coop] OUT.json
//! ```

use std::fmt::Write as _;
use std::time::Instant;

use cla_kernels_wgpu::ops::attention::{DecodeKernel, DecodeOptions};
use cla_kernels_wgpu::ops::matmul::{CoopVariant, MatmulTile};
use cla_kernels_wgpu::ops::sampling::{SampleParams, uniform_words};
use cla_kernels_wgpu::{
    DType, DeviceSelector, GpuContext, GpuError, KvPool, PagedKvLayout, SeqBatch, SeqDesc,
};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    quick: bool,
    ref_tflops: Option<f64>,
    device: Option<String>,
    /// Sections to run besides the copy ceiling (None: all).
    only: Option<Vec<String>>,
    /// Attention shapes instead of the default sweep, and fixed keys per split to time
    /// besides the heuristic's choice.
    contexts: Option<Vec<usize>>,
    batches: Option<Vec<usize>>,
    chunks: Vec<usize>,
    /// Names from [`ATTN_LAYOUTS`] and [`DECODE_KERNELS`] to time (None: all).
    layouts: Option<Vec<String>>,
    kernels: Option<Vec<String>>,
    /// Where to write the generated WGSL of every kernel variant built (for `kernel_stats`).
    dump_kernels: Option<std::path::PathBuf>,
    out: String,
}

/// Attention layouts of the decode sweep: name, query heads, K/V heads, head_dim, and whether
/// the sweep times it by default (the others only when `--layouts` names them).
const ATTN_LAYOUTS: [(&str, u32, u32, u32, bool); 6] = [
    ("mqa", 32, 1, 128, true),
    ("mqa16", 16, 1, 128, true),
    ("gqa4", 32, 8, 128, true),
    ("gqa2", 32, 16, 128, false),
    ("mha", 32, 32, 128, false),
    ("gqa4-hd64", 32, 8, 64, false),
];
/// Decode kernels of the sweep, by their names on the command line and in the report.
const DECODE_KERNELS: [(&str, DecodeKernel); 4] = [
    ("tiled", DecodeKernel::Tiled),
    ("lanes", DecodeKernel::Lanes),
    ("lanes-wide", DecodeKernel::LanesWide),
    ("coop", DecodeKernel::Coop),
];

/// A comma-separated list of names, each one of `allowed`.
fn name_list(flag: &str, v: Option<String>, allowed: &[&str]) -> BenchResult<Vec<String>> {
    let v = v.ok_or_else(|| format!("{flag} needs a list of: {}", allowed.join(",")))?;
    v.split(',')
        .map(|x| {
            let x = x.trim();
            if allowed.contains(&x) {
                Ok(x.to_owned())
            } else {
                Err(format!("{flag}: `{x}` is not one of {}", allowed.join(",")).into())
            }
        })
        .collect()
}

/// A comma-separated list of positive integers.
fn usize_list(flag: &str, v: Option<String>) -> BenchResult<Vec<usize>> {
    let v = v.ok_or_else(|| format!("{flag} needs a comma-separated list of numbers"))?;
    v.split(',')
        .map(|x| match x.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{flag}: `{x}` is not a positive integer").into()),
        })
        .collect()
}

fn parse_args() -> BenchResult<Args> {
    let mut quick = false;
    let mut device = None;
    let mut ref_tflops = None;
    let mut out = None;
    let mut only = None;
    let mut dump_kernels = None;
    let (mut layouts, mut kernels) = (None, None);
    let (mut contexts, mut batches, mut chunks) = (None, None, Vec::new());
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--device" => device = Some(it.next().ok_or("--device needs a value")?),
            "--only" => {
                only = Some(name_list(
                    "--only",
                    it.next(),
                    &["attn", "matmul", "matvec", "sample"],
                )?)
            }
            "--layouts" => {
                layouts = Some(name_list(
                    "--layouts",
                    it.next(),
                    &ATTN_LAYOUTS.map(|(name, ..)| name),
                )?)
            }
            "--kernels" => {
                kernels = Some(name_list(
                    "--kernels",
                    it.next(),
                    &DECODE_KERNELS.map(|(name, _)| name),
                )?)
            }
            "--contexts" => contexts = Some(usize_list("--contexts", it.next())?),
            "--batches" => batches = Some(usize_list("--batches", it.next())?),
            "--chunks" => chunks = usize_list("--chunks", it.next())?,
            "--dump-kernels" => {
                dump_kernels = Some(it.next().ok_or("--dump-kernels needs a directory")?.into())
            }
            "--ref-tflops" => {
                ref_tflops = Some(
                    it.next()
                        .ok_or("--ref-tflops needs a value")?
                        .parse::<f64>()
                        .map_err(|e| format!("--ref-tflops: {e}"))?,
                )
            }
            "-h" | "--help" => {
                println!(
                    "usage: gpu_bench [--quick] [--device SEL] [--ref-tflops X] [--only attn,matmul,matvec,sample] [--contexts N,..] [--batches N,..] [--chunks N,..] [--layouts mqa,mqa16,gqa4,gqa2,mha,gqa4-hd64] [--kernels tiled,lanes,lanes-wide,coop] [--dump-kernels DIR] OUT.json"
                );
                std::process::exit(0);
            }
            _ if out.is_none() && !a.starts_with("--") => out = Some(a),
            _ => return Err(format!("unexpected argument `{a}`").into()),
        }
    }
    Ok(Args {
        quick,
        ref_tflops,
        device,
        only,
        contexts,
        batches,
        chunks,
        layouts,
        kernels,
        dump_kernels,
        out: out.ok_or("usage: gpu_bench [--quick] [--device SEL] ... OUT.json (see --help)")?,
    })
}

/// GPU-busy time before each measurement.
const WARM_UP: std::time::Duration = std::time::Duration::from_millis(300);
/// Shortest timed window.
const MIN_WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

/// Times at least `iters` repetitions of the recorded work (after a warm-up); returns seconds
/// per repetition and the
/// clock used.
struct Timer<'a> {
    ctx: &'a GpuContext,
    gpu: bool,
}

impl<'a> Timer<'a> {
    fn new(ctx: &'a GpuContext) -> Self {
        let f = ctx.device().features();
        let gpu = f.contains(wgpu::Features::TIMESTAMP_QUERY)
            && f.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
        Self { ctx, gpu }
    }

    fn clock(&self) -> &'static str {
        if self.gpu { "gpu-timestamp" } else { "wall" }
    }

    fn time(
        &self,
        iters: usize,
        record: &mut dyn FnMut(&mut wgpu::CommandEncoder) -> Result<(), GpuError>,
    ) -> BenchResult<f64> {
        self.time_with(iters, false, record)
    }

    /// [`Timer::time`] with the repetitions' dispatches recorded into one compute pass
    /// (`batch_passes`), as the decoder records a step; `record` may only dispatch.
    fn time_in_pass(
        &self,
        iters: usize,
        record: &mut dyn FnMut(&mut wgpu::CommandEncoder) -> Result<(), GpuError>,
    ) -> BenchResult<f64> {
        self.time_with(iters, true, record)
    }

    fn time_with(
        &self,
        iters: usize,
        in_pass: bool,
        record: &mut dyn FnMut(&mut wgpu::CommandEncoder) -> Result<(), GpuError>,
    ) -> BenchResult<f64> {
        let ctx = self.ctx;
        // All of an encoder's repetitions in one pass when asked (ended before the encoder
        // is used for anything else).
        let mut repeat = |enc: &mut wgpu::CommandEncoder, n: usize| -> Result<(), GpuError> {
            let pass = in_pass.then(|| ctx.batch_passes(enc));
            for _ in 0..n {
                record(enc)?;
            }
            drop(pass);
            Ok(())
        };
        // Warm-up: builds pipelines, touches memory, and keeps the GPU busy for WARM_UP so
        // that its clocks are back up after the idle gap of the setup (timing a short window
        // right after an idle host-side gap measured a 4096^3 matmul at a fifth of its speed).
        let start = Instant::now();
        let mut calls = 0usize;
        let mut batch = 1usize;
        while calls == 0 || start.elapsed() < WARM_UP {
            let mut enc = ctx.encoder();
            repeat(&mut enc, batch)?;
            ctx.submit_and_wait(enc)?;
            calls += batch;
            batch = (batch * 2).min(64);
        }
        // Enough repetitions that the timed window is at least MIN_WINDOW.
        let per_call = start.elapsed().as_secs_f64() / calls as f64;
        let iters = iters
            .max((MIN_WINDOW.as_secs_f64() / per_call).ceil() as usize)
            .min(10_000);
        if self.gpu {
            let qs = ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench resolve"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut enc = ctx.encoder();
            enc.write_timestamp(&qs, 0);
            repeat(&mut enc, iters)?;
            enc.write_timestamp(&qs, 1);
            enc.resolve_query_set(&qs, 0..2, &resolve, 0);
            ctx.submit_and_wait(enc)?;
            let bytes = ctx.read_bytes(&resolve)?;
            let t: &[u64] = bytemuck::cast_slice(&bytes);
            let ns =
                t[1].saturating_sub(t[0]) as f64 * f64::from(ctx.queue().get_timestamp_period());
            Ok(ns * 1e-9 / iters as f64)
        } else {
            let mut enc = ctx.encoder();
            repeat(&mut enc, iters)?;
            let start = Instant::now();
            ctx.submit_and_wait(enc)?;
            Ok(start.elapsed().as_secs_f64() / iters as f64)
        }
    }
}

struct Row {
    kind: &'static str,
    params: Vec<(&'static str, String)>,
    seconds: f64,
    bytes_per_s: Option<f64>,
    flops: Option<f64>,
    note: String,
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn main() -> BenchResult<()> {
    let args = parse_args()?;
    let mut sel = match &args.device {
        Some(s) => DeviceSelector::parse(s)?,
        None => DeviceSelector::from_env()?,
    };
    if let Ok(list) = std::env::var(cla_kernels_wgpu::context::DISABLE_ENV) {
        sel.fast_paths = cla_kernels_wgpu::FastPaths::parse_disable(&list)?;
    }
    if args.quick {
        sel = sel.allow_cpu(true);
    }
    let ctx = GpuContext::new(&sel)?;
    let info = ctx.info().clone();
    let feats = ctx.features().clone();
    let timer = Timer::new(&ctx);
    println!(
        "device: {} ({:?}, {:?}), clock: {}",
        info.name,
        info.backend,
        info.device_type,
        timer.clock()
    );
    println!("features: {feats:?}");
    let mut rows: Vec<Row> = Vec::new();
    let q = args.quick;
    let want = |section: &str| {
        args.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == section))
    };

    // 1. Copy bandwidth: the ceiling.
    let copy_bytes: u64 = if q { 4 << 20 } else { 512 << 20 };
    let copy_bytes = copy_bytes.min(feats.max_buffer_size / 2);
    let src = ctx.create_tensor(&[(copy_bytes / 4) as usize], DType::F32, "copy src")?;
    let dst = ctx.create_tensor(&[(copy_bytes / 4) as usize], DType::F32, "copy dst")?;
    let secs = timer.time(if q { 3 } else { 20 }, &mut |enc| {
        enc.copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, 0, copy_bytes);
        Ok(())
    })?;
    let engine_bw = 2.0 * copy_bytes as f64 / secs;
    rows.push(Row {
        kind: "copy",
        params: vec![("bytes", copy_bytes.to_string())],
        seconds: secs,
        bytes_per_s: Some(engine_bw),
        flops: None,
        note: "copy_buffer_to_buffer, read+write bytes".into(),
    });
    let secs = timer.time(if q { 3 } else { 20 }, &mut |enc| {
        ctx.copy_tensor(enc, &src, &dst)
    })?;
    let shader_bw = 2.0 * copy_bytes as f64 / secs;
    rows.push(Row {
        kind: "copy_compute",
        params: vec![("bytes", copy_bytes.to_string())],
        seconds: secs,
        bytes_per_s: Some(shader_bw),
        flops: None,
        note: "compute-shader copy (vec4<u32>), read+write bytes".into(),
    });
    drop((src, dst));
    // The ceiling: the faster of the two copies.
    let copy_bw = engine_bw.max(shader_bw);
    let pct = |bw: f64| {
        format!(
            "{:.0}% of copy ceiling {:.0} GB/s (compute copy {:.0}, copy engine {:.0})",
            100.0 * bw / copy_bw,
            copy_bw / 1e9,
            shader_bw / 1e9,
            engine_bw / 1e9
        )
    };

    // 2. Decode attention.
    let block_size = 16u32;
    let contexts: &[usize] = match &args.contexts {
        Some(c) => c,
        None if q => &[64, 256],
        None => &[1024, 2048, 4096, 8192, 16384, 32768],
    };
    let batches: &[usize] = match &args.batches {
        Some(b) => b,
        None if q => &[1, 4],
        None => &[1, 4, 16, 64],
    };
    if want("attn") {
        // The fixed cost of a decode call: two dependent dispatches of one workgroup each (a
        // split pass and a reduce pass with nothing to do), repeated in one compute pass.
        let a = ctx.create_tensor(&[64], DType::F32, "floor a")?;
        let b = ctx.create_tensor(&[64], DType::F32, "floor b")?;
        let secs = timer.time_in_pass(if q { 2 } else { 20 }, &mut |enc| {
            ctx.copy_tensor(enc, &a, &b)?;
            ctx.copy_tensor(enc, &b, &a)
        })?;
        eprintln!(
            "dispatch floor: {:.2} us per pair of dependent dispatches",
            secs * 1e6
        );
        rows.push(Row {
            kind: "dispatch_floor",
            params: vec![("dispatches", "2".into())],
            seconds: secs,
            bytes_per_s: None,
            flops: None,
            note: "two dependent one-workgroup dispatches in one pass: the floor of a split + reduce decode call".into(),
        });
    }
    let picked = |list: &Option<Vec<String>>, name: &str| {
        list.as_ref().is_none_or(|l| l.iter().any(|x| x == name))
    };
    // Copies moving as many bytes as a decode call reads (half read, half written), by size:
    // what one call's worth of traffic costs even for the simplest kernel, fixed costs and
    // all, next to the ceiling's 512 MiB.
    let mut same_traffic: std::collections::HashMap<u64, f64> = Default::default();
    let layouts = ATTN_LAYOUTS.into_iter().filter(|&(label, .., default)| {
        want("attn")
            && match &args.layouts {
                Some(l) => l.iter().any(|x| x == label),
                None => default,
            }
    });
    for (label, n_q_heads, n_kv_heads, hd, _) in layouts {
        for &batch in batches {
            for &context in contexts {
                let blocks_per_seq = context.div_ceil(block_size as usize);
                let num_blocks = (blocks_per_seq * batch) as u32;
                let layout = PagedKvLayout::contiguous(num_blocks, block_size, n_kv_heads, hd);
                let kv_bytes = layout.extent() * 2;
                let mut params = vec![
                    ("heads", format!("{n_q_heads}q/{n_kv_heads}kv")),
                    ("layout", label.to_string()),
                    ("head_dim", hd.to_string()),
                    ("batch", batch.to_string()),
                    ("context", context.to_string()),
                ];
                if kv_bytes > feats.max_storage_binding {
                    params.push(("skipped", "kv region above binding limit".into()));
                    rows.push(Row {
                        kind: "attn_decode",
                        params,
                        seconds: 0.0,
                        bytes_per_s: None,
                        flops: None,
                        note: format!("skipped: {kv_bytes} B K region > binding limit"),
                    });
                    continue;
                }
                let k = ctx.create_tensor(&[layout.extent() as usize], DType::F16, "k")?;
                let v = ctx.create_tensor(&[layout.extent() as usize], DType::F16, "v")?;
                let tables: Vec<Vec<u32>> = (0..batch)
                    .map(|s| {
                        let b0 = (s * blocks_per_seq) as u32;
                        (b0..b0 + blocks_per_seq as u32).collect()
                    })
                    .collect();
                let descs: Vec<SeqDesc> = tables
                    .iter()
                    .map(|t| SeqDesc {
                        n_query: 1,
                        kv_len: context,
                        block_table: t,
                    })
                    .collect();
                let sb = SeqBatch::upload(&ctx, &descs, &layout)?;
                let qt =
                    ctx.create_tensor(&[batch, n_q_heads as usize, hd as usize], DType::F32, "q")?;
                let out = ctx.create_tensor(
                    &[batch, n_q_heads as usize, hd as usize],
                    DType::F32,
                    "out",
                )?;
                let pool = KvPool {
                    k: &k,
                    v: &v,
                    k_base: 0,
                    v_base: 0,
                    layout,
                };
                let bytes = (batch * context) as f64 * f64::from(n_kv_heads * hd) * 2.0 * 2.0;
                let half = (bytes as u64 / 2).div_ceil(16) * 16;
                if let std::collections::hash_map::Entry::Vacant(slot) = same_traffic.entry(half) {
                    let elems = (half / 4) as usize;
                    let a = ctx.create_tensor(&[elems], DType::F32, "same-traffic src")?;
                    let b = ctx.create_tensor(&[elems], DType::F32, "same-traffic dst")?;
                    let secs = timer.time_in_pass(if q { 2 } else { 20 }, &mut |enc| {
                        ctx.copy_tensor(enc, &a, &b)
                    })?;
                    let bw = 2.0 * half as f64 / secs;
                    slot.insert(bw);
                    eprintln!(
                        "copy of {} bytes (a decode call's traffic at batch {batch}, context {context}): {:.1} GB/s, {}",
                        2 * half,
                        bw / 1e9,
                        pct(bw)
                    );
                    rows.push(Row {
                        kind: "copy_same_traffic",
                        params: vec![("bytes", half.to_string())],
                        seconds: secs,
                        bytes_per_s: Some(bw),
                        flops: None,
                        note: format!("compute copy in one pass, read+write bytes; {}", pct(bw)),
                    });
                }
                let runs = DECODE_KERNELS
                    .into_iter()
                    .filter(|(name, _)| picked(&args.kernels, name))
                    .flat_map(|(name, k)| {
                        std::iter::once(None)
                            .chain(args.chunks.iter().map(|&c| Some(c)))
                            .map(move |c| (name, k, c))
                    });
                for (name, kernel, chunk) in runs {
                    let opts = DecodeOptions { chunk, kernel };
                    let mut params = params.clone();
                    params.push(("kernel", name.to_string()));
                    params.push((
                        "chunk",
                        chunk.map_or_else(|| "auto".to_string(), |c| c.to_string()),
                    ));
                    eprintln!(
                        "attn_decode {label} batch {batch} context {context} {kernel:?} chunk {chunk:?}"
                    );
                    let mut probe = ctx.encoder();
                    if let Err(GpuError::NotAvailable(why)) =
                        ctx.attention_decode_with(&mut probe, &qt, &sb, &pool, &out, opts)
                    {
                        rows.push(Row {
                            kind: "attn_decode",
                            params,
                            seconds: 0.0,
                            bytes_per_s: None,
                            flops: None,
                            note: format!("not available: {why}"),
                        });
                        continue;
                    }
                    let secs = timer.time_in_pass(if q { 2 } else { 20 }, &mut |enc| {
                        ctx.attention_decode_with(enc, &qt, &sb, &pool, &out, opts)
                    })?;
                    eprintln!("  {:.1} GB/s, {}", bytes / secs / 1e9, pct(bytes / secs));
                    rows.push(Row {
                        kind: "attn_decode",
                        params,
                        seconds: secs,
                        bytes_per_s: Some(bytes / secs),
                        flops: Some(
                            4.0 * (batch * context) as f64 * f64::from(n_q_heads * hd) / secs,
                        ),
                        note: pct(bytes / secs),
                    });
                }
            }
        }
    }

    // 3. Prefill matmul.
    if want("matmul") {
        let n = if q { 256 } else { 4096 };
        let x = ctx.create_tensor(&[n, n], DType::F32, "x")?;
        let y = ctx.create_tensor(&[n, n], DType::F32, "y")?;
        for dtype in [DType::F32, DType::F16] {
            let w = ctx.create_tensor(&[n, n], dtype, "w")?;
            for tile in [MatmulTile::T4, MatmulTile::T8, MatmulTile::R64] {
                let secs = match timer.time(if q { 2 } else { 10 }, &mut |enc| {
                    ctx.matmul(enc, &x, &w, &y, tile)
                }) {
                    Ok(s) => s,
                    Err(e) => {
                        println!("matmul {tile:?} {}: {e}", dtype.name());
                        continue;
                    }
                };
                rows.push(Row {
                    kind: "matmul",
                    params: vec![
                        ("m_n_k", format!("{n}x{n}x{n}")),
                        ("weights", dtype.name().into()),
                        ("tile", format!("{tile:?}")),
                    ],
                    seconds: secs,
                    bytes_per_s: None,
                    flops: Some(2.0 * (n * n * n) as f64 / secs),
                    note: args.ref_tflops.map_or_else(String::new, |r| {
                        format!(
                            "{:.1}% of reference {r} TFLOP/s",
                            100.0 * 2.0 * (n * n * n) as f64 / secs / (r * 1e12)
                        )
                    }),
                });
            }
        }
        drop((x, y));
        if ctx.coopmat_f16_available() {
            // Square and tall full-tile shapes, then edges: m, n off the tiles, and n not a
            // multiple of 4 with k not of 16 (edge stores everywhere); then the first shape again,
            // to tell a slower shape from a slower run.
            let shapes: &[(usize, usize, usize)] = if q {
                &[(256, 256, 256), (300, 200, 136), (256, 256, 256)]
            } else {
                &[
                    (4096, 4096, 4096),
                    (8192, 4096, 4096),
                    (4000, 3000, 4096),
                    (1000, 1002, 1000),
                    (4096, 4096, 4096),
                ]
            };
            // Largest max|diff| / max|ref| against R64 accepted (f16 rounding of the activations).
            const COOP_TOL: f64 = 2e-3;
            let iters = if q { 2 } else { 10 };
            let mut summary = Vec::new();
            for (si, &(m, nn, k)) in shapes.iter().enumerate() {
                let repeat = shapes[..si].contains(&(m, nn, k));
                let shape = format!("{m}x{nn}x{k}");
                let flop = 2.0 * (m * nn * k) as f64;
                // Deterministic values in [-1, 1).
                let noise = |len: usize, seed: u64| -> Vec<f32> {
                    let mut st = seed;
                    (0..len)
                        .map(|_| {
                            st = st
                                .wrapping_mul(6_364_136_223_846_793_005)
                                .wrapping_add(1_442_695_040_888_963_407);
                            ((st >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                        })
                        .collect()
                };
                let x = ctx.upload_f32(&noise(m * k, 1), &[m, k])?;
                let w = ctx.upload_f32_as_f16(&noise(nn * k, 2), &[nn, k])?;
                let y = ctx.create_tensor(&[m, nn], DType::F32, "y")?;
                let y_ref = ctx.create_tensor(&[m, nn], DType::F32, "y_ref")?;
                let mut enc = ctx.encoder();
                ctx.matmul(&mut enc, &x, &w, &y_ref, MatmulTile::R64)?;
                ctx.submit_and_wait(enc)?;
                let expected = ctx.read_f32(&y_ref)?;
                let max_ref = expected.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let base_note = if repeat { "repeat; " } else { "" };

                // The f32 -> f16 conversion alone (what the f16-reading variants run before their
                // tiles), into a tensor of the benchmark's own: the tile-only rows read it.
                let x16 = ctx.create_tensor(&[m, k], DType::F16, "x16")?;
                let conv_secs = timer.time(iters, &mut |enc| ctx.to_f16(enc, &x, &x16))?;
                let conv_bytes = (m * k * 6) as f64;
                rows.push(Row {
                    kind: "coop_to_f16",
                    params: vec![("m_k", format!("{m}x{k}"))],
                    seconds: conv_secs,
                    bytes_per_s: Some(conv_bytes / conv_secs),
                    flops: None,
                    note: format!(
                        "{base_note}f32 -> f16 activations, read+write bytes; {}",
                        pct(conv_bytes / conv_secs)
                    ),
                });

                // (variant, full-call seconds, tile-only seconds) of the correct variants.
                let mut timed: Vec<(CoopVariant, f64, Option<f64>)> = Vec::new();
                for variant in CoopVariant::ALL {
                    let (bm, bn) = variant.tile();
                    // The full call (f32 activations: conversion, if any, then tiles), then the
                    // tile kernel alone on the f16 copy.
                    let inputs: &[(&str, &cla_kernels_wgpu::GpuTensor)] = if variant.reads_f32() {
                        &[("f32 (no conversion)", &x)]
                    } else {
                        &[("f32 (to_f16 + tiles)", &x), ("f16 (tiles only)", &x16)]
                    };
                    let mut secs_of = Vec::new();
                    for &(input, xin) in inputs {
                        let mut params = vec![
                            ("m_n_k", shape.clone()),
                            ("variant", variant.name().into()),
                            ("tile", format!("{bm}x{bn}")),
                            ("x", input.into()),
                        ];
                        // NaN in every element first, so that one the kernel skips counts as wrong.
                        ctx.fill_u32_pattern(&y, 0x7fc0_0000);
                        let mut enc = ctx.encoder();
                        match ctx.matmul_coopmat_with(&mut enc, xin, &w, &y, variant) {
                            Ok(()) => {}
                            Err(GpuError::NotAvailable(why)) => {
                                rows.push(Row {
                                    kind: "matmul_coopmat",
                                    params,
                                    seconds: 0.0,
                                    bytes_per_s: None,
                                    flops: None,
                                    note: format!("not available: {why}"),
                                });
                                break;
                            }
                            Err(e) => return Err(e.into()),
                        }
                        ctx.submit_and_wait(enc)?;
                        let got = ctx.read_f32(&y)?;
                        let max_diff = got.iter().zip(&expected).fold(0.0f64, |a, (g, r)| {
                            let d = f64::from((g - r).abs());
                            if d.is_nan() { f64::INFINITY } else { a.max(d) }
                        });
                        let rel = max_diff / f64::from(max_ref.max(f32::MIN_POSITIVE));
                        let ok = rel <= COOP_TOL;
                        let secs = timer.time(iters, &mut |enc| {
                            ctx.matmul_coopmat_with(enc, xin, &w, &y, variant)
                        })?;
                        let flops = flop / secs;
                        let mut note =
                            format!("{base_note}max|diff| / max|ref| vs R64 = {rel:.2e}");
                        if let Some(r) = args.ref_tflops {
                            let _ = write!(
                                note,
                                "; {:.1}% of reference {r} TFLOP/s",
                                100.0 * flops / (r * 1e12)
                            );
                        }
                        if variant == CoopVariant::for_shape(m, nn, &feats) && secs_of.is_empty() {
                            note.push_str("; used by linear");
                        }
                        params.push(("check", if ok { "ok" } else { "MISMATCH" }.into()));
                        rows.push(Row {
                            kind: "matmul_coopmat",
                            params,
                            seconds: secs,
                            bytes_per_s: None,
                            flops: Some(flops),
                            note,
                        });
                        secs_of.push(ok.then_some(secs));
                    }
                    if let Some(&Some(full)) = secs_of.first() {
                        timed.push((variant, full, secs_of.get(1).copied().flatten()));
                    }
                }
                let tf = |s: f64| flop / s / 1e12;
                let mut line = format!(
                    "matmul_coopmat {shape}{}:",
                    if repeat { " (repeat)" } else { "" }
                );
                match timed.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
                    Some(&(v, full, _)) => {
                        let _ = write!(
                            line,
                            " fastest correct variant {} ({:.1} TFLOP/s)",
                            v.name(),
                            tf(full)
                        );
                    }
                    None => {
                        let _ = write!(line, " no variant within {COOP_TOL:e}");
                    }
                }
                if let Some(&(v, _, Some(tile))) =
                    timed.iter().filter(|t| t.2.is_some()).min_by(|a, b| {
                        a.2.unwrap_or(f64::INFINITY)
                            .total_cmp(&b.2.unwrap_or(f64::INFINITY))
                    })
                {
                    let _ = write!(
                        line,
                        "; fastest tile kernel {} ({:.1} TFLOP/s)",
                        v.name(),
                        tf(tile)
                    );
                }
                let _ = write!(line, "; to_f16 {:.1} us", conv_secs * 1e6);
                let used = CoopVariant::for_shape(m, nn, &feats);
                match timed.iter().find(|t| t.0 == used) {
                    Some(&(v, full, tile)) => {
                        let _ = write!(line, "; linear uses {} ({:.1} TFLOP/s", v.name(), tf(full));
                        if let Some(tile) = tile {
                            let _ = write!(
                                line,
                                ", tiles alone {:.1} TFLOP/s, full - tiles - to_f16 = {:.1} us",
                                tf(tile),
                                (full - tile - conv_secs) * 1e6
                            );
                        }
                        line.push(')');
                    }
                    None => {
                        let _ = write!(line, "; linear uses {} (not correct here)", used.name());
                    }
                }
                summary.push(line);
            }
            for line in &summary {
                println!("{line}");
            }
        } else {
            rows.push(Row {
                kind: "matmul_coopmat",
                params: vec![],
                seconds: 0.0,
                bytes_per_s: None,
                flops: None,
                note: format!(
                    "not available (cooperative matrix shapes {:?}, subgroup size {:?}, f16 {})",
                    feats.cooperative_matrix, feats.subgroup_size, feats.shader_f16
                ),
            });
        }
    }
    // 4. Token choice: argmax and sampling over one row of logits per sequence (the bytes
    // are the logits read once; sampling reads them several times).
    if want("sample") {
        let vocabs: &[usize] = if q {
            &[4096]
        } else {
            // 4096: the shipped models' vocabulary.
            &[4096, 32_000, 128_256, 256_000]
        };
        for &vocab in vocabs {
            for batch in [1usize, 32] {
                let logits: Vec<f32> = (0..batch * vocab)
                    .map(|i| (i.wrapping_mul(2_654_435_761) % 1000) as f32 * 0.01)
                    .collect();
                let lt = ctx.upload_f32(&logits, &[batch, vocab])?;
                let mut words = Vec::with_capacity(batch * 2);
                for r in 0..batch {
                    words.extend(uniform_words((r as f64 + 0.5) / batch as f64)?);
                }
                let ut = ctx.upload_u32(&words, &[batch, 2])?;
                let out = ctx.create_tensor(&[batch], DType::U32, "ids")?;
                let methods = [
                    ("argmax", None),
                    (
                        "temperature 0.8, top-k 50",
                        Some(SampleParams {
                            temperature: 0.8,
                            top_k: 50,
                            top_p: 1.0,
                        }),
                    ),
                    (
                        "temperature 0.8, top-p 0.9",
                        Some(SampleParams {
                            temperature: 0.8,
                            top_k: 0,
                            top_p: 0.9,
                        }),
                    ),
                    // `cla generate`'s defaults.
                    (
                        "temperature 0.8, top-k 40, top-p 0.95",
                        Some(SampleParams {
                            temperature: 0.8,
                            top_k: 40,
                            top_p: 0.95,
                        }),
                    ),
                ];
                for (method, params) in methods {
                    eprintln!("token_choice vocab {vocab} batch {batch} {method}");
                    let secs =
                        timer.time_in_pass(if q { 2 } else { 20 }, &mut |enc| match &params {
                            None => ctx.argmax(enc, &lt, &out),
                            Some(p) => ctx.sample(enc, &lt, &ut, p, &out),
                        })?;
                    let bytes = (batch * vocab * 4) as f64;
                    rows.push(Row {
                        kind: "token_choice",
                        params: vec![
                            ("vocab", vocab.to_string()),
                            ("batch", batch.to_string()),
                            ("method", method.to_string()),
                        ],
                        seconds: secs,
                        bytes_per_s: Some(bytes / secs),
                        flops: None,
                        note: format!("{:.1} us per call", secs * 1e6),
                    });
                }
            }
        }
    }

    // 5. Decode-shaped matvec, and batched-decode rows (16-64) through the matrix-vector
    // kernel (which rereads each weight row once per 8 activation rows, from cache) against
    // the register-tiled matmul and, for f16 weights, the tensor-core matmul.
    if want("matvec") {
        type Shapes = &'static [(usize, usize, usize)];
        let (one, batched): (Shapes, Shapes) = if q {
            (&[(1, 256, 256), (8, 256, 256)], &[(16, 256, 256)])
        } else {
            (
                &[
                    (1, 2048, 2048),
                    (1, 5632, 2048),
                    (1, 2048, 5632),
                    (1, 32000, 2048),
                    (1, 4096, 4096),
                    (1, 14336, 4096),
                    (8, 4096, 4096),
                    (1, 4096, 14336),
                ],
                &[
                    (16, 2048, 2048),
                    (32, 2048, 2048),
                    (64, 2048, 2048),
                    (32, 5632, 2048),
                    (32, 2048, 5632),
                ],
            )
        };
        let sweeps: [(&str, Shapes, &[&str]); 2] = [
            ("matvec", one, &["matvec"]),
            ("linear_rows", batched, &["matvec", "tiled", "coop"]),
        ];
        for (kind, shapes, kernels) in sweeps {
            for &(m, nn, k) in shapes {
                for dtype in [DType::F32, DType::F16] {
                    let x = ctx.create_tensor(&[m, k], DType::F32, "x")?;
                    // Enough copies of the weights that they do not stay in the last-level
                    // cache between repetitions (the decoder reads each matrix once per step).
                    let w_bytes = nn * k * dtype.size();
                    let copies = if q {
                        1
                    } else {
                        (256usize << 20).div_ceil(w_bytes)
                    };
                    let ws = (0..copies)
                        .map(|_| ctx.create_tensor(&[nn, k], dtype, "w"))
                        .collect::<Result<Vec<_>, _>>()?;
                    let y = ctx.create_tensor(&[m, nn], DType::F32, "y")?;
                    for &kernel in kernels {
                        if kernel == "coop" && !(dtype == DType::F16 && ctx.coopmat_f16_available())
                        {
                            continue;
                        }
                        let mut next = 0usize;
                        let secs = timer.time_in_pass(if q { 3 } else { 50 }, &mut |enc| {
                            next = (next + 1) % ws.len();
                            let w = &ws[next];
                            match kernel {
                                "matvec" => ctx.matvec(enc, &x, w, &y),
                                "tiled" => ctx.matmul(enc, &x, w, &y, MatmulTile::R64),
                                _ => ctx.matmul_coopmat(enc, &x, w, &y),
                            }
                        })?;
                        let mut params = vec![
                            ("m_n_k", format!("{m}x{nn}x{k}")),
                            ("weights", dtype.name().into()),
                        ];
                        if kernels.len() > 1 {
                            params.push(("kernel", kernel.into()));
                        }
                        rows.push(Row {
                            kind,
                            params,
                            seconds: secs,
                            bytes_per_s: Some(w_bytes as f64 / secs),
                            flops: Some(2.0 * (m * nn * k) as f64 / secs),
                            note: pct(w_bytes as f64 / secs),
                        });
                    }
                }
            }
        }

        // Table.
    }
    println!(
        "\n{:<15} {:<62} {:>11} {:>10} {:>10}  note",
        "kernel", "params", "time_us", "GB/s", "TFLOP/s"
    );
    for r in &rows {
        let p: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<15} {:<62} {:>11.1} {:>10} {:>10}  {}",
            r.kind,
            p.join(" "),
            r.seconds * 1e6,
            r.bytes_per_s
                .map_or("-".into(), |b| format!("{:.1}", b / 1e9)),
            r.flops.map_or("-".into(), |f| format!("{:.3}", f / 1e12)),
            r.note
        );
    }

    // JSON.
    let mut js = String::new();
    let _ = write!(
        js,
        "{{\n  \"device\": {{\"name\": \"{}\", \"backend\": \"{:?}\", \"type\": \"{:?}\", \"driver\": \"{}\"}},\n  \"clock\": \"{}\",\n  \"quick\": {},\n  \"features\": \"{}\",\n  \"results\": [\n",
        json_escape(&info.name),
        info.backend,
        info.device_type,
        json_escape(&format!("{} {}", info.driver, info.driver_info)),
        timer.clock(),
        q,
        json_escape(&format!("{feats:?}"))
    );
    for (i, r) in rows.iter().enumerate() {
        let params: Vec<String> = r
            .params
            .iter()
            .map(|(k, v)| format!("\"{k}\": \"{}\"", json_escape(v)))
            .collect();
        let num = |v: Option<f64>| v.map_or("null".to_string(), |x| format!("{x:.6e}"));
        let _ = writeln!(
            js,
            "    {{\"kernel\": \"{}\", \"params\": {{{}}}, \"seconds\": {:.6e}, \"bytes_per_s\": {}, \"flop_per_s\": {}, \"note\": \"{}\"}}{}",
            r.kind,
            params.join(", "),
            r.seconds,
            num(r.bytes_per_s),
            num(r.flops),
            json_escape(&r.note),
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    js.push_str("  ]\n}\n");
    write_atomic(std::path::Path::new(&args.out), &js)?;
    println!("\nwrote {}", args.out);
    if let Some(dir) = &args.dump_kernels {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let sources = ctx.kernel_sources();
        for (name, src) in &sources {
            write_atomic(&dir.join(format!("{name}.wgsl")), src)?;
        }
        println!(
            "wrote {} kernel sources to {}",
            sources.len(),
            dir.display()
        );
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file in the same directory, so an existing
/// file is replaced whole or not at all.
fn write_atomic(path: &std::path::Path, text: &str) -> BenchResult<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}
