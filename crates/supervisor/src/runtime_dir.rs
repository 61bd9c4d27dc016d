//! The supervisor's private runtime folder (mode 0700): holds the bus socket, so only this
//! user can even reach it; removed when the supervisor exits.
//!
//! ```
//! let base = tempfile::tempdir().unwrap();
//! let dir = forkless_supervisor::runtime_dir::RuntimeDir::create(Some(base.path())).unwrap();
//! assert!(dir.bus_socket().starts_with(base.path()));
//! ```

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Failure to prepare the runtime folder.
#[derive(Debug, thiserror::Error)]
#[error("cannot create private runtime folder {path}: {source} (set [supervisor] runtime_dir to a writable folder)")]
pub struct RuntimeDirError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// A 0700 folder owned by this supervisor for its lifetime.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Creates `<parent>/forkless-<pid>`; `parent` defaults to `$XDG_RUNTIME_DIR`, else the temp dir.
    pub fn create(parent: Option<&Path>) -> Result<Self, RuntimeDirError> {
        let parent = parent.map(Path::to_path_buf).unwrap_or_else(default_parent);
        let path = parent.join(format!("forkless-{}", std::process::id()));
        let err = |source| RuntimeDirError {
            path: path.clone(),
            source,
        };
        if path.exists() {
            // A previous supervisor with our pid died without cleaning up.
            std::fs::remove_dir_all(&path).map_err(err)?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        Ok(RuntimeDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the bus socket lives.
    pub fn bus_socket(&self) -> PathBuf {
        self.path.join("bus.sock")
    }
}

fn default_parent() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot remove runtime folder {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_private_and_removed_on_drop() {
        let base = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::create(Some(base.path())).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }
}
