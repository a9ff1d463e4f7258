//! Writing files so that a crash leaves either the old file or the new one, never a torn mix:
//! write a temporary sibling, fsync it, rename it over the target, fsync the folder.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error_std::Error;

/// A sibling path that no other writer (thread or process) picks at the same time.
fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(std::format!(".{name}.tmp-{}-{unique}", std::process::id()))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut file = File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Replaces (or creates) `path` with `bytes` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = temp_sibling(path);
    let result = write_synced(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(parent_of(path))
}

/// Writes the files of a checkpoint folder. A new folder is built as a temporary sibling and
/// renamed into place (all or nothing). Into an existing folder each file is replaced atomically
/// in the order given (put the data first and `config.json` last), and other files there are
/// left alone.
pub fn write_dir(dir: &Path, files: &[(&str, &[u8])]) -> Result<(), Error> {
    if dir.is_dir() {
        for (name, bytes) in files {
            write_file(&dir.join(name), bytes)?;
        }
        return Ok(());
    }
    let tmp = temp_sibling(dir);
    let result = fs::create_dir_all(&tmp)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| {
            files
                .iter()
                .try_for_each(|(name, bytes)| write_synced(&tmp.join(name), bytes))
        })
        .and_then(|()| sync_dir(&tmp))
        .and_then(|()| replace_dir(&tmp, dir));
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Moves the finished folder `tmp` to `final_dir`, which must not exist yet (a rename cannot
/// replace a non-empty folder; merging is [`write_dir`]'s job), and makes the rename durable.
pub fn replace_dir(tmp: &Path, final_dir: &Path) -> Result<(), Error> {
    fs::rename(tmp, final_dir).map_err(|e| Error::io(final_dir, e))?;
    sync_dir(parent_of(final_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_new_and_existing_folders_without_leftovers() {
        let root = std::env::temp_dir().join(std::format!("qdylora-atomic-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = root.join("ckpt");
        write_dir(&dir, &[("a.bin", b"one"), ("config.json", b"{}")]).unwrap();
        assert_eq!(fs::read(dir.join("a.bin")).unwrap(), b"one");
        // Into the existing folder: files replaced, others kept.
        fs::write(dir.join("keep.txt"), b"k").unwrap();
        write_dir(&dir, &[("a.bin", b"two")]).unwrap();
        assert_eq!(fs::read(dir.join("a.bin")).unwrap(), b"two");
        assert_eq!(fs::read(dir.join("keep.txt")).unwrap(), b"k");
        write_file(&dir.join("a.bin"), b"three").unwrap();
        assert_eq!(fs::read(dir.join("a.bin")).unwrap(), b"three");
        // No temporary files are left behind.
        let names = |d: &Path| -> std::vec::Vec<std::string::String> {
            fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp-"))
                .collect()
        };
        assert!(names(&dir).is_empty() && names(&root).is_empty());
        // A folder cannot replace a file: an error, and the file is intact.
        let file = root.join("plain");
        fs::write(&file, b"data").unwrap();
        assert!(write_dir(&file, &[("x", b"y")]).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"data");
        fs::remove_dir_all(&root).unwrap();
    }
}
