//! The models of the paper's experiments, as configs (paper Table 1 and the 3B runs of
//! section 4.2), with the KV bytes per token and validation perplexity the paper reports.
//!
//! Names are the paper's (`H128-MQA-CLA2`); the 3B models, which the paper names like two
//! of the 1B ones, carry a `-3B` suffix (`H128-MQA-CLA2-3B`). Lookup ignores case. Two
//! group names select several presets: `paper-1b` (the 20 rows of Table 1) and `paper-3b`
//! (the two 3B models).
//!
//! What the paper does not give is an assumption, recorded here:
//! - `vocab_size` is 32000 (a Llama-style tokenizer). It changes the parameter count and
//!   the weight bytes only, never the KV bytes.
//! - `max_position_embeddings` is 2048 (the 1B runs' sequence length; the 3B runs are
//!   assumed to use the same), `rope_theta` 10000, `rms_norm_eps` 1e-5, untied LM head,
//!   BOS 1, EOS 2.
//! - Models with sharing give each producer layer a separate norm scale on its K/V input
//!   ([`ParamOptions::kv_input_layernorm`]), as the paper's CLA models do; the models
//!   without sharing do not.
//! - The 3B perplexities: the reference lists `H128-MQA` then `H128-MQA-CLA2` with
//!   "9.52 vs 9.34 after learning-rate tuning"; they are recorded in that order.

use crate::config::ModelConfig;
use crate::error::{ConfigError, Result};
use crate::memory::kv_bytes_per_token;
use crate::params::ParamOptions;
use crate::sharing::SharingPattern;

/// The group of the 20 1B models of the paper's Table 1.
pub const GROUP_PAPER_1B: &str = "paper-1b";
/// The group of the two 3B models.
pub const GROUP_PAPER_3B: &str = "paper-3b";

/// What the paper reports for a model (16-bit cache).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaperFigures {
    /// Layers that produce K/V.
    pub kv_layers: usize,
    /// KV-cache bytes per token at 16 bits.
    pub kv_bytes_per_token: u64,
    /// Validation perplexity.
    pub val_ppl: f64,
}

/// One model of the paper.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// The paper's name, e.g. `H128-MQA-CLA2` (3B models: `H128-MQA-CLA2-3B`).
    pub name: &'static str,
    /// The group it belongs to ([`GROUP_PAPER_1B`] or [`GROUP_PAPER_3B`]).
    pub group: &'static str,
    /// Its shape.
    pub config: ModelConfig,
    /// The parameter-count options of the paper's models (see the module docs).
    pub param_options: ParamOptions,
    /// What the paper reports.
    pub paper: PaperFigures,
}

/// One row: name, d_head, Q heads, KV heads, sharing, KV layers, KV bytes/token, val PPL.
type Row = (
    &'static str,
    usize,
    usize,
    usize,
    SharingPattern,
    usize,
    u64,
    f64,
);

use SharingPattern::{Cla, Cla2DenseBack, Cla2DenseFront, Cla2KeepEnds, None as Dense};

/// Table 1 of the paper: d_model 2048, 20 layers, FFN 5472.
const TABLE_1: [Row; 20] = [
    ("H128-MHA", 128, 16, 16, Dense, 20, 163840, 13.15),
    ("H128-GQA4", 128, 16, 4, Dense, 20, 40960, 13.36),
    ("H128-GQA2", 128, 16, 2, Dense, 20, 20480, 13.52),
    ("H128-MQA", 128, 16, 1, Dense, 20, 10240, 13.54),
    ("H64-MQA", 64, 32, 1, Dense, 20, 5120, 13.81),
    ("H46-MQA", 46, 45, 1, Dense, 20, 3680, 13.96),
    ("H32-MQA", 32, 64, 1, Dense, 20, 2560, 14.37),
    ("H512-MQA-CLA2", 512, 4, 1, Cla(2), 10, 20480, 13.49),
    ("H256-MQA-CLA2", 256, 8, 1, Cla(2), 10, 10240, 13.51),
    ("H128-MQA-CLA2", 128, 16, 1, Cla(2), 10, 5120, 13.60),
    ("H90-MQA-CLA2", 90, 22, 1, Cla(2), 10, 3600, 13.73),
    ("H64-MQA-CLA2", 64, 32, 1, Cla(2), 10, 2560, 13.89),
    ("H256-GQA4-CLA2", 256, 8, 4, Cla(2), 10, 40960, 13.38),
    ("H128-GQA4-CLA2", 128, 16, 4, Cla(2), 10, 20480, 13.48),
    ("H128-GQA2-CLA2", 128, 16, 2, Cla(2), 10, 10240, 13.59),
    ("H128-MQA-CLA3", 128, 16, 1, Cla(3), 7, 3584, 13.77),
    ("H128-MQA-CLA4", 128, 16, 1, Cla(4), 5, 2560, 13.95),
    (
        "H128-MQA-CLA2-KeepEnds",
        128,
        16,
        1,
        Cla2KeepEnds,
        11,
        5632,
        13.62,
    ),
    (
        "H128-MQA-CLA2-DenseFront",
        128,
        16,
        1,
        Cla2DenseFront,
        11,
        5632,
        13.75,
    ),
    (
        "H128-MQA-CLA2-DenseBack",
        128,
        16,
        1,
        Cla2DenseBack,
        11,
        5632,
        14.03,
    ),
];

