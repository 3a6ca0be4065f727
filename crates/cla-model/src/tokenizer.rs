//! Text <-> token ids: a thin wrapper over Hugging Face `tokenizers` that applies the
//! model's BOS convention and decodes incrementally for streaming.
//!
//! BOS: [`Tokenizer::encode`] with `add_bos = true` runs the tokenizer's post-processor
//! (Llama tokenizers add `<s>` there) and prepends `bos_token_id` from `config.json` if the
//! post-processor did not. With `add_bos = false` no special token is added (perplexity
//! uses that, see [`crate::perplexity`](mod@crate::perplexity)).
//!
//! Streaming: SentencePiece-style vocabularies split multi-byte characters into byte pieces
//! (`<0xE2>`, ...) and strip the leading space of the first decoded piece, so decoding one
//! token at a time is wrong. [`TextStream`] decodes a short window of recent ids twice
//! (with and without the new ids) and emits the difference once it is complete UTF-8.

use crate::error::{ModelError, Result};
use crate::weights::TOKENIZER_FILE;
use cla_core::ModelConfig;
use std::path::Path;

/// A tokenizer bound to a model's vocabulary and special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .finish()
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` from a model directory.
    pub fn from_model_dir(dir: impl AsRef<Path>, config: &ModelConfig) -> Result<Self> {
        Self::from_file(dir.as_ref().join(TOKENIZER_FILE), config)
    }

    /// Reads a `tokenizer.json` and checks that every id it can produce has an embedding row
    /// in a model of `config`.
    pub fn from_file(path: impl AsRef<Path>, config: &ModelConfig) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "tokenizer".into(),
                hint: "copy the model's Hugging Face tokenizer.json into the model directory"
                    .into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            message: format!("{}: {e}", path.display()),
        })?;
        let tokenizer_vocab = inner.get_vocab_size(true);
        if tokenizer_vocab > config.vocab_size {
            return Err(ModelError::TokenizerVocabTooLarge {
                tokenizer_vocab,
                model_vocab: config.vocab_size,
            });
        }
        Ok(Self {
            inner,
            bos: config.bos_token_id,
        })
    }

    /// Number of tokens the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`. With `add_bos`, the sequence starts with the BOS token (added by
    /// the tokenizer's post-processor, or prepended from `config.json`'s `bos_token_id`);
    /// without, no special tokens are added.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_bos)
            .map_err(|e| ModelError::Tokenizer {
                message: format!("cannot encode the text: {e}"),
            })?;
        let mut ids = enc.get_ids().to_vec();
        if add_bos
            && let Some(bos) = self.bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// The text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer {
                message: format!("cannot decode ids: {e}"),
            })
    }

    /// The text of a single token as the vocabulary spells it (`▁Once`, `<0x0A>`).
    pub fn token_piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// A streaming decoder for text that follows `context` (e.g. the prompt): the pieces it
    /// emits concatenate to `decode(context + new)` minus `decode(context)`.
    pub fn stream(&self, context: &[u32]) -> TextStream {
        TextStream::new(context)
    }
}

/// Ids of context kept before the new ids so that leading spaces decode correctly.
const STREAM_CONTEXT: usize = 4;

/// Incremental detokenizer (see the module docs).
#[derive(Debug, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the window that is decoded.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
}

impl TextStream {
    /// A stream whose first emitted text continues `context`.
    pub fn new(context: &[u32]) -> Self {
        let keep = context.len().min(STREAM_CONTEXT);
        let ids = context[context.len() - keep..].to_vec();
        Self {
            prefix_offset: 0,
            read_offset: ids.len(),
            ids,
        }
    }

    /// Adds a token; returns the text that became complete (possibly empty, e.g. while a
    /// multi-byte character is still being spelt in byte pieces).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if text.len() > prefix.len()
            && !text.ends_with('\u{FFFD}')
            && text.is_char_boundary(prefix.len())
            && text.starts_with(&prefix)
        {
            let new = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.compact();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an incomplete character at the end), to emit when the
    /// sequence ends.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(match text.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            None => String::new(),
        })
    }

    /// Drops ids before the decode window so that memory stays bounded.
    fn compact(&mut self) {
        if self.prefix_offset > 64 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}
