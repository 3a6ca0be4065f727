//! Property tests of the layer -> K/V-source map: named patterns against an independent
//! reference, round trips, targeted corruptions, and junk input.

use cla_core::{ConfigError, KvSharing, ModelConfig, SharingPattern};
use proptest::prelude::*;

/// The producer layers each pattern documents, written independently of `sharing.rs`.
fn reference_producers(pattern: SharingPattern, l: usize) -> Vec<usize> {
    match pattern {
        SharingPattern::None => (0..l).collect(),
        // Groups of n, the short one first: producers at l % n + k * n (and 0).
        SharingPattern::Cla(n) => {
            let mut p: Vec<usize> = (0..l).filter(|i| i % n == l % n).collect();
            if !l.is_multiple_of(n) {
                p.insert(0, 0);
            }
            p
        }
        SharingPattern::Hunyuan(n) => (0..l).step_by(n).collect(),
        // 0 and l-1 own; the middle layers 1..=l-2 are paired from the end,
        // (l-3, l-2), (l-5, l-4), ..., leaving a lone layer 1 when their count is odd.
        SharingPattern::Cla2KeepEnds => {
            let mut p = vec![0];
            if l >= 2 {
                let mid = l - 2;
                if mid % 2 == 1 {
                    p.push(1);
                }
                p.extend((1..=mid).filter(|k| (l - 1 - k).is_multiple_of(2)));
                p.push(l - 1);
            }
            p.sort_unstable();
            p.dedup();
            p
        }
        SharingPattern::Cla2DenseFront => {
            let mut p: Vec<usize> = (0..l / 2).collect();
            p.push(l - 1);
            p
        }
        SharingPattern::Cla2DenseBack => {
            let mut p = vec![0, 1];
            p.extend(l - l / 2 + 1..l);
            p
        }
    }
}

/// The map in which every consumer reads the nearest producer before it.
fn map_from_producers(l: usize, producers: &[usize]) -> Vec<usize> {
    let mut last = 0;
    (0..l)
        .map(|i| {
            if producers.contains(&i) {
                last = i;
            }
            last
        })
        .collect()
}

fn any_pattern() -> impl Strategy<Value = SharingPattern> {
    prop_oneof![
        Just(SharingPattern::None),
        (2usize..9).prop_map(SharingPattern::Cla),
        (1usize..9).prop_map(SharingPattern::Hunyuan),
        Just(SharingPattern::Cla2KeepEnds),
        Just(SharingPattern::Cla2DenseFront),
        Just(SharingPattern::Cla2DenseBack),
    ]
}

/// A random valid map: each layer after 0 either produces or reads an earlier producer.
fn valid_map(max_layers: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 1..max_layers).prop_map(
        |choices| {
            let mut sources = Vec::with_capacity(choices.len());
            let mut producers = Vec::new();
            for (i, (produce, pick)) in choices.into_iter().enumerate() {
                if i == 0 || produce {
                    producers.push(i);
                    sources.push(i);
                } else {
                    sources.push(*pick.get(&producers));
                }
            }
            sources
        },
    )
}

/// A random valid config around `sources`.
fn config_with(sources: Vec<usize>) -> impl Strategy<Value = ModelConfig> {
    (
        1usize..9,
        1usize..9,
        1usize..65,
        1usize..4096,
        1usize..4096,
        2usize..200_000,
        any::<bool>(),
        1e-12f64..1.0,
        1.0f64..1e7,
        prop::option::of(any::<prop::sample::Index>()),
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
    )
        .prop_map(
            move |(kv, group, half_dim, hidden, ffn, vocab, tied, eps, theta, bos, eos)| {
                ModelConfig {
                    hidden_size: hidden,
                    intermediate_size: ffn,
                    num_attention_heads: kv * group,
                    num_key_value_heads: kv,
                    head_dim: 2 * half_dim,
                    vocab_size: vocab,
                    max_position_embeddings: 4096,
                    rms_norm_eps: eps,
                    rope_theta: theta,
                    tie_word_embeddings: tied,
                    bos_token_id: bos.map(|i| i.index(vocab) as u32),
                    eos_token_ids: eos.iter().map(|i| i.index(vocab) as u32).collect(),
                    kv_sharing: KvSharing::from_sources("test", sources.clone()).unwrap(),
                }
            },
        )
}

