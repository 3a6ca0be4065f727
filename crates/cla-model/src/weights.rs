//! Model weights: reading and writing the tensors of a model directory (safetensors, single
//! file or sharded), checking them against `config.json`, and seeded random weights.
//!
//! The tensor layout is Hugging Face Llama's. What CLA changes (paper section 2) is which
//! layers carry K/V projections: a *producer* layer has `k_proj` and `v_proj` (and may
//! carry `kv_input_layernorm`, the separate norm scale of the K/V input that the paper's
//! CLA models use); a *consumer* layer has only `q_proj` and `o_proj`. The file format is
//! documented in `docs/model-format.md`.
//!
//! Weights are stored on disk as f32, f16 or bf16 and held in memory as f32 for the CPU
//! reference path. Every matrix keeps the PyTorch `nn.Linear` layout `[out, in]`.

use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;
use cla_core::{DType, ModelConfig};
use ndarray::{Array1, Array2};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// File name of the configuration inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of single-file weights inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the index of sharded weights.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of the tokenizer inside a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The key and value projections of a producer layer.
#[derive(Debug, Clone, PartialEq)]
pub struct KvProjection {
    /// `kv_input_layernorm.weight`: the RMSNorm scale of the K/V input, `[hidden]`. When
    /// absent, K and V are projected from the same normalised input as Q.
    pub kv_norm: Option<Array1<f32>>,
    /// `k_proj.weight`, `[kv_heads * head_dim, hidden]`.
    pub k_proj: Array2<f32>,
    /// `v_proj.weight`, `[kv_heads * head_dim, hidden]`.
    pub v_proj: Array2<f32>,
}

/// The weights of one decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// `input_layernorm.weight`, `[hidden]`.
    pub input_norm: Array1<f32>,
    /// `self_attn.q_proj.weight`, `[q_heads * head_dim, hidden]`.
    pub q_proj: Array2<f32>,
    /// K/V projections: `Some` exactly for producer layers.
    pub kv: Option<KvProjection>,
    /// `self_attn.o_proj.weight`, `[hidden, q_heads * head_dim]`.
    pub o_proj: Array2<f32>,
    /// `post_attention_layernorm.weight`, `[hidden]`.
    pub post_attention_norm: Array1<f32>,
    /// `mlp.gate_proj.weight`, `[intermediate, hidden]`.
    pub gate_proj: Array2<f32>,
    /// `mlp.up_proj.weight`, `[intermediate, hidden]`.
    pub up_proj: Array2<f32>,
    /// `mlp.down_proj.weight`, `[hidden, intermediate]`.
    pub down_proj: Array2<f32>,
}

/// All weights of a model, in f32, with the config they were checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelWeights {
    /// The configuration (shapes and the K/V sharing map).
    pub config: ModelConfig,
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    pub embed_tokens: Array2<f32>,
    /// One entry per decoder layer.
    pub layers: Vec<LayerWeights>,
    /// `model.norm.weight`, `[hidden]`.
    pub final_norm: Array1<f32>,
    /// `lm_head.weight`, `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Array2<f32>>,
}

/// Options of [`ModelWeights::random_with`]; the default is seed 0 without K/V norms.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RandomWeightsOptions {
    /// Seed of the generator: the same seed and config give the same weights.
    pub seed: u64,
    /// Give each producer layer a separate `kv_input_layernorm` scale.
    pub kv_input_norm: bool,
}

/// Name of a per-layer tensor, e.g. `layer_tensor(3, "self_attn.q_proj.weight")`.
pub fn layer_tensor(layer: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{suffix}")
}

/// Per-layer tensor names (suffixes after `model.layers.N.`) and what they are.
const Q_PROJ: &str = "self_attn.q_proj.weight";
const K_PROJ: &str = "self_attn.k_proj.weight";
const V_PROJ: &str = "self_attn.v_proj.weight";
const O_PROJ: &str = "self_attn.o_proj.weight";
const INPUT_NORM: &str = "input_layernorm.weight";
const KV_NORM: &str = "kv_input_layernorm.weight";
const POST_NORM: &str = "post_attention_layernorm.weight";
const GATE_PROJ: &str = "mlp.gate_proj.weight";
const UP_PROJ: &str = "mlp.up_proj.weight";
const DOWN_PROJ: &str = "mlp.down_proj.weight";
const EMBED: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";
/// A derived buffer some older checkpoints store; recomputed from `rope_theta`, so ignored.
const ROTARY_INV_FREQ: &str = "self_attn.rotary_emb.inv_freq";

