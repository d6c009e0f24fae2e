//! Named tensors from somewhere: the [`TensorSource`] trait and the host [`Tensor`].
//!
//! A source can be a checkpoint directory (memory-mapped, lazy per tensor) or tensors held in
//! memory (a merge computed on load). Merging works in checkpoint (HF) key space, so merge
//! results compare 1:1 with mergekit's.

use std::collections::BTreeMap;

use crate::dtype::DType;
use crate::error::{EngineError, Result};

/// A dense row-major `f32` tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Named tensors, read on demand.
pub trait TensorSource: Send + Sync {
    /// A name for messages (the model reference).
    fn label(&self) -> &str;
    /// Every tensor name the source holds.
    fn tensor_names(&self) -> Vec<String>;
    /// Shape and storage dtype of a tensor, without reading it.
    fn meta(&self, name: &str) -> Option<(Vec<usize>, DType)>;
    /// Reads a tensor, converted to `f32`.
    fn read_f32(&self, name: &str) -> Result<Tensor>;
    /// The tensor as `f32`, borrowed when the source already holds it so (no copy).
    fn get_f32(&self, name: &str) -> Result<std::borrow::Cow<'_, Tensor>> {
        self.read_f32(name).map(std::borrow::Cow::Owned)
    }
}

/// Tensors held in memory.
#[derive(Debug, Default, Clone)]
pub struct MemorySource {
    label: String,
    tensors: BTreeMap<String, Tensor>,
}

impl MemorySource {
    pub fn new(label: impl Into<String>) -> Self {
        Self { label: label.into(), tensors: BTreeMap::new() }
    }

    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }
}

impl TensorSource for MemorySource {
    fn label(&self) -> &str {
        &self.label
    }

    fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn meta(&self, name: &str) -> Option<(Vec<usize>, DType)> {
        self.tensors.get(name).map(|t| (t.shape.clone(), DType::F32))
    }

    fn read_f32(&self, name: &str) -> Result<Tensor> {
        self.get_f32(name).map(std::borrow::Cow::into_owned)
    }

    fn get_f32(&self, name: &str) -> Result<std::borrow::Cow<'_, Tensor>> {
        self.tensors
            .get(name)
            .map(std::borrow::Cow::Borrowed)
            .ok_or_else(|| EngineError::MissingTensor { model: self.label.clone(), tensor: name.to_string() })
    }
}
