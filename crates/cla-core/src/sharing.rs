//! The layer -> K/V-source map of Cross-Layer Attention (paper section 2).
//!
//! Every decoder layer has its own queries. A *producer* layer also computes keys and
//! values (it owns K and V projections and a cache slot); a *consumer* layer attends over
//! the keys and values of an earlier producer and owns neither. [`KvSharing`] is the one
//! place in the project that knows which layer reads which layer's K/V; the cache, the
//! kernels' callers and the memory arithmetic all ask it.
//!
//! The canonical form is a list `sources` with `sources[i]` = the layer whose keys and
//! values layer `i` attends to (`sources[i] == i` for a producer), as written in
//! `config.json` under `kv_source_layers`. A valid map has `sources[0] == 0`, every entry
//! `sources[i] <= i`, and every source a producer (no chains).

use crate::error::{ConfigError, Result};
use std::fmt;
use std::str::FromStr;

/// A named way to build a sharing map for any number of layers.
///
/// The non-uniform patterns are the paper's 20-layer designs, generalised to `L` layers as
/// documented on each variant; on 20 layers each gives exactly the paper's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SharingPattern {
    /// Every layer produces its own K/V (a plain transformer).
    None,
    /// The paper's `CLA<N>`: consecutive groups of `N` layers share the K/V of the group's
    /// first layer; when `N` does not divide `L`, the SHORT group comes FIRST
    /// (10 layers, CLA3: {0}, {1,2,3}, {4,5,6}, {7,8,9}).
    Cla(usize),
    /// Hunyuan-Large's rule: layer `i` produces iff `i % N == 0`, so the short group comes
    /// LAST (10 layers, factor 3: {0,1,2}, {3,4,5}, {6,7,8}, {9}).
    Hunyuan(usize),
    /// The paper's CLA2-KeepEnds: layer 0 and layer `L-1` own their K/V; the layers between
    /// them use CLA2 (short group first). On 20 layers: 0, (1,2), ..., (17,18), 19.
    Cla2KeepEnds,
    /// The paper's CLA2-DenseFront: the first `L/2` layers own their K/V, the following
    /// layers up to `L-2` all use layer `L/2 - 1`'s K/V, and layer `L-1` owns its own.
    /// On 20 layers: 0..9 own, 10..18 use 9, 19 owns. Needs at least 3 layers.
    Cla2DenseFront,
    /// The paper's CLA2-DenseBack: layers 0 and 1 own their K/V, the next `L - L/2 - 1`
    /// layers use layer 1's K/V, the rest own theirs. On 20 layers: 0, 1 own, 2..10 use 1,
    /// 11..19 own. Needs at least 3 layers.
    Cla2DenseBack,
}

impl SharingPattern {
    /// The names accepted by [`FromStr`], for help texts and error messages.
    pub const NAMES: &'static str =
        "none, cla<N> (e.g. cla2), hunyuan<N>, cla2-keep-ends, cla2-dense-front, cla2-dense-back";

    /// Builds the map of this pattern for `num_layers` layers.
    pub fn build(self, num_layers: usize) -> Result<KvSharing> {
        let bad = |reason: String| ConfigError::BadMap {
            key: "pattern".into(),
            input: self.to_string(),
            reason,
        };
        if num_layers == 0 {
            return Err(bad("the model has no layers".into()));
        }
        let l = num_layers;
        let sources: Vec<usize> = match self {
            SharingPattern::None => (0..l).collect(),
            SharingPattern::Cla(n) | SharingPattern::Hunyuan(n) if n == 0 => {
                return Err(bad("the sharing factor must be at least 1".into()));
            }
            SharingPattern::Cla(n) => paper_groups(0, l, n),
            SharingPattern::Hunyuan(n) => (0..l).map(|i| i - i % n).collect(),
            SharingPattern::Cla2KeepEnds => {
                let mut s = vec![0];
                if l >= 2 {
                    s.extend(paper_groups(1, l - 2, 2));
                    s.push(l - 1);
                }
                s
            }
            SharingPattern::Cla2DenseFront | SharingPattern::Cla2DenseBack if l < 3 => {
                return Err(bad(format!(
                    "needs at least 3 layers, the model has {num_layers}"
                )));
            }
            SharingPattern::Cla2DenseFront => {
                let front = l / 2;
                (0..l)
                    .map(|i| {
                        if i < front || i == l - 1 {
                            i
                        } else {
                            front - 1
                        }
                    })
                    .collect()
            }
            SharingPattern::Cla2DenseBack => {
                let consumers = l - l / 2 - 1;
                (0..l)
                    .map(|i| {
                        if (2..2 + consumers).contains(&i) {
                            1
                        } else {
                            i
                        }
                    })
                    .collect()
            }
        };
        KvSharing::from_sources("pattern", sources)
    }
}