impl ModelWeights {
    /// Reads the config and weights of a model directory (see `docs/model-format.md`).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = load_config(dir)?;
        Self::load_with_config(dir, config)
    }

    /// Reads the weights of a model directory, checking them against `config`.
    pub fn load_with_config(dir: impl AsRef<Path>, config: ModelConfig) -> Result<Self> {
        let dir = dir.as_ref();
        let files = weight_files(dir)?;
        let mut buffers = Vec::with_capacity(files.len());
        for path in &files {
            let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
            buffers.push(bytes);
        }
        let mut parsed = Vec::with_capacity(files.len());
        for (path, bytes) in files.iter().zip(&buffers) {
            let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            parsed.push(st);
        }
        let mut store = TensorStore {
            tensors: HashMap::new(),
        };
        for (file, st) in parsed.iter().enumerate() {
            for (name, view) in st.iter() {
                if store.tensors.insert(name.to_string(), view).is_some() {
                    return Err(ModelError::Safetensors {
                        path: files[file].clone(),
                        message: format!("tensor `{name}` appears in more than one shard"),
                    });
                }
            }
        }
        store.check_names(&config)?;
        build_weights(config, &store)
    }

    /// Seeded random weights for `config` (no `kv_input_layernorm`).
    pub fn random(config: &ModelConfig, seed: u64) -> Self {
        Self::random_with(
            config,
            &RandomWeightsOptions {
                seed,
                ..Default::default()
            },
        )
    }

    /// Seeded random weights for `config`. Matrices are uniform with a `1/sqrt(fan_in)`
    /// scale (activations stay O(1) through the layers), embeddings uniform in [-1, 1),
    /// norm scales uniform in [0.8, 1.2) so that a wrong scale shows up in tests.
    pub fn random_with(config: &ModelConfig, options: &RandomWeightsOptions) -> Self {
        let mut rng = SplitMix64::new(options.seed);
        let h = config.hidden_size;
        let mut matrix = |rows: usize, cols: usize, scale: f32| {
            Array2::from_shape_simple_fn((rows, cols), || rng.next_symmetric_f32() * scale)
        };
        let fan = |n: usize| (3.0 / n as f32).sqrt();
        let embed_tokens = matrix(config.vocab_size, h, 1.0);
        let mut layers = Vec::with_capacity(config.num_layers());
        let mut norms = SplitMix64::new(options.seed ^ 0x6E6F_726D);
        let mut norm =
            |n: usize| Array1::from_shape_fn(n, |_| 1.0 + 0.2 * norms.next_symmetric_f32());
        for layer in 0..config.num_layers() {
            let q_proj = matrix(config.q_width(), h, fan(h));
            let kv = config.kv_sharing.is_producer(layer).then(|| KvProjection {
                kv_norm: None,
                k_proj: matrix(config.kv_width(), h, fan(h)),
                v_proj: matrix(config.kv_width(), h, fan(h)),
            });
            let o_proj = matrix(h, config.q_width(), fan(config.q_width()));
            let gate_proj = matrix(config.intermediate_size, h, fan(h));
            let up_proj = matrix(config.intermediate_size, h, fan(h));
            let down_proj = matrix(h, config.intermediate_size, fan(config.intermediate_size));
            layers.push(LayerWeights {
                input_norm: norm(h),
                q_proj,
                kv,
                o_proj,
                post_attention_norm: norm(h),
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        if options.kv_input_norm {
            for layer in &mut layers {
                if let Some(kv) = &mut layer.kv {
                    kv.kv_norm = Some(norm(h));
                }
            }
        }
        let final_norm = norm(h);
        let lm_head = (!config.tie_word_embeddings).then(|| matrix(config.vocab_size, h, fan(h)));
        Self {
            config: config.clone(),
            embed_tokens,
            layers,
            final_norm,
            lm_head,
        }
    }

    /// The LM head matrix `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> &Array2<f32> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Number of parameters (a tied LM head counted once).
    pub fn num_parameters(&self) -> usize {
        self.named_tensors().map(|(_, t)| t.len()).sum()
    }

    /// Every tensor with its file name, in a stable order.
    pub fn named_tensors(&self) -> impl Iterator<Item = (String, TensorRef<'_>)> {
        let mut out: Vec<(String, TensorRef<'_>)> = vec![
            (EMBED.into(), TensorRef::Matrix(&self.embed_tokens)),
            (FINAL_NORM.into(), TensorRef::Vector(&self.final_norm)),
        ];
        if let Some(head) = &self.lm_head {
            out.push((LM_HEAD.into(), TensorRef::Matrix(head)));
        }
        for (i, l) in self.layers.iter().enumerate() {
            out.push((
                layer_tensor(i, INPUT_NORM),
                TensorRef::Vector(&l.input_norm),
            ));
            out.push((layer_tensor(i, Q_PROJ), TensorRef::Matrix(&l.q_proj)));
            if let Some(kv) = &l.kv {
                if let Some(n) = &kv.kv_norm {
                    out.push((layer_tensor(i, KV_NORM), TensorRef::Vector(n)));
                }
                out.push((layer_tensor(i, K_PROJ), TensorRef::Matrix(&kv.k_proj)));
                out.push((layer_tensor(i, V_PROJ), TensorRef::Matrix(&kv.v_proj)));
            }
            out.push((layer_tensor(i, O_PROJ), TensorRef::Matrix(&l.o_proj)));
            out.push((
                layer_tensor(i, POST_NORM),
                TensorRef::Vector(&l.post_attention_norm),
            ));
            out.push((layer_tensor(i, GATE_PROJ), TensorRef::Matrix(&l.gate_proj)));
            out.push((layer_tensor(i, UP_PROJ), TensorRef::Matrix(&l.up_proj)));
            out.push((layer_tensor(i, DOWN_PROJ), TensorRef::Matrix(&l.down_proj)));
        }
        out.into_iter()
    }

    /// Writes a model directory: `config.json`, `model.safetensors` (as `dtype`: F32, F16
    /// or BF16) and, when given, a copy of `tokenizer`. Each file is written to a temporary
    /// name and renamed into place, so a reader never sees half a file.
    pub fn save(
        &self,
        dir: impl AsRef<Path>,
        dtype: DType,
        tokenizer: Option<&Path>,
    ) -> Result<()> {
        let dir = dir.as_ref();
        let st_dtype = match dtype {
            DType::F32 => StDtype::F32,
            DType::F16 => StDtype::F16,
            DType::BF16 => StDtype::BF16,
            DType::Int8 => {
                return Err(ModelError::invalid(
                    "dtype",
                    "weights can be saved as f32, f16 or bf16, not int8",
                ));
            }
        };
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .named_tensors()
            .map(|(name, t)| (name, t.shape(), encode(t.values(), dtype)))
            .collect();
        let mut views = Vec::with_capacity(tensors.len());
        for (name, shape, bytes) in &tensors {
            let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .map_err(|e| ModelError::invalid("weights", e.to_string()))?;
            views.push((name.as_str(), view));
        }
        let mut metadata = HashMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        let bytes =
            safetensors::serialize(views, Some(metadata)).map_err(|e| ModelError::Safetensors {
                path: dir.join(WEIGHTS_FILE),
                message: e.to_string(),
            })?;
        write_atomically(
            &dir.join(CONFIG_FILE),
            self.config.to_json_string().as_bytes(),
        )?;
        write_atomically(&dir.join(WEIGHTS_FILE), &bytes)?;
        if let Some(src) = tokenizer {
            let text = std::fs::read(src).map_err(|e| ModelError::io(src, e))?;
            write_atomically(&dir.join(TOKENIZER_FILE), &text)?;
        }
        Ok(())
    }
}

/// A borrowed weight tensor: a norm vector or a projection matrix.
#[derive(Debug, Clone, Copy)]
pub enum TensorRef<'a> {
    /// A 1-D tensor (norm scales).
    Vector(&'a Array1<f32>),
    /// A 2-D tensor (`[out, in]` projections, embeddings).
    Matrix(&'a Array2<f32>),
}

impl TensorRef<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorRef::Vector(v) => v.len(),
            TensorRef::Matrix(m) => m.len(),
        }
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape, as stored in the file.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            TensorRef::Vector(v) => v.shape().to_vec(),
            TensorRef::Matrix(m) => m.shape().to_vec(),
        }
    }

    /// The values in row-major order.
    pub fn values(&self) -> Vec<f32> {
        match self {
            TensorRef::Vector(v) => v.iter().copied().collect(),
            TensorRef::Matrix(m) => m.iter().copied().collect(),
        }
    }
}

