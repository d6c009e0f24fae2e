//! The one atomic file write of the workspace (CONVENTIONS.md 13): checkpoints, run-directory
//! records, recipes and reports a user could lose are written to a temporary sibling, fsynced,
//! renamed into place, and the directory is fsynced, so a crash leaves the old file or the new
//! one, never a mix.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary sibling `write_atomic` writes first: `NAME.tmp` beside `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically (write temporary sibling, fsync it, rename, fsync the
/// directory). Errors name the file that failed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = write_synced(path, bytes)?;
    commit(&tmp, path)
}

/// The first half of [`write_atomic`]: writes and fsyncs `path`'s temporary sibling, returned.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let tmp = tmp_path(path);
    let mut f = std::fs::File::create(&tmp).map_err(|e| named("creating", &tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| named("writing", &tmp, e))?;
    Ok(tmp)
}

/// The second half: renames `tmp` to `path` and fsyncs the directory.
pub fn commit(tmp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(tmp, path).map_err(|e| named("renaming to", path, e))?;
    sync_dir(path);
    Ok(())
}

fn named(what: &str, p: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
}

/// Fsyncs the directory holding `path` (makes a rename durable); best effort.
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("best.yaml");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert!(!tmp_path(&p).exists());
        let err = write_atomic(&dir.path().join("missing/x.json"), b"x").expect_err("no folder");
        assert!(err.to_string().contains("missing/x.json.tmp"), "{err}");
    }
}
