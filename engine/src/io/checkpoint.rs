//! A Hugging Face checkpoint directory: `config.json` + one or more safetensors shards.
//!
//! Opening maps every shard and validates every header (cheap: no tensor data is touched);
//! tensors are decoded on demand, one at a time. Sharded checkpoints are read through
//! `model.safetensors.index.json`; single-file ones from `model.safetensors`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::config::ModelConfig;
use super::safetensors::SafetensorsFile;
use crate::arch::{Architecture, Section};
use crate::dtype::{self, DType};
use crate::error::{EngineError, Result};
use crate::source::{Tensor, TensorSource};

/// An opened checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    label: String,
    dir: PathBuf,
    pub config: ModelConfig,
    pub arch: &'static Architecture,
    files: Vec<SafetensorsFile>,
    /// tensor name → index into `files`.
    index: HashMap<String, usize>,
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

impl Checkpoint {
    /// Opens the checkpoint in `dir`; `label` names it in messages (the user's reference).
    pub fn open(dir: &Path, label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let config = ModelConfig::from_dir(dir)?;
        let arch = Architecture::for_config(&config, &dir.join("config.json"))?;
        let shard_names = shard_files(dir)?;
        let mut files = Vec::with_capacity(shard_names.len());
        let mut index = HashMap::new();
        for name in &shard_names {
            let f = SafetensorsFile::open(&dir.join(name))?;
            for t in f.tensors().keys() {
                index.insert(t.clone(), files.len());
            }
            files.push(f);
        }
        let ck = Self { label, dir: dir.to_path_buf(), config, arch, files, index };
        ck.check_weight_map(&shard_names)?;
        ck.check_layer_count()?;
        Ok(ck)
    }

    /// The directory it was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of decoder layers (the architecture's layer-count key).
    pub fn num_layers(&self) -> usize {
        self.config.raw.get(&self.arch.layer_count_key).and_then(Value::as_u64).unwrap_or(0) as usize
    }

    /// The storage dtype of the checkpoint: the config's, else the first tensor's.
    pub fn dtype(&self) -> DType {
        self.config.dtype.unwrap_or_else(|| {
            self.files.iter().flat_map(|f| f.tensors().values()).find_map(|m| DType::from_safetensors(m.dtype)).unwrap_or(DType::F32)
        })
    }

    /// Total bytes of tensor data in the checkpoint.
    pub fn raw_bytes(&self) -> u64 {
        self.files.iter().flat_map(|f| f.tensors().values()).map(|m| m.range.len() as u64).sum()
    }

    /// Raw bytes and metadata of a tensor.
    pub fn raw(&self, name: &str) -> Result<(DType, &[usize], &[u8])> {
        let missing = || EngineError::MissingTensor { model: self.label.clone(), tensor: name.to_string() };
        let f = &self.files[*self.index.get(name).ok_or_else(missing)?];
        let (m, bytes) = f.bytes(name).ok_or_else(missing)?;
        let dt = DType::from_safetensors(m.dtype).ok_or_else(|| EngineError::UnsupportedDtype {
            path: f.path().to_path_buf(),
            tensor: name.to_string(),
            dtype: format!("{:?}", m.dtype),
        })?;
        Ok((dt, &m.shape, bytes))
    }

    /// Checks that every tensor the architecture requires is present with a supported dtype.
    pub fn validate(&self) -> Result<()> {
        self.check_config_shapes()?;
        for (name, w) in self.arch.tensor_names(&self.config, self.num_layers()) {
            if w.optional && !self.index.contains_key(&name) {
                continue;
            }
            self.raw(&name)?;
        }
        Ok(())
    }

    /// The first tensor (in name order) holding a NaN or an infinite value, if any: one pass
    /// over the stored bits (an all-ones exponent), in parallel over tensors.
    pub fn first_non_finite(&self) -> Option<String> {
        use rayon::prelude::*;
        let mut names: Vec<&String> = self.index.keys().collect();
        names.sort();
        let bad = |name: &&&String| -> bool {
            let Ok((dt, _, bytes)) = self.raw(name) else { return false };
            match dt {
                DType::F32 => bytes.chunks_exact(4).any(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7F80_0000 == 0x7F80_0000),
                DType::BF16 => bytes.chunks_exact(2).any(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7F80 == 0x7F80),
                DType::F16 => bytes.chunks_exact(2).any(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 == 0x7C00),
            }
        };
        names.par_iter().find_first(bad).map(|n| n.to_string())
    }

