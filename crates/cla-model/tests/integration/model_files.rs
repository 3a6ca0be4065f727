//! Model directories: saving and loading (single file, sharded, f16/bf16), and every kind
//! of bad input, each a typed error with a message that says what is wrong.

use crate::common;

use cla_core::DType;
use cla_kv::KvDType;
use cla_model::{
    CpuDecoder, Decoder, GenerationConfig, LoadedModel, ModelError, ModelWeights,
    RandomWeightsOptions, SequenceStep, Tokenizer, cache_config_for, generate_ids,
};
use common::{small_config, temp_dir, write_word_tokenizer};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

/// CLA2 on 4 layers (producers 0 and 2), GQA, untied, with K/V norms.
fn weights() -> ModelWeights {
    let config = small_config(vec![0, 0, 2, 2], 16, 4, 2, 4, 24, false);
    ModelWeights::random_with(
        &config,
        &RandomWeightsOptions {
            seed: 3,
            kv_input_norm: true,
        },
    )
}

/// A saved model directory with a tokenizer.
fn saved(name: &str) -> (std::path::PathBuf, ModelWeights) {
    let dir = temp_dir(name);
    let w = weights();
    let tok = dir.join("source-tokenizer.json");
    write_word_tokenizer(&tok, 24);
    w.save(&dir, DType::F32, Some(&tok)).unwrap();
    (dir, w)
}

/// The tensors of a saved model as (name -> (dtype, shape, bytes)).
fn read_tensors(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect()
}

/// Rewrites `model.safetensors` after `edit` changes the tensor map.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let mut tensors = read_tensors(dir);
    edit(&mut tensors);
    write_tensors(&dir.join("model.safetensors"), &tensors);
}

fn write_tensors(path: &Path, tensors: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> (ModelError, String) {
    let e = ModelWeights::load(dir).unwrap_err();
    let msg = e.to_string();
    (e, msg)
}

#[test]
fn save_then_load_is_exact_and_f16_bf16_are_close() {
    let (dir, w) = saved("roundtrip");
    let loaded = LoadedModel::load(&dir).unwrap();
    assert_eq!(*loaded.weights, w);
    assert_eq!(
        loaded.tokenizer.encode("w5 w7", true).unwrap(),
        vec![1, 5, 7]
    );
    for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 1.6e-2)] {
        let d = temp_dir(&format!("roundtrip-{dtype}"));
        w.save(&d, dtype, None).unwrap();
        let l = ModelWeights::load(&d).unwrap();
        for ((n, a), (_, b)) in w.named_tensors().zip(l.named_tensors()) {
            let diff = a
                .values()
                .iter()
                .zip(b.values())
                .map(|(x, y)| ((x - y) / x.abs().max(1e-3)).abs())
                .fold(0.0, f32::max);
            assert!(diff < tol, "{dtype} {n}: {diff}");
        }
    }
    assert!(
        ModelWeights::random(&w.config, 1)
            .save(temp_dir("int8"), DType::Int8, None)
            .is_err()
    );
}

