//! The shared stories260K reference model (a real pretrained Llama with golden outputs),
//! read from the directory named by `CLA_SHARED_DIR`; missing files fail the test.

use cla_model::{Decoder, SequenceStep};
use serde_json::Value;
use std::path::PathBuf;

pub fn model_dir() -> PathBuf {
    let shared = std::env::var_os("CLA_SHARED_DIR").unwrap_or_else(|| {
        panic!(
            "CLA_SHARED_DIR is not set: run these tests with `cargo xtask conformance`, or set \
             CLA_SHARED_DIR to the directory holding models/stories260K"
        )
    });
    let dir = PathBuf::from(shared).join("models").join("stories260K");
    assert!(
        dir.join("golden").join("golden.json").is_file(),
        "{} has no golden/golden.json: CLA_SHARED_DIR must name the shared reference \
         directory (with models/stories260K)",
        dir.display()
    );
    dir
}

pub fn golden() -> Value {
    let path = model_dir().join("golden").join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The golden logits `[16, 512]` and the ids they were computed from.
pub fn golden_logits() -> (Vec<u32>, Vec<f32>) {
    let g = golden();
    let input = ids(&g["logits_bos16"]["input_ids"]);
    let bytes = std::fs::read(model_dir().join("golden").join("logits_bos16.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.shape(), &[16, 512]);
    let values = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (input, values)
}

/// Teacher forcing on golden prompt `p`'s `full_ids`: the argmax after every position of the
/// continuation must be the golden token (`new_ids`), and the logits of the first 8 steps
/// must match the golden top-5 within 1e-4. `i` names the prompt in failures.
pub fn check_teacher_forced(decoder: &mut dyn Decoder, p: &Value, new_ids: &[u32], i: usize) {
    let full = ids(&p["full_ids"]);
    let seq = decoder.add_sequence();
    let logits = decoder
        .forward(&[SequenceStep::all(seq, &full[..full.len() - 1])])
        .unwrap()
        .remove(0);
    decoder.free_sequence(seq).unwrap();
    let start = ids(&p["prompt_ids"]).len() - 1;
    for (k, &want) in new_ids.iter().enumerate() {
        let row = logits.row(start + k);
        let argmax = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (j, &v)| if v > b.1 { (j, v) } else { b },
            )
            .0 as u32;
        assert_eq!(argmax, want, "prompt {i}: teacher-forced step {k}");
    }
    for (k, top5) in p["top5_first8"].as_array().unwrap().iter().enumerate() {
        let row = logits.row(start + k);
        for pair in top5.as_array().unwrap() {
            let id = pair[0].as_u64().unwrap() as usize;
            let want = pair[1].as_f64().unwrap() as f32;
            assert!((row[id] - want).abs() < 1e-4, "prompt {i} step {k} id {id}");
        }
    }
}