/// Reads and parses `config.json` of a model directory.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile {
            path: dir.to_path_buf(),
            what: "model directory".into(),
            hint: "pass a directory holding config.json, model.safetensors and tokenizer.json"
                .into(),
        });
    }
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(ModelError::MissingFile {
            path,
            what: "model configuration".into(),
            hint: "a model directory needs a Hugging Face style config.json (see \
                   docs/model-format.md)"
                .into(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    Ok(ModelConfig::from_json_str(&text, CONFIG_FILE)?)
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards listed
/// in `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if !index.is_file() {
        return Err(ModelError::MissingFile {
            path: single,
            what: "model weights".into(),
            hint: format!(
                "put the weights in {WEIGHTS_FILE}, or shards named \
                 model-0000N-of-0000M.safetensors listed in {WEIGHTS_INDEX_FILE}"
            ),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let bad = |message: String| ModelError::Safetensors {
        path: index.clone(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object mapping tensor names to shard files".into()))?;
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[`{name}`] is not a file name")))?;
        if file.contains('/') || file.contains('\\') {
            return Err(bad(format!(
                "weight_map[`{name}`] = `{file}` must be a file name in the model directory"
            )));
        }
        shards.insert(file.to_string());
    }
    let mut paths = Vec::new();
    for file in shards {
        let path = dir.join(&file);
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path,
                what: "weight shard".into(),
                hint: format!("{WEIGHTS_INDEX_FILE} lists it; copy every shard into the directory"),
            });
        }
        paths.push(path);
    }
    Ok(paths)
}

/// The tensors of all weight files, by name.
struct TensorStore<'a> {
    tensors: HashMap<String, safetensors::tensor::TensorView<'a>>,
}

/// What a tensor name refers to, once parsed.
enum TensorName<'a> {
    Global,
    Layer(usize, &'a str),
    Unknown,
}

fn parse_name(name: &str) -> TensorName<'_> {
    if let Some(rest) = name.strip_prefix("model.layers.")
        && let Some((index, suffix)) = rest.split_once('.')
        && let Ok(layer) = index.parse::<usize>()
    {
        return TensorName::Layer(layer, suffix);
    }
    match name {
        EMBED | FINAL_NORM | LM_HEAD => TensorName::Global,
        _ => TensorName::Unknown,
    }
}

