//! `cla eval` against the training companion: the held-out split of the shared corpus,
//! rebuilt here byte for byte (python/README.md, "The train/validation split"), scored with
//! the two shipped models must give the validation perplexity the trainer recorded in
//! experiments/cla-small/metrics.json.
//!
//! Needs the shared corpus: run with `cargo xtask conformance` (CLA_SHARED_DIR).

use crate::common;

use common::{repo_root, temp_dir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Percent of each corpus file held out.
const VAL_PERCENT: usize = 2;
/// What python/README.md gives for the shared corpus.
const VAL_BYTES: usize = 499_978;
const VAL_SHA256: &str = "be1f15dd93c4a444a3542502b517f34af923ef1475ccfcdd2b71bbb2456ff9dd";
/// Windows and scored tokens at context 256 (python/README.md).
const WINDOWS: u64 = 570;
const SCORED: u64 = 145_344;

fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("CLA_SHARED_DIR").unwrap_or_else(|| {
        panic!(
            "CLA_SHARED_DIR is not set: it must name the shared reference directory (with \
             data/corpus); run `cargo xtask conformance`"
        )
    });
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("data/corpus").is_dir(),
        "CLA_SHARED_DIR={} has no data/corpus directory",
        dir.display()
    );
    dir
}

/// Where the validation part of a file starts: the last VAL_PERCENT% of its bytes, moved
/// forward to the start of a line.
fn cut_point(data: &[u8]) -> usize {
    let n = data.len();
    let target = n - (VAL_PERCENT * n) / 100;
    if target == 0 || data[target - 1] == b'\n' {
        return target;
    }
    match data[target..].iter().position(|&b| b == b'\n') {
        Some(i) => target + i + 1,
        None => n,
    }
}

/// val.txt: the validation part of every `*.txt` regular file, in byte order of the names.
fn validation_split(corpus: &Path) -> Vec<u8> {
    let mut files: Vec<(Vec<u8>, PathBuf)> = std::fs::read_dir(corpus)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file() || e.path().is_file())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".txt"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().as_bytes().to_vec(),
                e.path(),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.txt files in {}", corpus.display());
    let mut val = Vec::new();
    for (_, path) in files {
        let data = std::fs::read(&path).unwrap();
        val.extend_from_slice(&data[cut_point(&data)..]);
    }
    val
}

/// SHA-256 (FIPS 180-4), hex.
fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_of_known_inputs() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let long = vec![b'a'; 1000];
    assert_eq!(
        sha256_hex(&long),
        "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
    );
}

#[test]
fn cut_points_follow_the_rule() {
    assert_eq!(cut_point(b""), 0);
    // 100 bytes: target 98; byte 97 is not a newline, the next newline is at 99.
    let mut data = vec![b'x'; 100];
    data[99] = b'\n';
    assert_eq!(cut_point(&data), 100);
    data[97] = b'\n';
    assert_eq!(cut_point(&data), 98);
    let no_newline = vec![b'x'; 100];
    assert_eq!(cut_point(&no_newline), 100);
}

/// The validation perplexity the trainer recorded for an exported model.
fn trainer_val_ppl(metrics: &Value, exported_key: &str) -> (String, f64) {
    let exported = &metrics["exported"][exported_key];
    let run = exported["run"]
        .as_str()
        .unwrap_or_else(|| panic!("metrics.json: exported.{exported_key}.run is missing"))
        .to_string();
    let entry = metrics["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == run.as_str())
        .unwrap_or_else(|| panic!("metrics.json has no run {run}"));
    let ppl = entry["val_ppl"].as_f64().unwrap();
    assert_eq!(exported["val_ppl"].as_f64(), Some(ppl), "{run}");
    (run, ppl)
}

#[test]
#[ignore = "needs the shared reference models: cargo xtask conformance"]
fn conformance_eval_reproduces_the_trainers_validation_perplexity() {
    let shared = shared_dir();
    let val = validation_split(&shared.join("data/corpus"));
    assert_eq!(val.len(), VAL_BYTES, "val.txt size");
    assert_eq!(sha256_hex(&val), VAL_SHA256, "val.txt sha256");
    let val_path = temp_dir("conformance").join("val.txt");
    std::fs::write(&val_path, &val).unwrap();

    let root = repo_root();
    let metrics: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("experiments/cla-small/metrics.json")).unwrap(),
    )
    .unwrap();
    // Both models at once: each evaluation has serial stretches (tokenising, the NLL of
    // every window) that the other fills, so together they finish sooner than one by one.
    let started = Instant::now();
    let runs: Vec<_> = [("small-mqa-cla2", "mqa_cla2"), ("small-mqa", "mqa")]
        .into_iter()
        .map(|(model, key)| {
            let dir = root.join("models").join(model);
            let child = Command::new(env!("CARGO_BIN_EXE_cla"))
                .args(["eval", "--model", dir.to_str().unwrap()])
                .args(["--context", "256", "--stride", "256", "--json"])
                .arg(&val_path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("the cla binary runs");
            (model, key, child)
        })
        .collect();
    for (model, key, child) in runs {
        let (run, expected) = trainer_val_ppl(&metrics, key);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cla eval {model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ppl = r["ppl"].as_f64().unwrap();
        eprintln!(
            "{model} ({run}): cla eval ppl {ppl:.4}, trainer {expected:.4}, {} tokens scored, \
             {:.1}s in the evaluation, {:.1}s since both started",
            r["tokens_scored"],
            r["seconds"].as_f64().unwrap(),
            started.elapsed().as_secs_f64()
        );
        assert_eq!(r["windows"], WINDOWS, "{model}");
        assert_eq!(r["tokens_scored"], SCORED, "{model}");
        let rel = (ppl - expected).abs() / expected;
        assert!(
            rel < 0.005,
            "{model}: cla eval gives ppl {ppl}, the trainer recorded {expected} for {run} \
             (off by {:.3}%)",
            100.0 * rel
        );
    }
}
