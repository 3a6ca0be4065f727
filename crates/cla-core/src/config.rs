//! [`ModelConfig`]: a Llama-style decoder with Cross-Layer Attention, read from and written
//! to a Hugging Face-style `config.json`.
//!
//! The K/V sharing map is read from `kv_source_layers` (canonical), or from Hunyuan-Large's
//! `use_cla` + `cla_share_factor`; absent, every layer produces. Hugging Face's
//! `layer_types` key lists attention kinds, not a map, and is deliberately not read.
//! Unknown keys are ignored.

use crate::error::{ConfigError, Result};
use crate::sharing::{KvSharing, SharingPattern};
use serde_json::{Map, Value, json};

/// The shape of a decoder-only CLA model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model width (`hidden_size`).
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (`intermediate_size`).
    pub intermediate_size: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per producer layer (MHA: = query heads; MQA: 1; GQA: between).
    pub num_key_value_heads: usize,
    /// Dimension of one head; `num_attention_heads * head_dim` may differ from `hidden_size`.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Longest sequence the model supports.
    pub max_position_embeddings: usize,
    /// Epsilon of RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (Hugging Face allows one id or a list).
    pub eos_token_ids: Vec<u32>,
    /// Which layer's keys and values each layer attends to. Its length is the layer count.
    pub kv_sharing: KvSharing,
}

/// Most decoder layers a config may have. Far above any real model; the bound keeps a
/// corrupt `num_hidden_layers` from allocating a huge map.
pub const MAX_LAYERS: usize = 1 << 12;

/// Largest `hidden_size`, `intermediate_size`, `head_dim`, head count, and query or
/// key/value width (`heads * head_dim`) a config may have. Far above any real model; with
/// [`MAX_LAYERS`] and [`MAX_VOCAB`] it keeps every parameter and byte count of
/// [`crate::params`] and [`crate::memory`] well inside `u64`.
pub const MAX_WIDTH: usize = 1 << 20;

/// Largest `vocab_size`: token ids are `u32`.
pub const MAX_VOCAB: usize = u32::MAX as usize;

/// Keys this crate writes and reads; everything else in a config.json is ignored.
const SHARING_KEYS: [&str; 3] = ["kv_source_layers", "use_cla", "cla_share_factor"];

impl ModelConfig {
    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.kv_sharing.num_layers()
    }

    /// Query heads per K/V head (1 for MHA).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Width of the concatenated queries (`num_attention_heads * head_dim`).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated keys (or values) of one producer layer.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Parses the text of a `config.json`. `source_name` (e.g. the file name) prefixes
    /// JSON syntax errors.
    pub fn from_json_str(text: &str, source_name: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json {
            source_name: source_name.into(),
            message: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(ConfigError::Json {
                source_name: source_name.into(),
                message: "the top level is not a JSON object".into(),
            });
        };
        Self::from_json_map(&map)
    }

    /// Builds a config from a parsed JSON object.
    pub fn from_json_map(map: &Map<String, Value>) -> Result<Self> {
        let r = Reader(map);
        let hidden_size = r.positive("hidden_size")?;
        let intermediate_size = r.positive("intermediate_size")?;
        let num_layers = r.positive("num_hidden_layers")?;
        // Checked before any map of `num_layers` entries is built.
        check_at_most("num_hidden_layers", num_layers, MAX_LAYERS)?;
        let num_attention_heads = r.positive("num_attention_heads")?;
        let num_key_value_heads = match r.opt_usize("num_key_value_heads")? {
            Some(0) => {
                return Err(ConfigError::Zero {
                    key: "num_key_value_heads".into(),
                });
            }
            Some(n) => n,
            None => num_attention_heads,
        };
        let head_dim = match r.opt_usize("head_dim")? {
            Some(0) => {
                return Err(ConfigError::Zero {
                    key: "head_dim".into(),
                });
            }
            Some(d) => d,
            None => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(ConfigError::HeadDimUnderivable {
                        hidden_size,
                        q_heads: num_attention_heads,
                    });
                }
                hidden_size / num_attention_heads
            }
        };
        let vocab_size = r.positive("vocab_size")?;
        let max_position_embeddings = r.positive("max_position_embeddings")?;
        let rms_norm_eps = r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        let rope_theta = r.opt_f64("rope_theta")?.unwrap_or(10000.0);
        let tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(false);
        let bos_token_id = r.opt_token("bos_token_id")?;
        let eos_token_ids = r.token_list("eos_token_id")?;
        let kv_sharing = read_sharing(&r, num_layers)?;
        let config = ModelConfig {
            hidden_size,
            intermediate_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings,
            bos_token_id,
            eos_token_ids,
            kv_sharing,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants that parsing cannot express alone. Constructors call it; call
    /// it again after editing fields by hand.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers()),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::Zero { key: key.into() });
            }
        }
        let widths = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (key, v) in widths {
            check_at_most(key, v, MAX_WIDTH)?;
        }
        check_at_most("num_hidden_layers", self.num_layers(), MAX_LAYERS)?;
        check_at_most("vocab_size", self.vocab_size, MAX_VOCAB)?;
        // Both factors are at most MAX_WIDTH, so the product fits in u64.
        let q_width = self.num_attention_heads as u64 * self.head_dim as u64;
        if q_width > MAX_WIDTH as u64 {
            return Err(ConfigError::InvalidValue {
                key: "num_attention_heads".into(),
                expected: format!(
                    "num_attention_heads * head_dim at most {MAX_WIDTH} (head_dim is {})",
                    self.head_dim
                ),
                found: self.num_attention_heads.to_string(),
            });
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ConfigError::HeadsNotMultiple {
                q_heads: self.num_attention_heads,
                kv_heads: self.num_key_value_heads,
            });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::OddHeadDim {
                head_dim: self.head_dim,
            });
        }
        let finite_positive = [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ];
        for (key, v) in finite_positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::InvalidValue {
                    key: key.into(),
                    expected: "a finite number greater than 0".into(),
                    found: format!("{v}"),
                });
            }
        }
        for (key, id) in self
            .bos_token_id
            .iter()
            .map(|id| ("bos_token_id", *id))
            .chain(self.eos_token_ids.iter().map(|id| ("eos_token_id", *id)))
        {
            if id as usize >= self.vocab_size {
                return Err(ConfigError::InvalidValue {
                    key: key.into(),
                    expected: format!("a token id below vocab_size ({})", self.vocab_size),
                    found: id.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The config as a JSON object in the canonical form (`kv_source_layers`), with the
    /// Hugging Face Llama keys that other tools expect.
    pub fn to_json_value(&self) -> Value {
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers(),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "kv_source_layers": self.kv_sharing.sources(),
        });
        let obj = v.as_object_mut().expect("built as an object");
        if let Some(bos) = self.bos_token_id {
            obj.insert("bos_token_id".into(), json!(bos));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), json!(one));
            }
            many => {
                obj.insert("eos_token_id".into(), json!(many));
            }
        }
        v
    }

    /// The config as pretty-printed `config.json` text.
    pub fn to_json_string(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.to_json_value())
            .expect("a JSON value always serialises");
        s.push('\n');
        s
    }
}

