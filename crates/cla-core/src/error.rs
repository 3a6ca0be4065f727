//! The one error type of `cla-core`: every way a configuration or a K/V sharing map can be
//! wrong, each naming the offending key and value so the message can be acted on.

use thiserror::Error;

/// Why a model configuration or a layer -> K/V-source map was rejected.
///
/// Every variant carries the name of the key (a `config.json` key such as
/// `"kv_source_layers"`, or a CLI flag such as `"--kv-map"`) so that the message points
/// the user at what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The text is not valid JSON, or its top level is not an object.
    #[error("{source_name}: not a valid JSON config: {message}")]
    Json {
        /// Where the text came from (a file name, or "config").
        source_name: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A required key is absent.
    #[error("{key}: missing; {hint}")]
    Missing {
        /// The key.
        key: String,
        /// What to add.
        hint: String,
    },
    /// A key has a value of the wrong JSON type or out of its domain.
    #[error("{key}: expected {expected}, found {found}")]
    InvalidValue {
        /// The key.
        key: String,
        /// What was expected, in words.
        expected: String,
        /// What was found, as JSON text.
        found: String,
    },
    /// A size that must be positive is zero.
    #[error("{key}: must be greater than 0, found 0")]
    Zero {
        /// The key.
        key: String,
    },
    /// `num_attention_heads` is not a multiple of `num_key_value_heads`.
    #[error(
        "num_attention_heads ({q_heads}) is not a multiple of num_key_value_heads ({kv_heads}); \
         every key/value head must serve the same number of query heads"
    )]
    HeadsNotMultiple {
        /// Query heads.
        q_heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },
    /// RoPE rotates pairs of dimensions, so the head dimension must be even.
    #[error("head_dim ({head_dim}) is odd; rotary embeddings rotate pairs of dimensions")]
    OddHeadDim {
        /// The head dimension.
        head_dim: usize,
    },
    /// `head_dim` was not given and `hidden_size` is not divisible by the head count.
    #[error(
        "head_dim is absent and hidden_size ({hidden_size}) is not divisible by \
         num_attention_heads ({q_heads}); set head_dim explicitly"
    )]
    HeadDimUnderivable {
        /// Model width.
        hidden_size: usize,
        /// Query heads.
        q_heads: usize,
    },
    /// The map has a different number of entries than the model has layers.
    #[error("{key}: has {found} entries but the model has {expected} layers (num_hidden_layers)")]
    MapLength {
        /// The key.
        key: String,
        /// `num_hidden_layers`.
        expected: usize,
        /// Entries in the map.
        found: usize,
    },
    /// Layer 0 must compute its own keys and values: there is no earlier layer.
    #[error("{key}: layer 0 must be a producer (its entry must be 0), found {source_layer}")]
    FirstLayerNotProducer {
        /// The key.
        key: String,
        /// The entry found for layer 0.
        source_layer: usize,
    },
    /// A layer reads the K/V of a layer that comes after it.
    #[error(
        "{key}: layer {layer} reads the keys/values of layer {source_layer}, which comes later; \
         a layer may only reuse an earlier layer's K/V"
    )]
    SourceLater {
        /// The key.
        key: String,
        /// The consuming layer.
        layer: usize,
        /// Its (invalid) source.
        source_layer: usize,
    },
    /// A layer reads the K/V of a layer that does not produce K/V itself.
    #[error(
        "{key}: layer {layer} reads the keys/values of layer {source_layer}, but layer \
         {source_layer} is itself a consumer (of layer {source_of_source}); point layer {layer} \
         at {source_of_source} instead"
    )]
    SourceIsConsumer {
        /// The key.
        key: String,
        /// The consuming layer.
        layer: usize,
        /// Its (invalid) source.
        source_layer: usize,
        /// Where that source reads from.
        source_of_source: usize,
    },
    /// Two keys both describe K/V sharing and disagree.
    #[error("conflicting K/V sharing keys: {detail}; keep only one of them")]
    ConflictingSharing {
        /// What conflicts.
        detail: String,
    },
    /// A typed map or pattern name could not be understood.
    #[error("{key}: cannot read `{input}` as a K/V sharing map: {reason}")]
    BadMap {
        /// The key or flag.
        key: String,
        /// The text given.
        input: String,
        /// What is wrong, and the accepted forms.
        reason: String,
    },
    /// A named preset does not exist.
    #[error("unknown preset `{name}`; known presets: {known}")]
    UnknownPreset {
        /// The name given.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
    /// A byte size or dtype given as text could not be read.
    #[error("{key}: cannot read `{input}`: {reason}")]
    BadQuantity {
        /// The key or flag.
        key: String,
        /// The text given.
        input: String,
        /// What is accepted.
        reason: String,
    },
}

/// `Result` with [`ConfigError`].
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;