    /// The config's layer count against the tensors (before anything is sized by it): the last
    /// declared layer must be there and no layer after it. A config that declares 10⁸ layers
    /// is an error here, not an allocation of 10⁸ tensor names.
    fn check_layer_count(&self) -> Result<()> {
        let Some(w) = self.arch.section(Section::Layer).find(|w| !w.optional) else { return Ok(()) };
        let n = self.num_layers();
        let bad = |reason: String| EngineError::BadJson { path: self.dir.join("config.json"), reason };
        let key = &self.arch.layer_count_key;
        if n == 0 || !self.index.contains_key(&w.name_for(n - 1)) {
            return Err(bad(format!("{key} = {n}, but the checkpoint has no tensor '{}'", w.name_for(n.saturating_sub(1)))));
        }
        if self.index.contains_key(&w.name_for(n)) {
            return Err(bad(format!("{key} = {n}, but the checkpoint holds more layers ('{}' is there)", w.name_for(n))));
        }
        Ok(())
    }

    /// The config's attention and embedding sizes against the tensors that carry them, so that
    /// a merge never writes a checkpoint whose config contradicts its weights.
    fn check_config_shapes(&self) -> Result<()> {
        let c = &self.config;
        let bad = |reason: String| EngineError::BadJson { path: self.dir.join("config.json"), reason };
        if c.num_key_value_heads == 0 || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
            return Err(bad(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                c.num_attention_heads, c.num_key_value_heads
            )));
        }
        if c.head_dim == 0 {
            return Err(bad("head_dim = 0".into()));
        }
        let expect = [
            ("model.embed_tokens.weight", [c.vocab_size, c.hidden_size], "vocab_size x hidden_size"),
            (
                "model.layers.0.self_attn.q_proj.weight",
                [c.num_attention_heads * c.head_dim, c.hidden_size],
                "num_attention_heads * head_dim x hidden_size",
            ),
            (
                "model.layers.0.self_attn.k_proj.weight",
                [c.num_key_value_heads * c.head_dim, c.hidden_size],
                "num_key_value_heads * head_dim x hidden_size",
            ),
        ];
        for (name, shape, what) in expect {
            let Ok((_, got, _)) = self.raw(name) else { continue };
            if got != shape.as_slice() {
                return Err(bad(format!("'{name}' has shape {got:?}, but the config says {shape:?} ({what})")));
            }
        }
        Ok(())
    }

    fn check_weight_map(&self, shard_names: &[String]) -> Result<()> {
        let path = self.dir.join(INDEX_FILE);
        if shard_names.len() == 1 && shard_names[0] == SINGLE_FILE {
            return Ok(());
        }
        for (tensor, file) in read_weight_map(&path)? {
            let Some(&i) = self.index.get(&tensor) else {
                return Err(EngineError::BadJson { path, reason: format!("weight_map lists '{tensor}' in {file}, but no shard holds it") });
            };
            if self.files[i].path().file_name().and_then(|f| f.to_str()) != Some(file.as_str()) {
                return Err(EngineError::BadJson { path, reason: format!("weight_map puts '{tensor}' in {file}, but it is in another shard") });
            }
        }
        Ok(())
    }
}

fn read_weight_map(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    let bad = |reason: String| EngineError::BadJson { path: path.to_path_buf(), reason };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("missing 'weight_map'".into()))?;
    map.iter()
        .map(|(k, f)| {
            let f = f.as_str().ok_or_else(|| bad(format!("weight_map['{k}'] is not a file name")))?;
            if f.contains('/') || f.contains("..") {
                return Err(bad(format!("weight_map['{k}'] = '{f}' points outside the directory")));
            }
            Ok((k.clone(), f.to_string()))
        })
        .collect()
}

/// The shard file names of a checkpoint directory.
fn shard_files(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let mut files: Vec<String> = read_weight_map(&index)?.into_values().collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    if dir.join(SINGLE_FILE).is_file() {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    Err(EngineError::ModelNotFound { model: dir.display().to_string(), reason: format!("no {SINGLE_FILE} or {INDEX_FILE} in the directory") })
}

impl TensorSource for Checkpoint {
    fn label(&self) -> &str {
        &self.label
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    fn meta(&self, name: &str) -> Option<(Vec<usize>, DType)> {
        self.raw(name).ok().map(|(d, s, _)| (s.to_vec(), d))
    }

    fn read_f32(&self, name: &str) -> Result<Tensor> {
        let (dt, shape, bytes) = self.raw(name)?;
        Ok(Tensor::new(shape.to_vec(), dtype::decode(dt, bytes)))
    }
}