/// Rejects `value > max` with an error naming `key`.
fn check_at_most(key: &str, value: usize, max: usize) -> Result<()> {
    if value > max {
        return Err(ConfigError::InvalidValue {
            key: key.into(),
            expected: format!("at most {max}"),
            found: value.to_string(),
        });
    }
    Ok(())
}

/// Reads the sharing map from whichever of the sharing keys are present.
fn read_sharing(r: &Reader<'_>, num_layers: usize) -> Result<KvSharing> {
    let explicit = match r.0.get("kv_source_layers") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut sources = Vec::with_capacity(items.len());
            for item in items {
                let s = item
                    .as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| ConfigError::InvalidValue {
                        key: "kv_source_layers".into(),
                        expected: "a list of layer indices (non-negative integers)".into(),
                        found: item.to_string(),
                    })?;
                sources.push(s);
            }
            if sources.len() != num_layers {
                return Err(ConfigError::MapLength {
                    key: "kv_source_layers".into(),
                    expected: num_layers,
                    found: sources.len(),
                });
            }
            Some(KvSharing::from_sources("kv_source_layers", sources)?)
        }
        Some(other) => {
            return Err(ConfigError::InvalidValue {
                key: "kv_source_layers".into(),
                expected: "a list of layer indices such as [0, 0, 2, 2]".into(),
                found: other.to_string(),
            });
        }
    };
    let use_cla = r.opt_bool("use_cla")?.unwrap_or(false);
    let hunyuan = if use_cla {
        let factor = match r.opt_usize("cla_share_factor")? {
            None => {
                return Err(ConfigError::Missing {
                    key: "cla_share_factor".into(),
                    hint: "use_cla is true, so cla_share_factor must say how many layers \
                           share one K/V"
                        .into(),
                });
            }
            Some(0) => {
                return Err(ConfigError::Zero {
                    key: "cla_share_factor".into(),
                });
            }
            Some(f) => f,
        };
        Some(
            SharingPattern::Hunyuan(factor)
                .build(num_layers)
                .map_err(|e| match e {
                    ConfigError::BadMap { reason, input, .. } => ConfigError::BadMap {
                        key: "cla_share_factor".into(),
                        input,
                        reason,
                    },
                    other => other,
                })?,
        )
    } else {
        None
    };
    match (explicit, hunyuan) {
        (Some(a), Some(b)) if a != b => Err(ConfigError::ConflictingSharing {
            detail: format!(
                "kv_source_layers is {} but use_cla/cla_share_factor give {}",
                a.to_lckv_string(),
                b.to_lckv_string()
            ),
        }),
        (Some(a), _) => Ok(a),
        (None, Some(b)) => Ok(b),
        (None, None) => Ok(KvSharing::all_producers(num_layers)),
    }
}

/// Typed access to config keys, producing errors that name the key.
struct Reader<'a>(&'a Map<String, Value>);

impl Reader<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn invalid(key: &str, expected: &str, found: &Value) -> ConfigError {
        ConfigError::InvalidValue {
            key: key.into(),
            expected: expected.into(),
            found: found.to_string(),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| Self::invalid(key, "a non-negative integer", v)),
        }
    }

    fn positive(&self, key: &str) -> Result<usize> {
        match self.opt_usize(key)? {
            None => Err(ConfigError::Missing {
                key: key.into(),
                hint: "add it to config.json".into(),
            }),
            Some(0) => Err(ConfigError::Zero { key: key.into() }),
            Some(n) => Ok(n),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::invalid(key, "a number", v)),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Self::invalid(key, "true or false", v)),
        }
    }

    fn token(key: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Self::invalid(key, "a token id (non-negative integer)", v))
    }

    fn opt_token(&self, key: &str) -> Result<Option<u32>> {
        self.present(key).map(|v| Self::token(key, v)).transpose()
    }

    fn token_list(&self, key: &str) -> Result<Vec<u32>> {
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| Self::token(key, v)).collect(),
            Some(v) => Ok(vec![Self::token(key, v)?]),
        }
    }
}

impl ModelConfig {
    /// Names of the keys that describe K/V sharing, for documentation and tools.
    pub fn sharing_keys() -> &'static [&'static str] {
        &SHARING_KEYS
    }
}
