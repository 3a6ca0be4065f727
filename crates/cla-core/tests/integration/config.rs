//! `ModelConfig` parsing: what is read, what is ignored, and that every invalid config is
//! rejected with the specific error naming the key.

use cla_core::{ConfigError, ModelConfig};
use serde_json::{Value, json};

fn base() -> Value {
    json!({
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 256,
        "eos_token_id": 2
    })
}

fn with(edits: &[(&str, Value)]) -> String {
    let mut v = base();
    let obj = v.as_object_mut().unwrap();
    for (k, val) in edits {
        if val.is_null() {
            obj.remove(*k);
        } else {
            obj.insert((*k).into(), val.clone());
        }
    }
    v.to_string()
}

fn parse(text: &str) -> Result<ModelConfig, ConfigError> {
    ModelConfig::from_json_str(text, "config.json")
}

#[test]
fn defaults_and_unknown_keys() {
    let c = parse(&with(&[
        ("some_future_key", json!({"nested": [1, 2]})),
        ("torch_dtype", json!("bfloat16")),
    ]))
    .unwrap();
    assert_eq!(c.head_dim, 16, "head_dim defaults to hidden_size / heads");
    assert_eq!(
        c.kv_sharing.sources(),
        &[0, 1, 2, 3],
        "absent map: all produce"
    );
    assert_eq!(c.eos_token_ids, vec![2]);
    assert!(!c.tie_word_embeddings);
    let no_kv_heads = parse(&with(&[("num_key_value_heads", Value::Null)])).unwrap();
    assert_eq!(no_kv_heads.num_key_value_heads, 4, "absent: MHA");
}

#[test]
fn head_width_may_differ_from_hidden_size() {
    // The paper's H46 (45 x 46 = 2070 on d_model 2048) and H90 (22 x 90 = 1980).
    for (heads, head_dim) in [(45, 46), (22, 90)] {
        let c = parse(&with(&[
            ("hidden_size", json!(2048)),
            ("num_attention_heads", json!(heads)),
            ("num_key_value_heads", json!(1)),
            ("head_dim", json!(head_dim)),
        ]))
        .unwrap();
        assert_eq!(c.q_width(), heads * head_dim);
        assert_ne!(c.q_width(), c.hidden_size);
    }
}

#[test]
fn sharing_keys() {
    let lckv = parse(&with(&[("kv_source_layers", json!([0, 0, 2, 2]))])).unwrap();
    assert_eq!(lckv.kv_sharing.num_producers(), 2);
    // Hunyuan: layer i produces iff i % factor == 0 (short group last).
    let hy = |layers: usize, factor: usize| {
        parse(&with(&[
            ("num_hidden_layers", json!(layers)),
            ("use_cla", json!(true)),
            ("cla_share_factor", json!(factor)),
        ]))
        .unwrap()
        .kv_sharing
        .to_lckv_string()
    };
    assert_eq!(hy(4, 2), "0_0_2_2");
    assert_eq!(hy(5, 3), "0_0_0_3_3");
    // use_cla false: the factor is ignored.
    let off = parse(&with(&[
        ("use_cla", json!(false)),
        ("cla_share_factor", json!(2)),
    ]))
    .unwrap();
    assert_eq!(off.kv_sharing.num_producers(), 4);
    // Both keys, agreeing: accepted.
    let both = parse(&with(&[
        ("use_cla", json!(true)),
        ("cla_share_factor", json!(2)),
        ("kv_source_layers", json!([0, 0, 2, 2])),
    ]))
    .unwrap();
    assert_eq!(both.kv_sharing.to_lckv_string(), "0_0_2_2");
    // HF `layer_types` lists attention kinds; it is not a map and is not read.
    let lt = parse(&with(&[(
        "layer_types",
        json!([
            "full_attention",
            "sliding_attention",
            "full_attention",
            "full_attention"
        ]),
    )]))
    .unwrap();
    assert_eq!(lt.kv_sharing.num_producers(), 4);
}

