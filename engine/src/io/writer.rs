//! Writing checkpoints: streamed, sharded safetensors and atomic output directories.
//!
//! [`ShardedWriter`] knows every tensor's name, shape and dtype up front, so it lays out the
//! shards and writes each header before any data; tensors are then appended one at a time in
//! that order, and the whole model never has to be in memory. Shards are named like
//! transformers' (`model.safetensors` when one shard suffices, else
//! `model-00001-of-00003.safetensors` + `model.safetensors.index.json` with `total_size`).
//!
//! [`OutputDir`] makes the directory appear atomically: everything is written into a hidden
//! sibling staging directory, fsynced, and renamed into place on [`OutputDir::commit`]. An
//! interrupted export leaves no half model (the staging directory is removed on drop).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::dtype::DType;
use crate::error::{EngineError, Result};

/// One tensor of the output, known before writing starts.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorEntry {
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

#[derive(Debug)]
struct Shard {
    file: String,
    entries: std::ops::Range<usize>,
}

/// Streams tensors into sharded safetensors files inside `dir`.
#[derive(Debug)]
pub struct ShardedWriter {
    dir: PathBuf,
    entries: Vec<TensorEntry>,
    shards: Vec<Shard>,
    next: usize,
    /// Bytes of entry `next` already written.
    partial: u64,
    current: Option<(usize, BufWriter<File>, PathBuf)>,
}

impl ShardedWriter {
    /// Lays out `entries` (in write order) into shards of at most `shard_size` bytes of tensor
    /// data (a tensor larger than the limit gets a shard of its own).
    pub fn new(dir: &Path, entries: Vec<TensorEntry>, shard_size: u64) -> Result<Self> {
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let mut size = 0u64;
        for (i, e) in entries.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if size + e.bytes() <= shard_size => {
                    g.end = i + 1;
                    size += e.bytes();
                }
                _ => {
                    groups.push(i..i + 1);
                    size = e.bytes();
                }
            }
        }
        let n = groups.len();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(i, r)| Shard {
                file: if n == 1 {
                    "model.safetensors".to_string()
                } else {
                    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
                },
                entries: r,
            })
            .collect();
        Ok(Self { dir: dir.to_path_buf(), entries, shards, next: 0, partial: 0, current: None })
    }

    /// Number of shard files.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The tensors, in the order [`write_next`](Self::write_next) expects them.
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    /// Appends the next tensor's little-endian bytes (its name must be the next entry's).
    pub fn write_next(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_part(name, bytes)
    }

    /// Appends part of the next tensor; the tensor is complete when its byte count is reached.
    /// Lets a tensor be streamed in chunks without ever holding it whole.
    pub fn write_part(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some(entry) = self.entries.get(self.next) else {
            return Err(self.out_err(format!("tensor '{name}' written after the last entry")));
        };
        let total = entry.bytes();
        if entry.name != name || self.partial + bytes.len() as u64 > total {
            return Err(self.out_err(format!(
                "expected tensor '{}' ({} bytes, {} written), got '{name}' ({} more bytes)",
                entry.name,
                entry.bytes(),
                self.partial,
                bytes.len()
            )));
        }
        let shard = self.shards.iter().position(|s| s.entries.contains(&self.next)).unwrap_or(0);
        if self.current.as_ref().map(|c| c.0) != Some(shard) {
            self.close_current()?;
            self.current = Some(self.open_shard(shard)?);
        }
        if let Some((_, w, path)) = self.current.as_mut() {
            w.write_all(bytes).map_err(|e| EngineError::io(path.clone(), e))?;
        }
        self.partial += bytes.len() as u64;
        if self.partial == total {
            self.next += 1;
            self.partial = 0;
        }
        Ok(())
    }

    /// Closes the last shard and writes the index (for more than one shard). Fails if not
    /// every entry was written.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.entries.len() || self.partial != 0 {
            return Err(self.out_err(format!("only {} of {} tensors written", self.next, self.entries.len())));
        }
        self.close_current()?;
        if self.shards.len() > 1 {
            let mut weight_map = Map::new();
            for s in &self.shards {
                for e in &self.entries[s.entries.clone()] {
                    weight_map.insert(e.name.clone(), Value::from(s.file.clone()));
                }
            }
            let total: u64 = self.entries.iter().map(TensorEntry::bytes).sum();
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            write_file(&self.dir.join("model.safetensors.index.json"), pretty(&index).as_bytes())?;
        }
        Ok(())
    }

    fn out_err(&self, reason: String) -> EngineError {
        EngineError::Output { path: self.dir.clone(), reason }
    }

    fn open_shard(&self, i: usize) -> Result<(usize, BufWriter<File>, PathBuf)> {
        let s = &self.shards[i];
        let path = self.dir.join(&s.file);
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0u64;
        for e in &self.entries[s.entries.clone()] {
            let end = off + e.bytes();
            header.insert(
                e.name.clone(),
                json!({"dtype": e.dtype.safetensors_name(), "shape": e.shape, "data_offsets": [off, end]}),
            );
            off = end;
        }
        let mut h = serde_json::to_string(&header).map_err(|e| self.out_err(e.to_string()))?.into_bytes();
        // Pad with spaces so the data section starts 8-byte aligned, as safetensors does.
        while (h.len() + 8) % 8 != 0 {
            h.push(b' ');
        }
        let file = File::create(&path).map_err(|e| EngineError::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(|e| EngineError::io(&path, e))?;
        w.write_all(&h).map_err(|e| EngineError::io(&path, e))?;
        Ok((i, w, path))
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some((_, w, path)) = self.current.take() {
            let f = w.into_inner().map_err(|e| EngineError::io(&path, e.into_error()))?;
            f.sync_all().map_err(|e| EngineError::io(&path, e))?;
        }
        Ok(())
    }
}