#[test]
fn sharded_weights_load_like_one_file() {
    let (dir, w) = saved("sharded");
    let tensors = read_tensors(&dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        if i % 2 == 0 {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", &a),
        ("model-00002-of-00002.safetensors", &b),
    ] {
        write_tensors(&dir.join(file), part);
        for name in part.keys() {
            map.insert(name.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(ModelWeights::load(&dir).unwrap(), w);

    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, ModelError::MissingFile { .. }), "{msg}");
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

#[test]
fn missing_directory_and_files_say_what_to_do() {
    let (e, msg) = load_err(Path::new("/nonexistent/cla-model-dir"));
    assert!(
        matches!(e, ModelError::MissingFile { .. }) && msg.contains("model directory"),
        "{msg}"
    );

    let (dir, _) = saved("missing-files");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let msg = LoadedModel::load(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("tokenizer.json") && msg.contains("copy"),
        "{msg}"
    );

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, ModelError::MissingFile { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("index"),
        "{msg}"
    );

    std::fs::remove_file(dir.join("config.json")).unwrap();
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("config.json"), "{msg}");

    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 8}").unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, ModelError::Config(_)), "{msg}");
}

#[test]
fn missing_and_misnamed_tensors_name_the_tensor_and_layer() {
    let (dir, _) = saved("missing-tensor");
    rewrite(&dir, |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let (e, msg) = load_err(&dir);
    assert!(
        matches!(e, ModelError::MissingTensor { layer: Some(1), .. }),
        "{msg}"
    );
    assert!(
        msg.contains("layer 1") && msg.contains("model.layers.1.mlp.up_proj.weight"),
        "{msg}"
    );

    let (dir, _) = saved("misnamed-tensor");
    rewrite(&dir, |t| {
        let v = t.remove("model.layers.3.self_attn.o_proj.weight").unwrap();
        t.insert("model.layers.3.self_attn.out_proj.weight".into(), v);
    });
    let (e, msg) = load_err(&dir);
    assert!(
        matches!(e, ModelError::UnexpectedTensor { layer: Some(3), .. }),
        "{msg}"
    );
    assert!(msg.contains("out_proj"), "{msg}");

    let (dir, _) = saved("untied-head-missing");
    rewrite(&dir, |t| {
        t.remove("lm_head.weight");
    });
    let (_, msg) = load_err(&dir);
    assert!(
        msg.contains("lm_head.weight") && msg.contains("tie_word_embeddings"),
        "{msg}"
    );

    let (dir, _) = saved("extra-layer");
    rewrite(&dir, |t| {
        let v = t["model.layers.0.input_layernorm.weight"].clone();
        t.insert("model.layers.9.input_layernorm.weight".into(), v);
    });
    let (_, msg) = load_err(&dir);
    assert!(
        msg.contains("layer 9") && msg.contains("only 4 layers"),
        "{msg}"
    );
}

#[test]
fn k_proj_in_a_consumer_or_missing_in_a_producer_is_refused() {
    let (dir, _) = saved("consumer-kproj");
    rewrite(&dir, |t| {
        let v = t["model.layers.0.self_attn.k_proj.weight"].clone();
        t.insert("model.layers.1.self_attn.k_proj.weight".into(), v);
    });
    let (e, msg) = load_err(&dir);
    assert!(
        matches!(e, ModelError::UnexpectedTensor { layer: Some(1), .. }),
        "{msg}"
    );
    assert!(msg.contains("consumer") && msg.contains("layer 0"), "{msg}");

    let (dir, _) = saved("producer-no-vproj");
    rewrite(&dir, |t| {
        t.remove("model.layers.2.self_attn.v_proj.weight");
    });
    let (e, msg) = load_err(&dir);
    assert!(
        matches!(e, ModelError::MissingTensor { layer: Some(2), .. }),
        "{msg}"
    );
    assert!(msg.contains("producer"), "{msg}");
}

#[test]
fn wrong_shapes_and_dtypes_are_reported() {
    let (dir, _) = saved("wrong-shape");
    rewrite(&dir, |t| {
        let (d, _, b) = t["model.layers.2.self_attn.q_proj.weight"].clone();
        t.insert(
            "model.layers.2.self_attn.q_proj.weight".into(),
            (d, vec![8, 32], b),
        );
    });
    let (e, msg) = load_err(&dir);
    match e {
        ModelError::ShapeMismatch {
            expected,
            found,
            layer,
            ..
        } => {
            assert_eq!(
                (expected, found, layer),
                (vec![16, 16], vec![8, 32], Some(2))
            );
        }
        other => panic!("{other}"),
    }
    assert!(msg.contains("[16, 16]") && msg.contains("[8, 32]"), "{msg}");

    let (dir, _) = saved("wrong-dtype");
    rewrite(&dir, |t| {
        let (_, s, b) = t["model.norm.weight"].clone();
        t.insert("model.norm.weight".into(), (Dtype::I32, s, b));
    });
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, ModelError::UnsupportedDType { .. }), "{msg}");
    assert!(
        msg.contains("model.norm.weight") && msg.contains("I32"),
        "{msg}"
    );
}

