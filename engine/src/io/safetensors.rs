//! One memory-mapped `.safetensors` file: header validated on open, tensor bytes on demand.
//!
//! The header is parsed by the `safetensors` crate (which checks the header length, JSON,
//! contiguous offsets and that the data section ends exactly at the end of the file); every
//! failure is reported with the file's path.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{EngineError, Result};

/// Where a tensor lives inside its file.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    /// The safetensors dtype as written in the header.
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range inside the file.
    pub range: std::ops::Range<usize>,
}

/// A mapped safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorMeta>,
    metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; safetensors checkpoints
        // are not expected to be modified while a merge or search reads them (the same
        // assumption transformers and mergekit make). A concurrent truncation would surface
        // as SIGBUS, which is the documented limit of memory-mapped I/O.
        #[allow(unsafe_code)]
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let corrupt = |reason: String| EngineError::CorruptSafetensors { path: path.to_path_buf(), reason };
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            corrupt(match e {
                safetensors::SafeTensorError::HeaderTooSmall => {
                    format!("file is {} bytes, too short for a header", mmap.len())
                }
                safetensors::SafeTensorError::InvalidHeaderLength => "header length points past the end of the file".to_string(),
                safetensors::SafeTensorError::MetadataIncompleteBuffer => "tensor offsets do not match the file size (truncated file?)".to_string(),
                other => other.to_string(),
            })
        })?;
        let data_start = 8 + n;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (s, e) = info.data_offsets;
                let tm = TensorMeta { dtype: info.dtype, shape: info.shape.clone(), range: data_start + s..data_start + e };
                (name, tm)
            })
            .collect();
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(Self { path: path.to_path_buf(), mmap, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor name → location.
    pub fn tensors(&self) -> &HashMap<String, TensorMeta> {
        &self.tensors
    }

    /// The `__metadata__` map of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of a tensor (`None` if absent).
    pub fn bytes(&self, name: &str) -> Option<(&TensorMeta, &[u8])> {
        let m = self.tensors.get(name)?;
        Some((m, &self.mmap[m.range.clone()]))
    }
}
