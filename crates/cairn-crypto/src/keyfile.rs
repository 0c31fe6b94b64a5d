//! Key files on disk.
//!
//! Keys are written with mode 0600 from the first byte on (the file is created with that
//! mode, never chmod-ed after the fact) and atomically (temp file + fsync + rename), so a
//! crash never leaves a half-written key and no other user can ever read it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::CryptoError;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CryptoError + '_ {
    move |source| CryptoError::KeyFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Atomically write secret bytes to `path` with permissions 0600.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), CryptoError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
        std::process::id()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    // An existing temp file keeps its old mode despite `.mode()`; force it.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Read a key file. A file readable by group or others still loads (refusing would lock the
/// user out of their vault) but logs a warning with the fix.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, CryptoError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "key file is readable by other users; fix with: chmod 600 {}",
            path.display()
        );
    }
    fs::read(path).map_err(io_err(path))
}

/// Whether `read_secret_file` would warn about `path`'s permissions.
pub fn is_exposed(path: &Path) -> Result<bool, CryptoError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    Ok(meta.permissions().mode() & 0o077 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_with_0600_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/device.key");
        write_secret_file(&p, b"secret!").unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_secret_file(&p).unwrap(), b"secret!");
        assert!(!is_exposed(&p).unwrap());
        // Overwrite keeps 0600 and replaces content atomically.
        write_secret_file(&p, b"new").unwrap();
        assert_eq!(read_secret_file(&p).unwrap(), b"new");
        let leftovers: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "temp files left behind: {leftovers:?}");
    }

    #[test]
    fn world_readable_still_loads_but_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, b"x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(is_exposed(&p).unwrap());
        assert_eq!(read_secret_file(&p).unwrap(), b"x");
    }

    #[test]
    fn missing_file_names_path() {
        let err = read_secret_file(Path::new("/nonexistent/cairn.key")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cairn.key"));
    }
}