impl<'a> TensorStore<'a> {
    /// Rejects tensors the config does not call for, before anything is converted, so that
    /// the error names the first such tensor (in name order).
    fn check_names(&self, config: &ModelConfig) -> Result<()> {
        let names: BTreeMap<&str, ()> = self.tensors.keys().map(|k| (k.as_str(), ())).collect();
        let layers = config.num_layers();
        for name in names.keys() {
            let unexpected = |layer, reason: String| ModelError::UnexpectedTensor {
                name: name.to_string(),
                layer,
                reason,
            };
            match parse_name(name) {
                TensorName::Global => {}
                TensorName::Unknown => {
                    return Err(unexpected(
                        None,
                        "not a tensor of a Llama/CLA decoder (see docs/model-format.md for the \
                         expected names; biases are not supported)"
                            .into(),
                    ));
                }
                TensorName::Layer(layer, _) if layer >= layers => {
                    return Err(unexpected(
                        Some(layer),
                        format!("config.json has only {layers} layers (num_hidden_layers)"),
                    ));
                }
                TensorName::Layer(layer, suffix) => match suffix {
                    INPUT_NORM | Q_PROJ | O_PROJ | POST_NORM | GATE_PROJ | UP_PROJ | DOWN_PROJ
                    | ROTARY_INV_FREQ => {}
                    K_PROJ | V_PROJ | KV_NORM => {
                        if !config.kv_sharing.is_producer(layer) {
                            return Err(unexpected(
                                Some(layer),
                                format!(
                                    "config.json makes layer {layer} a consumer of layer {}'s \
                                     keys/values (kv_source_layers = {}), so it must not have \
                                     its own K/V weights; fix the map or remove the tensor",
                                    config.kv_sharing.producer_of(layer),
                                    config.kv_sharing
                                ),
                            ));
                        }
                    }
                    _ => {
                        return Err(unexpected(
                            Some(layer),
                            "not a tensor of a Llama/CLA decoder layer (see \
                             docs/model-format.md; biases are not supported)"
                                .into(),
                        ));
                    }
                },
            }
        }
        Ok(())
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` as f32 with exactly `shape`.
    fn take(&self, name: &str, layer: Option<usize>, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.into(),
                layer,
            })?;
        if view.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.into(),
                layer,
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        decode(name, view.dtype(), view.data())
    }

    fn matrix(
        &self,
        name: &str,
        layer: Option<usize>,
        rows: usize,
        cols: usize,
    ) -> Result<Array2<f32>> {
        let v = self.take(name, layer, &[rows, cols])?;
        Ok(Array2::from_shape_vec((rows, cols), v).expect("length checked against the shape"))
    }

    fn vector(&self, name: &str, layer: Option<usize>, len: usize) -> Result<Array1<f32>> {
        Ok(Array1::from_vec(self.take(name, layer, &[len])?))
    }
}

fn build_weights(config: ModelConfig, store: &TensorStore<'_>) -> Result<ModelWeights> {
    let h = config.hidden_size;
    let (q, kvw, inter, vocab) = (
        config.q_width(),
        config.kv_width(),
        config.intermediate_size,
        config.vocab_size,
    );
    let embed_tokens = store.matrix(EMBED, None, vocab, h)?;
    let mut layers = Vec::with_capacity(config.num_layers());
    for i in 0..config.num_layers() {
        let l = Some(i);
        let name = |s| layer_tensor(i, s);
        let input_norm = store.vector(&name(INPUT_NORM), l, h)?;
        let q_proj = store.matrix(&name(Q_PROJ), l, q, h)?;
        let kv = if config.kv_sharing.is_producer(i) {
            let kv_norm = if store.has(&name(KV_NORM)) {
                Some(store.vector(&name(KV_NORM), l, h)?)
            } else {
                None
            };
            Some(KvProjection {
                kv_norm,
                k_proj: store.matrix(&name(K_PROJ), l, kvw, h)?,
                v_proj: store.matrix(&name(V_PROJ), l, kvw, h)?,
            })
        } else {
            None
        };
        layers.push(LayerWeights {
            input_norm,
            q_proj,
            kv,
            o_proj: store.matrix(&name(O_PROJ), l, h, q)?,
            post_attention_norm: store.vector(&name(POST_NORM), l, h)?,
            gate_proj: store.matrix(&name(GATE_PROJ), l, inter, h)?,
            up_proj: store.matrix(&name(UP_PROJ), l, inter, h)?,
            down_proj: store.matrix(&name(DOWN_PROJ), l, h, inter)?,
        });
    }
    let final_norm = store.vector(FINAL_NORM, None, h)?;
    // A tied checkpoint may still carry lm_head.weight (some exporters write it); the
    // embedding is used, as tie_word_embeddings says.
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(store.matrix(LM_HEAD, None, vocab, h)?)
    };
    Ok(ModelWeights {
        config,
        embed_tokens,
        layers,
        final_norm,
        lm_head,
    })
}

/// Converts little-endian tensor bytes to f32.
fn decode(name: &str, dtype: StDtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        StDtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        StDtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        StDtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::UnsupportedDType {
                name: name.into(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

/// Converts f32 values to little-endian bytes of `dtype` (F32, F16 or BF16).
fn encode(values: Vec<f32>, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}
