//! Reading a plan file the config names: only when it is a regular file, and only up to a
//! size. A path to a FIFO would hold a reload until some writer
//! came; one to `/dev/zero` would be read until memory ran out.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest tracking plan file: the biggest plans seen (hundreds of events) are a few hundred
/// KiB, and compiling one takes time and memory in proportion to its size.
pub const MAX_PLAN_BYTES: u64 = 4 << 20;

/// The text of the regular file at `path` (symlinks followed), at most `max_bytes` long.
/// Errors say what the path is instead, for a config error.
pub fn read_regular(path: &Path, max_bytes: u64) -> Result<String, String> {
    // Checked before opening: opening some devices does something.
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    check_regular(&metadata, max_bytes)?;
    // Non-blocking: if a FIFO took the file's place since, opening it does not wait for a
    // writer (a regular file's reads are not affected).
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let metadata = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    check_regular(&metadata, max_bytes)?;
    read_at_most(file, max_bytes)
}

fn check_regular(metadata: &std::fs::Metadata, max_bytes: u64) -> Result<(), String> {
    let kind = metadata.file_type();
    let what = if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    };
    if let Some(what) = what {
        return Err(format!("not a regular file ({what})"));
    }
    if metadata.len() > max_bytes {
        return Err(too_large(max_bytes));
    }
    Ok(())
}

/// Reads up to one byte past the cap: a file that grew after it was measured is refused too.
fn read_at_most(file: File, max_bytes: u64) -> Result<String, String> {
    let mut bytes = Vec::new();
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(max_bytes));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))
}

fn too_large(max_bytes: u64) -> String {
    format!(
        "larger than {} KiB, the most a plan file may hold",
        max_bytes / 1024
    )
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn regular_files_are_read_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.json");
        std::fs::write(&path, "{}").unwrap();
        assert_eq!(read_regular(&path, 2).unwrap(), "{}");
        let error = read_regular(&path, 1).unwrap_err();
        assert!(error.contains("larger than"), "{error}");
        // Through a symlink, too.
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(read_regular(&link, 2).unwrap(), "{}");
    }

    #[test]
    fn fifos_devices_and_directories_are_refused_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for (path, what) in [
            (fifo.as_path(), "a FIFO"),
            (zero.as_path(), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let error = read_regular(path, MAX_PLAN_BYTES).unwrap_err();
            assert_eq!(error, format!("not a regular file ({what})"));
        }
    }
}