proptest! {
    #[test]
    fn named_patterns_give_their_documented_maps(pattern in any_pattern(), l in 1usize..80) {
        let built = pattern.build(l);
        let needs_three = matches!(
            pattern,
            SharingPattern::Cla2DenseFront | SharingPattern::Cla2DenseBack
        );
        if needs_three && l < 3 {
            let rejected = matches!(built, Err(ConfigError::BadMap { .. }));
            prop_assert!(rejected, "{} on {} layers: {:?}", pattern, l, built);
            return Ok(());
        }
        let map = built.unwrap();
        let producers = reference_producers(pattern, l);
        prop_assert_eq!(map.producers(), producers.as_slice());
        let expected = map_from_producers(l, &producers);
        prop_assert_eq!(map.sources(), expected.as_slice());
        // The name parses back to the same pattern and map.
        let name = pattern.to_string();
        prop_assert_eq!(name.parse::<SharingPattern>().unwrap(), pattern);
        prop_assert_eq!(KvSharing::parse("--kv-map", &name, l).unwrap(), map);
    }

    #[test]
    fn cla_n_short_group_first(n in 2usize..12, l in 1usize..120) {
        let map = SharingPattern::Cla(n).build(l).unwrap();
        prop_assert_eq!(map.num_producers(), l.div_ceil(n));
        // Group sizes: the first is l - n * (groups - 1) (between 1 and n), the others n.
        let mut sizes: Vec<usize> = map
            .producers()
            .iter()
            .map(|&p| 1 + map.consumers_of(p).count())
            .collect();
        let first = sizes.remove(0);
        prop_assert_eq!(first, l - n * (l.div_ceil(n) - 1));
        prop_assert!(first >= 1 && first <= n);
        prop_assert!(sizes.iter().all(|&s| s == n));
        // Hunyuan's rule puts the short group last instead.
        let hy = SharingPattern::Hunyuan(n).build(l).unwrap();
        let mut hy_sizes: Vec<usize> =
            hy.producers().iter().map(|&p| 1 + hy.consumers_of(p).count()).collect();
        let last = hy_sizes.pop().unwrap();
        prop_assert_eq!(last, first);
        prop_assert!(hy_sizes.iter().all(|&s| s == n));
    }

    #[test]
    fn queries_agree_with_the_sources(sources in valid_map(64)) {
        let map = KvSharing::from_sources("test", sources.clone()).unwrap();
        prop_assert_eq!(map.num_layers(), sources.len());
        for (layer, &s) in sources.iter().enumerate() {
            prop_assert_eq!(map.producer_of(layer), s);
            prop_assert_eq!(map.is_producer(layer), s == layer);
            prop_assert_eq!(map.producers()[map.slot_of(layer)], s);
            prop_assert_eq!(map.slot_of_producer(layer).is_some(), s == layer);
        }
        let consumers: usize = map.producers().iter().map(|&p| map.consumers_of(p).count()).sum();
        prop_assert_eq!(consumers + map.num_producers(), sources.len());
        prop_assert_eq!(map.last_producer(), *map.producers().last().unwrap());
    }

    #[test]
    fn maps_survive_text_round_trips(sources in valid_map(64)) {
        let map = KvSharing::from_sources("test", sources.clone()).unwrap();
        let l = sources.len();
        let lckv = map.to_lckv_string();
        prop_assert_eq!(&KvSharing::parse("--kv-map", &lckv, l).unwrap(), &map);
        let spaced = lckv.replace('_', " ");
        prop_assert_eq!(&KvSharing::parse("--kv-map", &spaced, l).unwrap(), &map);
        let json = serde_json::to_string(&sources).unwrap();
        prop_assert_eq!(&KvSharing::parse("--kv-map", &json, l).unwrap(), &map);
        if let Some(p) = map.pattern_name() {
            prop_assert_eq!(p.build(l).unwrap(), map);
        }
    }

    #[test]
    fn configs_survive_a_json_round_trip(
        config in valid_map(48).prop_flat_map(config_with)
    ) {
        prop_assert!(config.validate().is_ok());
        let text = config.to_json_string();
        let back = ModelConfig::from_json_str(&text, "config.json").unwrap();
        prop_assert_eq!(back, config);
    }

    #[test]
    fn source_later_is_rejected(
        sources in valid_map(64).prop_filter("two layers", |s| s.len() >= 2),
        pick in any::<prop::sample::Index>(),
        pick_later in any::<prop::sample::Index>(),
    ) {
        let l = sources.len();
        let layer = 1 + pick.index(l - 1);
        prop_assume!(layer + 1 < l);
        let later = layer + 1 + pick_later.index(l - layer - 1);
        let mut bad = sources;
        bad[layer] = later;
        let expected = ConfigError::SourceLater {
            key: "--kv-map".into(),
            layer,
            source_layer: later,
        };
        prop_assert_eq!(KvSharing::from_sources("--kv-map", bad.clone()), Err(expected.clone()));
        let text = bad.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("_");
        prop_assert_eq!(KvSharing::parse("--kv-map", &text, l), Err(expected));
    }

    #[test]
    fn pointing_at_a_consumer_is_rejected(
        sources in valid_map(64),
        pick_consumer in any::<prop::sample::Index>(),
        pick_layer in any::<prop::sample::Index>(),
    ) {
        let l = sources.len();
        let consumers: Vec<usize> = (0..l).filter(|&i| sources[i] != i).collect();
        prop_assume!(!consumers.is_empty());
        let consumer = *pick_consumer.get(&consumers);
        prop_assume!(consumer + 1 < l);
        let layer = consumer + 1 + pick_layer.index(l - consumer - 1);
        let mut bad = sources.clone();
        bad[layer] = consumer;
        prop_assert_eq!(
            KvSharing::from_sources("kv_source_layers", bad),
            Err(ConfigError::SourceIsConsumer {
                key: "kv_source_layers".into(),
                layer,
                source_layer: consumer,
                source_of_source: sources[consumer],
            })
        );
    }

    #[test]
    fn layer_zero_must_produce(sources in valid_map(64), first in 1usize..1000) {
        let mut bad = sources;
        bad[0] = first;
        prop_assert_eq!(
            KvSharing::from_sources("kv_source_layers", bad),
            Err(ConfigError::FirstLayerNotProducer {
                key: "kv_source_layers".into(),
                source_layer: first,
            })
        );
    }

    #[test]
    fn wrong_length_is_rejected(
        config in valid_map(32).prop_flat_map(config_with),
        delta in prop_oneof![Just(-1i64), 1i64..4],
    ) {
        let l = config.num_layers();
        prop_assume!(l as i64 + delta >= 1);
        let mut sources = config.kv_sharing.sources().to_vec();
        if delta < 0 {
            sources.pop();
        } else {
            sources.extend(l..l + delta as usize);
        }
        let found = sources.len();
        let expected = |key: &str| ConfigError::MapLength { key: key.into(), expected: l, found };
        // Typed on the command line.
        let text = sources.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
        prop_assert_eq!(KvSharing::parse("--kv-map", &text, l), Err(expected("--kv-map")));
        // In a config.json.
        let mut json = config.to_json_value();
        json["kv_source_layers"] = serde_json::json!(sources);
        prop_assert_eq!(
            ModelConfig::from_json_str(&json.to_string(), "config.json"),
            Err(expected("kv_source_layers"))
        );
    }

    #[test]
    fn junk_map_text_never_panics(text in "\\PC{0,40}", l in 0usize..40) {
        let _ = KvSharing::parse("--kv-map", &text, l);
        let _ = text.parse::<SharingPattern>();
    }

    #[test]
    fn map_like_text_never_panics(text in "[0-9_, \\[\\]a-z-]{0,40}", l in 0usize..40) {
        if let Ok(map) = KvSharing::parse("--kv-map", &text, l) {
            prop_assert_eq!(map.num_layers(), l);
        }
    }

    #[test]
    fn junk_config_text_never_panics(text in "\\PC{0,200}") {
        let _ = ModelConfig::from_json_str(&text, "config.json");
    }

    #[test]
    fn junk_config_values_never_panic(values in prop::collection::vec(junk_value(), 12)) {
        let keys = [
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
            "kv_source_layers", "use_cla", "cla_share_factor", "eos_token_id",
        ];
        let mut obj = serde_json::Map::new();
        for (k, v) in keys.iter().zip(values) {
            if !v.is_null() {
                obj.insert((*k).to_string(), v);
            }
        }
        let text = serde_json::Value::Object(obj).to_string();
        if let Ok(c) = ModelConfig::from_json_str(&text, "config.json") {
            prop_assert!(c.validate().is_ok());
        }
    }
}

/// Plausible and implausible JSON values for config keys.
fn junk_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    prop_oneof![
        Just(Value::Null),
        (0u64..10).prop_map(|n| json!(n)),
        (0u64..5000).prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<bool>().prop_map(Value::Bool),
        "\\PC{0,8}".prop_map(Value::String),
        prop::collection::vec(0u64..6, 0..8).prop_map(|v| json!(v)),
        prop::collection::vec(any::<i64>(), 0..4).prop_map(|v| json!(v)),
    ]
}
