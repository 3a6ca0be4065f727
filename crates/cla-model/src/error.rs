//! The one error type of `cla-model`: every way loading a model, tokenising or running it
//! can fail, each variant saying what was wrong and, where it helps, what to do.

use cla_kv::SequenceId;
use std::path::PathBuf;
use thiserror::Error;

/// Why a model could not be loaded, saved or run.
#[derive(Debug, Error)]
pub enum ModelError {
    /// `config.json` is missing a key or breaks an invariant.
    #[error("config.json: {0}")]
    Config(#[from] cla_core::ConfigError),

    /// The GPU backend failed: no usable adapter, a feature the adapter lacks, or a
    /// device error while running.
    #[error("GPU: {0}")]
    Gpu(#[from] cla_kernels_wgpu::GpuError),

    /// A file the model directory needs does not exist.
    #[error("{}: {what} not found; {hint}", path.display())]
    MissingFile {
        /// The file (or directory) that was looked for.
        path: PathBuf,
        /// What the file is, in words (`"model weights"`).
        what: String,
        /// What to do about it.
        hint: String,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file (or its index) is truncated, corrupted or otherwise unreadable.
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },

    /// A tensor the model needs is absent.
    #[error("{}: tensor `{name}` is missing{}", location(*layer), hint_for_missing(name))]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The layer it belongs to (`None` for embedding, final norm and LM head).
        layer: Option<usize>,
    },

    /// A tensor is present that this model does not have (e.g. `k_proj` in a consumer
    /// layer, a bias, or a misspelt name).
    #[error("{}: unexpected tensor `{name}`: {reason}", location(*layer))]
    UnexpectedTensor {
        /// The tensor name.
        name: String,
        /// The layer it names, if any.
        layer: Option<usize>,
        /// Why it is not expected, and what to do.
        reason: String,
    },

    /// A tensor's shape differs from what the config implies.
    #[error(
        "{}: tensor `{name}` has shape {found:?}, expected {expected:?} (from config.json)",
        location(*layer)
    )]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The layer it belongs to, if any.
        layer: Option<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },

    /// A tensor is stored in an element type this crate cannot read.
    #[error(
        "tensor `{name}` has dtype {dtype}; supported weight types are F32, F16 and BF16 \
         (convert the checkpoint first)"
    )]
    UnsupportedDType {
        /// The tensor name.
        name: String,
        /// The dtype found, as safetensors names it.
        dtype: String,
    },

    /// `tokenizer.json` could not be read, or tokenising / detokenising failed.
    #[error("tokenizer: {message}")]
    Tokenizer {
        /// What went wrong.
        message: String,
    },

    /// The tokenizer can produce ids the embedding has no row for.
    #[error(
        "tokenizer.json has {tokenizer_vocab} tokens but the model's embedding has only \
         {model_vocab} rows (vocab_size); use the tokenizer the model was trained with"
    )]
    TokenizerVocabTooLarge {
        /// Tokens the tokenizer knows (added tokens included).
        tokenizer_vocab: usize,
        /// `vocab_size` of the model.
        model_vocab: usize,
    },

    /// A prompt (or an evaluation window) does not fit the model's context.
    #[error(
        "the prompt has {len} tokens but the context holds {context}{}; shorten it, or \
         allow truncation (keeps the last tokens)",
        if *reserved > 0 { format!(" and {reserved} are reserved for new tokens") } else { String::new() }
    )]
    PromptTooLong {
        /// Tokens in the prompt.
        len: usize,
        /// Positions the model supports.
        context: usize,
        /// Positions reserved for generation.
        reserved: usize,
    },

    /// A prompt with no tokens (and no BOS token to start from).
    #[error("the prompt is empty: there is no token to condition on (the model has no BOS token)")]
    EmptyPrompt,

    /// A token id has no embedding row.
    #[error("token id {token} is out of range: the vocabulary has {vocab} tokens (0..{vocab})")]
    TokenOutOfRange {
        /// The id.
        token: u32,
        /// `vocab_size`.
        vocab: usize,
    },

    /// A sequence would grow past the positions the model supports.
    #[error(
        "sequence {seq} would hold {needed} positions but the model supports \
         {context} (max_position_embeddings)"
    )]
    ContextExceeded {
        /// The sequence.
        seq: SequenceId,
        /// Positions it would hold after the step.
        needed: usize,
        /// `max_position_embeddings`.
        context: usize,
    },

    /// A sequence id that this decoder does not hold (never created, or already removed).
    #[error("unknown sequence {0}: it was never created or has been freed")]
    UnknownSequence(SequenceId),

    /// The same sequence appears twice in one batched step.
    #[error("sequence {0} appears more than once in one forward batch")]
    DuplicateSequence(SequenceId),

    /// The KV cache rejected an operation (out of blocks, ...).
    #[error("KV cache: {0}")]
    Cache(#[from] cla_kv::KvError),

    /// An argument (generation or evaluation setting) is out of its domain.
    #[error("{name}: {message}")]
    InvalidArgument {
        /// The setting.
        name: String,
        /// What is wrong and what is accepted.
        message: String,
    },
}

/// `Result` with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

fn location(layer: Option<usize>) -> String {
    match layer {
        Some(l) => format!("layer {l}"),
        None => "model".to_string(),
    }
}

fn hint_for_missing(name: &str) -> &'static str {
    if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
        "; config.json marks this layer as a K/V producer (kv_source_layers), so it needs \
         its own k_proj and v_proj"
    } else if name == "lm_head.weight" {
        "; set tie_word_embeddings to true if the LM head shares the embedding"
    } else {
        ""
    }
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(name: &str, message: impl Into<String>) -> Self {
        ModelError::InvalidArgument {
            name: name.into(),
            message: message.into(),
        }
    }
}