/// JSON pretty-printed with a trailing newline (the style of transformers' files).
pub fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Writes and fsyncs a file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| EngineError::io(path, e))?;
    f.write_all(bytes).map_err(|e| EngineError::io(path, e))?;
    f.sync_all().map_err(|e| EngineError::io(path, e))
}

/// Whether `dir` holds anything (an unreadable directory counts as occupied).
fn occupied(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true)
}

/// An output directory that appears atomically on [`commit`](Self::commit).
#[derive(Debug)]
pub struct OutputDir {
    target: PathBuf,
    staging: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl OutputDir {
    /// Prepares a staging directory next to `target`. Refuses an existing non-empty `target`
    /// unless `overwrite`.
    pub fn create(target: &Path, overwrite: bool) -> Result<Self> {
        let err = |reason: String| EngineError::Output { path: target.to_path_buf(), reason };
        if target.exists() {
            if !target.is_dir() {
                return Err(err("exists and is not a directory".into()));
            }
            if occupied(target) && !overwrite {
                return Err(err("exists and is not empty (pass --force to replace it)".into()));
            }
        }
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| err("has no final path component".into()))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| err(format!("cannot create parent directory: {e}")))?;
        // Leftovers of a killed writer of the same target (SIGKILL skips Drop) are removed.
        let prefix = format!(".{name}.partial-");
        if let Ok(rd) = std::fs::read_dir(&parent) {
            for e in rd.flatten() {
                if e.file_name().to_str().is_some_and(|f| f.starts_with(&prefix)) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let staging = parent.join(format!("{prefix}{}", std::process::id()));
        std::fs::create_dir(&staging).map_err(|e| err(format!("not writable: {e}")))?;
        Ok(Self { target: target.to_path_buf(), staging, overwrite, committed: false })
    }

    /// Where files are written until commit.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the staging directory into place (replacing an existing target when allowed).
    pub fn commit(mut self) -> Result<()> {
        if let Ok(d) = File::open(&self.staging) {
            let _ = d.sync_all();
        }
        if self.target.exists() {
            if !self.overwrite && occupied(&self.target) {
                return Err(EngineError::Output { path: self.target.clone(), reason: "appeared while writing".into() });
            }
            let old = self.staging.with_extension("old");
            std::fs::rename(&self.target, &old).map_err(|e| EngineError::io(&self.target, e))?;
            std::fs::rename(&self.staging, &self.target).map_err(|e| EngineError::io(&self.target, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| EngineError::io(&old, e))?;
        } else {
            std::fs::rename(&self.staging, &self.target).map_err(|e| EngineError::io(&self.target, e))?;
        }
        if let Some(p) = self.target.parent().and_then(|p| File::open(if p.as_os_str().is_empty() { Path::new(".") } else { p }).ok()) {
            let _ = p.sync_all();
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::SafetensorsFile;

    fn entry(name: &str, n: usize) -> TensorEntry {
        TensorEntry { name: name.into(), shape: vec![n], dtype: DType::F32 }
    }

    #[test]
    fn shards_respect_the_size_limit_and_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let entries = vec![entry("a", 10), entry("b", 10), entry("c", 30), entry("d", 1)];
        let mut w = ShardedWriter::new(tmp.path(), entries, 80).expect("writer");
        assert_eq!(w.shard_count(), 3, "a+b (80 B), c (120 B alone), d");
        for (name, n) in [("a", 10), ("b", 10), ("c", 30), ("d", 1)] {
            let v: Vec<f32> = (0..n).map(|i| i as f32 + name.len() as f32).collect();
            w.write_next(name, bytemuck::cast_slice(&v)).expect("write");
        }
        w.finish().expect("finish");
        let index: Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).expect("index")).expect("json");
        assert_eq!(index["metadata"]["total_size"], 204);
        assert_eq!(index["weight_map"]["c"], "model-00002-of-00003.safetensors");
        let f = SafetensorsFile::open(&tmp.path().join("model-00002-of-00003.safetensors")).expect("open");
        let (_, bytes) = f.bytes("c").expect("c");
        assert_eq!(bytes.len(), 120);
        assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    }

    #[test]
    fn out_of_order_writes_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut w = ShardedWriter::new(tmp.path(), vec![entry("a", 1), entry("b", 1)], 1 << 20).expect("writer");
        assert!(w.write_next("b", &[0; 4]).is_err());
        w.write_next("a", &[0; 4]).expect("a");
        assert!(w.finish().is_err(), "b missing");
    }

    #[test]
    fn output_dir_is_atomic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("out");
        {
            let o = OutputDir::create(&target, false).expect("create");
            write_file(&o.path().join("x"), b"1").expect("write");
            // dropped without commit
        }
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 0, "staging removed");
        let o = OutputDir::create(&target, false).expect("create");
        write_file(&o.path().join("x"), b"1").expect("write");
        o.commit().expect("commit");
        assert!(target.join("x").is_file());
        assert!(OutputDir::create(&target, false).is_err(), "non-empty target refused");
        let o = OutputDir::create(&target, true).expect("overwrite");
        write_file(&o.path().join("y"), b"2").expect("write");
        o.commit().expect("commit");
        assert!(target.join("y").is_file() && !target.join("x").exists());
    }
}