/// `len` layers starting at `start`, grouped by `n` with the short group first; each
/// entry is the first layer of its group.
fn paper_groups(start: usize, len: usize, n: usize) -> Vec<usize> {
    let short = len % n;
    (0..len)
        .map(|j| {
            let first = if j < short {
                0
            } else {
                short + (j - short) / n * n
            };
            start + first
        })
        .collect()
}

impl fmt::Display for SharingPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SharingPattern::None => write!(f, "none"),
            SharingPattern::Cla(n) => write!(f, "cla{n}"),
            SharingPattern::Hunyuan(n) => write!(f, "hunyuan{n}"),
            SharingPattern::Cla2KeepEnds => write!(f, "cla2-keep-ends"),
            SharingPattern::Cla2DenseFront => write!(f, "cla2-dense-front"),
            SharingPattern::Cla2DenseBack => write!(f, "cla2-dense-back"),
        }
    }
}

impl FromStr for SharingPattern {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase().replace('_', "-");
        let bad = |reason: String| ConfigError::BadMap {
            key: "pattern".into(),
            input: s.to_string(),
            reason,
        };
        let factor = |digits: &str| -> Result<usize> {
            match digits.parse::<usize>() {
                Ok(0) => Err(bad("the sharing factor must be at least 1".into())),
                Ok(n) => Ok(n),
                Err(_) => Err(bad(format!(
                    "`{digits}` is not a sharing factor; known patterns: {}",
                    Self::NAMES
                ))),
            }
        };
        Ok(match t.as_str() {
            "none" | "mha" | "no-sharing" | "cla1" => SharingPattern::None,
            "cla2-keep-ends" | "cla2-keepends" => SharingPattern::Cla2KeepEnds,
            "cla2-dense-front" | "cla2-densefront" => SharingPattern::Cla2DenseFront,
            "cla2-dense-back" | "cla2-denseback" => SharingPattern::Cla2DenseBack,
            _ => {
                if let Some(d) = t.strip_prefix("hunyuan") {
                    SharingPattern::Hunyuan(factor(d)?)
                } else if let Some(d) = t.strip_prefix("cla") {
                    match factor(d)? {
                        1 => SharingPattern::None,
                        n => SharingPattern::Cla(n),
                    }
                } else {
                    return Err(bad(format!("known patterns: {}", Self::NAMES)));
                }
            }
        })
    }
}

/// A validated layer -> K/V-source map.
///
/// Invariants (checked on construction, relied on everywhere): `sources[0] == 0`,
/// `sources[i] <= i`, and `sources[sources[i]] == sources[i]` (every source is a producer).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvSharing {
    sources: Vec<usize>,
    /// Producer layers in increasing order; position = dense cache slot.
    producers: Vec<usize>,
    /// For each layer, the cache slot of its producer.
    slot_of_layer: Vec<usize>,
}