fn key_of(e: &ConfigError) -> Option<&str> {
    match e {
        ConfigError::Missing { key, .. }
        | ConfigError::InvalidValue { key, .. }
        | ConfigError::Zero { key }
        | ConfigError::MapLength { key, .. }
        | ConfigError::FirstLayerNotProducer { key, .. }
        | ConfigError::SourceLater { key, .. }
        | ConfigError::SourceIsConsumer { key, .. }
        | ConfigError::BadMap { key, .. }
        | ConfigError::BadQuantity { key, .. } => Some(key),
        _ => None,
    }
}

#[test]
fn invalid_configs_give_the_specific_error() {
    type Check = fn(&ConfigError) -> bool;
    let cases: Vec<(&str, String, Check, &str)> = vec![
        (
            "missing hidden_size",
            with(&[("hidden_size", Value::Null)]),
            |e| matches!(e, ConfigError::Missing { .. }),
            "hidden_size",
        ),
        (
            "missing num_hidden_layers",
            with(&[("num_hidden_layers", Value::Null)]),
            |e| matches!(e, ConfigError::Missing { .. }),
            "num_hidden_layers",
        ),
        (
            "zero hidden_size",
            with(&[("hidden_size", json!(0))]),
            |e| matches!(e, ConfigError::Zero { .. }),
            "hidden_size",
        ),
        (
            "zero kv heads",
            with(&[("num_key_value_heads", json!(0))]),
            |e| matches!(e, ConfigError::Zero { .. }),
            "num_key_value_heads",
        ),
        (
            "heads not a multiple",
            with(&[("num_key_value_heads", json!(3))]),
            |e| {
                matches!(
                    e,
                    ConfigError::HeadsNotMultiple {
                        q_heads: 4,
                        kv_heads: 3
                    }
                )
            },
            "num_key_value_heads",
        ),
        (
            "more kv heads than q heads",
            with(&[("num_key_value_heads", json!(8))]),
            |e| matches!(e, ConfigError::HeadsNotMultiple { .. }),
            "num_attention_heads",
        ),
        (
            "odd head_dim",
            with(&[("head_dim", json!(15))]),
            |e| matches!(e, ConfigError::OddHeadDim { head_dim: 15 }),
            "head_dim",
        ),
        (
            "head_dim underivable",
            with(&[
                ("num_attention_heads", json!(6)),
                ("num_key_value_heads", json!(1)),
            ]),
            |e| matches!(e, ConfigError::HeadDimUnderivable { .. }),
            "head_dim",
        ),
        (
            "map too short",
            with(&[("kv_source_layers", json!([0, 0, 2]))]),
            |e| {
                matches!(
                    e,
                    ConfigError::MapLength {
                        expected: 4,
                        found: 3,
                        ..
                    }
                )
            },
            "kv_source_layers",
        ),
        (
            "map too long",
            with(&[("kv_source_layers", json!([0, 0, 2, 2, 4]))]),
            |e| matches!(e, ConfigError::MapLength { found: 5, .. }),
            "kv_source_layers",
        ),
        (
            "source later",
            with(&[("kv_source_layers", json!([0, 2, 2, 2]))]),
            |e| {
                matches!(
                    e,
                    ConfigError::SourceLater {
                        layer: 1,
                        source_layer: 2,
                        ..
                    }
                )
            },
            "kv_source_layers",
        ),
        (
            "source is a consumer",
            with(&[("kv_source_layers", json!([0, 0, 1, 3]))]),
            |e| {
                matches!(
                    e,
                    ConfigError::SourceIsConsumer {
                        layer: 2,
                        source_layer: 1,
                        source_of_source: 0,
                        ..
                    }
                )
            },
            "kv_source_layers",
        ),
        (
            "layer 0 not a producer",
            with(&[("kv_source_layers", json!([1, 1, 2, 3]))]),
            |e| {
                matches!(
                    e,
                    ConfigError::FirstLayerNotProducer {
                        source_layer: 1,
                        ..
                    }
                )
            },
            "kv_source_layers",
        ),
        (
            "map not a list",
            with(&[("kv_source_layers", json!("0_0_2_2"))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "kv_source_layers",
        ),
        (
            "map with a negative entry",
            with(&[("kv_source_layers", json!([0, -1, 2, 3]))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "kv_source_layers",
        ),
        (
            "conflicting sharing keys",
            with(&[
                ("use_cla", json!(true)),
                ("cla_share_factor", json!(2)),
                ("kv_source_layers", json!([0, 1, 2, 3])),
            ]),
            |e| matches!(e, ConfigError::ConflictingSharing { .. }),
            "kv_source_layers",
        ),
        (
            "use_cla without a factor",
            with(&[("use_cla", json!(true))]),
            |e| matches!(e, ConfigError::Missing { .. }),
            "cla_share_factor",
        ),
        (
            "zero factor",
            with(&[("use_cla", json!(true)), ("cla_share_factor", json!(0))]),
            |e| matches!(e, ConfigError::Zero { .. }),
            "cla_share_factor",
        ),
        (
            "use_cla not a bool",
            with(&[("use_cla", json!("yes")), ("cla_share_factor", json!(2))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "use_cla",
        ),
        (
            "non-numeric value",
            with(&[("num_attention_heads", json!("four"))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "num_attention_heads",
        ),
        (
            "negative number",
            with(&[("intermediate_size", json!(-128))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "intermediate_size",
        ),
        (
            "fractional size",
            with(&[("hidden_size", json!(64.5))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "hidden_size",
        ),
        (
            "eos id beyond the vocabulary",
            with(&[("eos_token_id", json!([2, 100]))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "eos_token_id",
        ),
        (
            "bos id beyond the vocabulary",
            with(&[("bos_token_id", json!(1000))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "bos_token_id",
        ),
        (
            "non-positive rope_theta",
            with(&[("rope_theta", json!(-1.0))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "rope_theta",
        ),
        (
            "absurd layer count",
            with(&[("num_hidden_layers", json!(1u64 << 40))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "num_hidden_layers",
        ),
        (
            "absurd width",
            with(&[("intermediate_size", json!(u64::MAX))]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "intermediate_size",
        ),
        (
            "absurd head count",
            with(&[
                ("num_attention_heads", json!(1u64 << 19)),
                ("num_key_value_heads", json!(1)),
                ("head_dim", json!(64)),
            ]),
            |e| matches!(e, ConfigError::InvalidValue { .. }),
            "num_attention_heads",
        ),
    ];
    for (what, text, check, key) in cases {
        let err = parse(&text).expect_err(what);
        assert!(check(&err), "{what}: wrong variant {err:?}");
        if let Some(k) = key_of(&err) {
            assert_eq!(k, key, "{what}");
        }
        assert!(
            err.to_string().contains(key),
            "{what}: `{err}` does not name {key}"
        );
    }
}

#[test]
fn not_json_or_not_an_object() {
    for text in [
        "",
        "{",
        "[1, 2]",
        "null",
        "\"config\"",
        "{\"hidden_size\": }",
    ] {
        match parse(text) {
            Err(ConfigError::Json { source_name, .. }) => assert_eq!(source_name, "config.json"),
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

#[test]
fn validate_after_hand_edits() {
    let mut c = parse(&with(&[])).unwrap();
    c.head_dim = 7;
    assert_eq!(c.validate(), Err(ConfigError::OddHeadDim { head_dim: 7 }));
    c.head_dim = 16;
    c.num_key_value_heads = 3;
    assert!(matches!(
        c.validate(),
        Err(ConfigError::HeadsNotMultiple { .. })
    ));
}
