//! The paper's Table 1 (and its 3B pair), reproduced from the presets' configs by the
//! crate's arithmetic. The expected numbers are typed here from the paper, independently
//! of `presets.rs`.

use cla_core::memory::kv_bytes_per_token;
use cla_core::{DType, presets};

/// name, d_head, Q heads, KV heads, KV layers, KV bytes/token (16-bit), val PPL.
const PAPER: [(&str, usize, usize, usize, usize, u64, f64); 20] = [
    ("H128-MHA", 128, 16, 16, 20, 163840, 13.15),
    ("H128-GQA4", 128, 16, 4, 20, 40960, 13.36),
    ("H128-GQA2", 128, 16, 2, 20, 20480, 13.52),
    ("H128-MQA", 128, 16, 1, 20, 10240, 13.54),
    ("H64-MQA", 64, 32, 1, 20, 5120, 13.81),
    ("H46-MQA", 46, 45, 1, 20, 3680, 13.96),
    ("H32-MQA", 32, 64, 1, 20, 2560, 14.37),
    ("H512-MQA-CLA2", 512, 4, 1, 10, 20480, 13.49),
    ("H256-MQA-CLA2", 256, 8, 1, 10, 10240, 13.51),
    ("H128-MQA-CLA2", 128, 16, 1, 10, 5120, 13.60),
    ("H90-MQA-CLA2", 90, 22, 1, 10, 3600, 13.73),
    ("H64-MQA-CLA2", 64, 32, 1, 10, 2560, 13.89),
    ("H256-GQA4-CLA2", 256, 8, 4, 10, 40960, 13.38),
    ("H128-GQA4-CLA2", 128, 16, 4, 10, 20480, 13.48),
    ("H128-GQA2-CLA2", 128, 16, 2, 10, 10240, 13.59),
    ("H128-MQA-CLA3", 128, 16, 1, 7, 3584, 13.77),
    ("H128-MQA-CLA4", 128, 16, 1, 5, 2560, 13.95),
    ("H128-MQA-CLA2-KeepEnds", 128, 16, 1, 11, 5632, 13.62),
    ("H128-MQA-CLA2-DenseFront", 128, 16, 1, 11, 5632, 13.75),
    ("H128-MQA-CLA2-DenseBack", 128, 16, 1, 11, 5632, 14.03),
];

#[test]
fn table_1_rows_reproduced() {
    let presets = presets::find("paper-1b").unwrap();
    assert_eq!(presets.len(), PAPER.len());
    for (p, &(name, d_head, q, kv, kv_layers, bytes, ppl)) in presets.iter().zip(&PAPER) {
        let c = &p.config;
        assert_eq!(p.name, name);
        assert_eq!(
            (c.hidden_size, c.num_layers(), c.intermediate_size),
            (2048, 20, 5472),
            "{name}"
        );
        assert_eq!(
            (c.head_dim, c.num_attention_heads, c.num_key_value_heads),
            (d_head, q, kv),
            "{name}"
        );
        assert_eq!(c.kv_sharing.num_producers(), kv_layers, "{name}");
        for dtype in [DType::F16, DType::BF16] {
            assert_eq!(kv_bytes_per_token(c, dtype), bytes, "{name} {dtype}");
        }
        assert_eq!(kv_bytes_per_token(c, DType::F32), 2 * bytes, "{name}");
        assert_eq!(p.paper.kv_layers, kv_layers, "{name}");
        assert_eq!(p.paper.kv_bytes_per_token, bytes, "{name}");
        assert_eq!(p.paper.val_ppl, ppl, "{name}");
    }
}

#[test]
fn non_uniform_maps_are_the_papers() {
    let map = |name: &str| {
        presets::get(name)
            .unwrap()
            .config
            .kv_sharing
            .to_lckv_string()
    };
    assert_eq!(
        map("H128-MQA-CLA2-KeepEnds"),
        "0_1_1_3_3_5_5_7_7_9_9_11_11_13_13_15_15_17_17_19"
    );
    assert_eq!(
        map("H128-MQA-CLA2-DenseFront"),
        "0_1_2_3_4_5_6_7_8_9_9_9_9_9_9_9_9_9_9_19"
    );
    assert_eq!(
        map("H128-MQA-CLA2-DenseBack"),
        "0_1_1_1_1_1_1_1_1_1_1_11_12_13_14_15_16_17_18_19"
    );
    // CLA3 on 20 layers: the short group {0, 1} comes first.
    assert_eq!(
        map("H128-MQA-CLA3"),
        "0_0_2_2_2_5_5_5_8_8_8_11_11_11_14_14_14_17_17_17"
    );
    assert_eq!(
        map("H128-MQA-CLA2"),
        "0_0_2_2_4_4_6_6_8_8_10_10_12_12_14_14_16_16_18_18"
    );
}

#[test]
fn three_b_pair() {
    let presets = presets::find("paper-3b").unwrap();
    let expected = [("H128-MQA-3B", 32, 16384), ("H128-MQA-CLA2-3B", 16, 8192)];
    assert_eq!(presets.len(), 2);
    for (p, &(name, kv_layers, bytes)) in presets.iter().zip(&expected) {
        let c = &p.config;
        assert_eq!(p.name, name);
        assert_eq!(
            (
                c.hidden_size,
                c.num_layers(),
                c.intermediate_size,
                c.head_dim
            ),
            (3072, 32, 8192, 128)
        );
        assert_eq!(c.num_key_value_heads, 1);
        assert_eq!(c.kv_sharing.num_producers(), kv_layers);
        assert_eq!(kv_bytes_per_token(c, DType::BF16), bytes);
        assert_eq!(p.paper.kv_bytes_per_token, bytes);
    }
}