impl KvSharing {
    /// Every one of `num_layers` layers produces its own K/V.
    ///
    /// # Panics
    ///
    /// If `num_layers` is 0: a map describes at least one layer.
    pub fn all_producers(num_layers: usize) -> Self {
        Self::from_sources("kv_source_layers", (0..num_layers).collect())
            .expect("the identity map is always valid")
    }

    /// Validates `sources` (entry `i` = the layer whose K/V layer `i` reads). `key` names
    /// where the map came from, for the error message.
    ///
    /// The checks run in a fixed order and the first failure is returned: an empty map,
    /// then layer 0 ([`ConfigError::FirstLayerNotProducer`]), then every entry pointing
    /// at an earlier layer ([`ConfigError::SourceLater`]), then every source being a
    /// producer ([`ConfigError::SourceIsConsumer`]).
    pub fn from_sources(key: &str, sources: Vec<usize>) -> Result<Self> {
        if sources.is_empty() {
            return Err(ConfigError::BadMap {
                key: key.into(),
                input: String::new(),
                reason: "the map is empty; a model has at least one layer".into(),
            });
        }
        if let Some(&first) = sources.first()
            && first != 0
        {
            return Err(ConfigError::FirstLayerNotProducer {
                key: key.into(),
                source_layer: first,
            });
        }
        for (layer, &source) in sources.iter().enumerate() {
            if source > layer {
                return Err(ConfigError::SourceLater {
                    key: key.into(),
                    layer,
                    source_layer: source,
                });
            }
        }
        for (layer, &source) in sources.iter().enumerate() {
            if sources[source] != source {
                return Err(ConfigError::SourceIsConsumer {
                    key: key.into(),
                    layer,
                    source_layer: source,
                    source_of_source: sources[source],
                });
            }
        }
        let producers: Vec<usize> = (0..sources.len()).filter(|&i| sources[i] == i).collect();
        let slot_of_layer = sources
            .iter()
            .map(|s| {
                producers
                    .binary_search(s)
                    .expect("every source is a producer")
            })
            .collect();
        Ok(Self {
            sources,
            producers,
            slot_of_layer,
        })
    }

    /// Reads a map typed by a user: a pattern name (see [`SharingPattern::NAMES`]), an
    /// LCKV-style string (`0_0_2_2_4_4`), a comma list (`0,0,2,2`), a JSON list
    /// (`[0,0,2,2]`) or a space-separated list (`0 0 2 2`, as `cla kv` prints it). A list
    /// must have `num_layers` entries. `key` names the flag.
    pub fn parse(key: &str, input: &str, num_layers: usize) -> Result<Self> {
        let t = input.trim();
        let looks_numeric = t.chars().all(|c| {
            c.is_ascii_digit() || c.is_ascii_whitespace() || matches!(c, '_' | ',' | '[' | ']')
        });
        if !looks_numeric {
            let pattern: SharingPattern = t.parse().map_err(|e| match e {
                ConfigError::BadMap { reason, .. } => ConfigError::BadMap {
                    key: key.into(),
                    input: input.into(),
                    reason: format!(
                        "{reason}; a list of source layers such as 0_0_2_2 is accepted too"
                    ),
                },
                other => other,
            })?;
            return pattern.build(num_layers).map_err(|e| match e {
                ConfigError::BadMap { reason, .. } => ConfigError::BadMap {
                    key: key.into(),
                    input: input.into(),
                    reason,
                },
                other => other,
            });
        }
        let inner = match (t.strip_prefix('['), t.ends_with(']')) {
            (Some(rest), true) => &rest[..rest.len() - 1],
            (None, false) => t,
            _ => {
                return Err(ConfigError::BadMap {
                    key: key.into(),
                    input: input.into(),
                    reason: "unbalanced brackets; write a list as [0,0,2,2] or 0_0_2_2".into(),
                });
            }
        };
        if inner.contains(['[', ']']) {
            return Err(ConfigError::BadMap {
                key: key.into(),
                input: input.into(),
                reason: "nested brackets; write a list as [0,0,2,2] or 0_0_2_2".into(),
            });
        }
        // `0_0_2_2` and `0,0,2,2` split on their separator (an empty entry is an error);
        // `0 0 2 2` splits on runs of spaces.
        let parts: Vec<&str> = if inner.contains(['_', ',']) {
            inner.split(['_', ',']).collect()
        } else {
            inner.split_whitespace().collect()
        };
        if parts.is_empty() {
            return Err(ConfigError::BadMap {
                key: key.into(),
                input: input.into(),
                reason: "the list is empty; give one source layer per layer".into(),
            });
        }
        let mut sources = Vec::with_capacity(parts.len());
        for part in parts {
            let part = part.trim();
            let v = part.parse::<usize>().map_err(|_| ConfigError::BadMap {
                key: key.into(),
                input: input.into(),
                reason: if part.is_empty() {
                    "an entry is empty".into()
                } else {
                    format!("`{part}` is not a layer index")
                },
            })?;
            sources.push(v);
        }
        if sources.len() != num_layers {
            return Err(ConfigError::MapLength {
                key: key.into(),
                expected: num_layers,
                found: sources.len(),
            });
        }
        Self::from_sources(key, sources)
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.sources.len()
    }