#[test]
fn truncated_or_corrupted_safetensors_are_typed_errors() {
    let (dir, _) = saved("truncated");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, ModelError::Safetensors { .. }), "{msg}");

    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, ModelError::Safetensors { .. }), "{msg}");

    std::fs::write(&path, b"abc").unwrap();
    assert!(matches!(load_err(&dir).0, ModelError::Safetensors { .. }));
}

#[test]
fn tokenizer_larger_than_the_embedding_is_refused() {
    let (dir, w) = saved("big-tokenizer");
    write_word_tokenizer(&dir.join("tokenizer.json"), 40);
    let e = LoadedModel::load(&dir).unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::TokenizerVocabTooLarge {
                tokenizer_vocab: 40,
                model_vocab: 24
            }
        ),
        "{e}"
    );
    std::fs::write(dir.join("tokenizer.json"), "{ broken").unwrap();
    let e = Tokenizer::from_model_dir(&dir, &w.config).unwrap_err();
    assert!(matches!(e, ModelError::Tokenizer { .. }), "{e}");
}

fn decoder(w: ModelWeights) -> CpuDecoder {
    let ctx = w.config.max_position_embeddings;
    CpuDecoder::new(w, cache_config_for(ctx, 2, KvDType::F32)).unwrap()
}

#[test]
fn bad_prompts_are_typed_errors() {
    let w = weights();
    let vocab = w.config.vocab_size as u32;
    let context = w.config.max_position_embeddings;
    let mut dec = decoder(w);
    let cfg = GenerationConfig {
        max_new_tokens: 4,
        ..GenerationConfig::default()
    };
    let mut sink = |_: cla_model::TokenEvent<'_>| ControlFlow::Continue(());

    let e = generate_ids(&mut dec, None, &[vec![]], &cfg, &mut sink).unwrap_err();
    assert!(matches!(e, ModelError::EmptyPrompt), "{e}");

    let e = generate_ids(&mut dec, None, &[vec![1, vocab]], &cfg, &mut sink).unwrap_err();
    assert!(
        matches!(e, ModelError::TokenOutOfRange { token, .. } if token == vocab),
        "{e}"
    );

    let long: Vec<u32> = (0..context as u32 + 5).map(|i| i % vocab).collect();
    let e = generate_ids(&mut dec, None, std::slice::from_ref(&long), &cfg, &mut sink).unwrap_err();
    assert!(matches!(e, ModelError::PromptTooLong { .. }), "{e}");
    assert!(e.to_string().contains("truncation"), "{e}");

    let truncating = GenerationConfig {
        truncate_prompt: true,
        ..cfg.clone()
    };
    let out = generate_ids(
        &mut dec,
        None,
        std::slice::from_ref(&long),
        &truncating,
        &mut sink,
    )
    .unwrap();
    assert_eq!(out[0].prompt_ids.len(), context - 4);
    assert_eq!(out[0].prompt_ids[..], long[long.len() - (context - 4)..]);
    assert_eq!(out[0].truncated_tokens, long.len() - (context - 4));
    assert_eq!(out[0].ids.len(), 4);

    // The decoder itself refuses bad steps and stays unchanged.
    let seq = dec.add_sequence();
    let e = dec
        .forward(&[SequenceStep::last(seq, &[3, vocab + 7])])
        .unwrap_err();
    assert!(matches!(e, ModelError::TokenOutOfRange { .. }), "{e}");
    assert!(dec.forward(&[SequenceStep::last(seq, &[])]).is_err());
    let e = dec.forward(&[SequenceStep::last(seq, &long)]).unwrap_err();
    assert!(matches!(e, ModelError::ContextExceeded { .. }), "{e}");
    let e = dec
        .forward(&[SequenceStep::last(seq, &[1]), SequenceStep::last(seq, &[2])])
        .unwrap_err();
    assert!(matches!(e, ModelError::DuplicateSequence(_)), "{e}");
    assert_eq!(dec.sequence_len(seq).unwrap(), 0);
    dec.free_sequence(seq).unwrap();
    let e = dec.forward(&[SequenceStep::last(seq, &[1])]).unwrap_err();
    assert!(matches!(e, ModelError::UnknownSequence(_)), "{e}");
    assert_eq!(dec.kv_bytes_in_use(), 0, "sequences freed after generation");
}