/// The 3B models: d_model 3072, 32 layers, FFN 8192, d_head 128 (24 query heads).
const TABLE_3B: [Row; 2] = [
    ("H128-MQA-3B", 128, 24, 1, Dense, 32, 16384, 9.52),
    ("H128-MQA-CLA2-3B", 128, 24, 1, Cla(2), 16, 8192, 9.34),
];

/// Assumed vocabulary size of every preset (see the module docs).
pub const ASSUMED_VOCAB_SIZE: usize = 32000;

fn build(group: &'static str, (hidden, layers, ffn): (usize, usize, usize), row: &Row) -> Preset {
    let &(name, head_dim, q_heads, kv_heads, pattern, kv_layers, kv_bytes, ppl) = row;
    let config = ModelConfig {
        hidden_size: hidden,
        intermediate_size: ffn,
        num_attention_heads: q_heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size: ASSUMED_VOCAB_SIZE,
        max_position_embeddings: 2048,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        kv_sharing: pattern
            .build(layers)
            .expect("every preset pattern fits its layer count"),
    };
    debug_assert!(config.validate().is_ok(), "{name}");
    Preset {
        name,
        group,
        config,
        param_options: ParamOptions {
            kv_input_layernorm: pattern != Dense,
        },
        paper: PaperFigures {
            kv_layers,
            kv_bytes_per_token: kv_bytes,
            val_ppl: ppl,
        },
    }
}

/// Every preset: the 20 models of Table 1, then the two 3B models.
pub fn all() -> Vec<Preset> {
    let one_b = TABLE_1
        .iter()
        .map(|r| build(GROUP_PAPER_1B, (2048, 20, 5472), r));
    let three_b = TABLE_3B
        .iter()
        .map(|r| build(GROUP_PAPER_3B, (3072, 32, 8192), r));
    one_b.chain(three_b).collect()
}

/// Every preset name, then the group names, for help texts and error messages.
pub fn names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = TABLE_1.iter().chain(&TABLE_3B).map(|r| r.0).collect();
    names.extend([GROUP_PAPER_1B, GROUP_PAPER_3B]);
    names
}

/// The presets that `name` selects: one preset, or every preset of a group. Case is
/// ignored. An unknown name is [`ConfigError::UnknownPreset`], listing the known ones.
pub fn find(name: &str) -> Result<Vec<Preset>> {
    let wanted = name.trim();
    let selected: Vec<Preset> = all()
        .into_iter()
        .filter(|p| p.name.eq_ignore_ascii_case(wanted) || p.group.eq_ignore_ascii_case(wanted))
        .collect();
    if selected.is_empty() {
        return Err(ConfigError::UnknownPreset {
            name: name.into(),
            known: names().join(", "),
        });
    }
    Ok(selected)
}

/// Whether `name` (case ignored) is a group name rather than one preset's.
pub fn is_group(name: &str) -> bool {
    let wanted = name.trim();
    [GROUP_PAPER_1B, GROUP_PAPER_3B]
        .iter()
        .any(|g| g.eq_ignore_ascii_case(wanted))
}

/// The one preset named `name` (case ignored); a group name or an unknown name is
/// [`ConfigError::UnknownPreset`].
pub fn get(name: &str) -> Result<Preset> {
    let wanted = name.trim();
    all()
        .into_iter()
        .find(|p| p.name.eq_ignore_ascii_case(wanted))
        .ok_or_else(|| ConfigError::UnknownPreset {
            name: name.into(),
            known: names().join(", "),
        })
}

impl Preset {
    /// KV-cache bytes per token of this preset's config at 16 bits, computed (not copied
    /// from the paper).
    pub fn kv_bytes_per_token_16bit(&self) -> u64 {
        kv_bytes_per_token(&self.config, crate::dtype::DType::BF16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup() {
        assert_eq!(find("paper-1b").unwrap().len(), 20);
        assert_eq!(find("PAPER-3B").unwrap().len(), 2);
        assert!(is_group("Paper-1B") && !is_group("H128-MQA"));
        assert_eq!(get("h128-mqa-cla2").unwrap().name, "H128-MQA-CLA2");
        assert_eq!(get("H128-MQA-CLA2-3B").unwrap().config.num_layers(), 32);
        assert_eq!(find(" H46-MQA ").unwrap()[0].config.head_dim, 46);
        match get("paper-1b") {
            Err(ConfigError::UnknownPreset { name, known }) => {
                assert_eq!(name, "paper-1b");
                assert!(known.contains("H128-MQA-CLA2-KeepEnds"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            find("H128-MQA-CLA9"),
            Err(ConfigError::UnknownPreset { .. })
        ));
    }

    #[test]
    fn every_preset_is_valid_and_unique() {
        let all = all();
        for p in &all {
            p.config.validate().unwrap();
            assert_eq!(p.paper.kv_bytes_per_token, p.kv_bytes_per_token_16bit());
        }
        let mut names = names();
        names.sort_unstable_by_key(|n| n.to_ascii_lowercase());
        names.dedup_by_key(|n| n.to_ascii_lowercase());
        assert_eq!(names.len(), all.len() + 2);
    }
}