    /// The canonical list: entry `i` is the layer whose K/V layer `i` reads.
    pub fn sources(&self) -> &[usize] {
        &self.sources
    }

    /// Whether `layer` computes (and caches) its own keys and values.
    pub fn is_producer(&self, layer: usize) -> bool {
        self.sources[layer] == layer
    }

    /// The layer whose K/V `layer` attends to (itself for a producer).
    pub fn producer_of(&self, layer: usize) -> usize {
        self.sources[layer]
    }

    /// Producer layers in increasing order.
    pub fn producers(&self) -> &[usize] {
        &self.producers
    }

    /// Number of producer layers: the "KV layers" of the paper's tables.
    pub fn num_producers(&self) -> usize {
        self.producers.len()
    }

    /// The dense cache slot that `layer` reads: its producer's position among producers.
    pub fn slot_of(&self, layer: usize) -> usize {
        self.slot_of_layer[layer]
    }

    /// The cache slot owned by `layer`, or `None` if it is a consumer.
    pub fn slot_of_producer(&self, layer: usize) -> Option<usize> {
        self.is_producer(layer).then(|| self.slot_of_layer[layer])
    }

    /// The layers (other than `producer` itself) that read `producer`'s K/V, in order.
    pub fn consumers_of(&self, producer: usize) -> impl Iterator<Item = usize> + '_ {
        self.sources
            .iter()
            .enumerate()
            .filter(move |&(i, &s)| s == producer && i != producer)
            .map(|(i, _)| i)
    }

    /// The last producer layer. Every layer after it only consumes (YOCO-like tail): a
    /// prompt's prefill needs those layers for its last position only.
    pub fn last_producer(&self) -> usize {
        *self.producers.last().expect("a map has at least one layer")
    }

    /// The LCKV-style string `0_0_2_2`.
    pub fn to_lckv_string(&self) -> String {
        let parts: Vec<String> = self.sources.iter().map(|s| s.to_string()).collect();
        parts.join("_")
    }

    /// Names the pattern this map equals, if any, trying the paper's patterns first.
    pub fn pattern_name(&self) -> Option<SharingPattern> {
        let l = self.num_layers();
        let mut candidates = vec![
            SharingPattern::None,
            SharingPattern::Cla2KeepEnds,
            SharingPattern::Cla2DenseFront,
            SharingPattern::Cla2DenseBack,
        ];
        candidates.extend((2..=l.max(2)).map(SharingPattern::Cla));
        candidates.extend((2..=l.max(2)).map(SharingPattern::Hunyuan));
        candidates
            .into_iter()
            .find(|p| p.build(l).is_ok_and(|m| &m == self))
    }
}

impl fmt::Display for KvSharing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_lckv_string())
    }
}
