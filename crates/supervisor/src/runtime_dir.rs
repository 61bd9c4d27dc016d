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
#[error(
    "cannot create a private runtime folder in {path}: {source} (set [supervisor] runtime_dir to a writable folder)"
)]
pub struct RuntimeDirError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// A 0700 folder owned by this supervisor for its lifetime.
#[derive(Debug)]
pub struct RuntimeDir {
    dir: tempfile::TempDir,
}

impl RuntimeDir {
    /// Creates `<parent>/forkless-XXXXXX` (a fresh random name, created exclusively, mode
    /// 0700, so no other user or earlier supervisor can have planted or shared it); `parent`
    /// defaults to `$XDG_RUNTIME_DIR`, else the temp dir.
    pub fn create(parent: Option<&Path>) -> Result<Self, RuntimeDirError> {
        let parent = parent.map(Path::to_path_buf).unwrap_or_else(default_parent);
        let err = |source| RuntimeDirError { path: parent.clone(), source };
        std::fs::create_dir_all(&parent).map_err(err)?;
        remove_stale(&parent);
        let dir = tempfile::Builder::new()
            .prefix("forkless-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(err)?;
        std::fs::write(dir.path().join(MARKER), std::process::id().to_string())
            .map_err(|source| RuntimeDirError { path: dir.path().into(), source })?;
        Ok(RuntimeDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the bus socket lives.
    pub fn bus_socket(&self) -> PathBuf {
        self.path().join("bus.sock")
    }

    /// Creates (mode 0700) and returns the folder where CUDA children cache compiled kernels:
    /// private like the rest of this folder, since a planted kernel would run in every worker.
    /// It goes with the folder when the supervisor exits, so a cache never outlives the binaries
    /// (and driver) that filled it.
    pub fn kernel_cache(&self) -> Result<PathBuf, RuntimeDirError> {
        let path = self.path().join("kernels");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .or_else(|e| if path.is_dir() { Ok(()) } else { Err(e) })
            .map_err(|source| RuntimeDirError { path: path.clone(), source })?;
        Ok(path)
    }
}

/// A runtime folder younger than this is never taken for stale: its supervisor may be about
/// to bind its bus socket.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// The file inside a runtime folder that marks it as one (and names its supervisor's pid).
const MARKER: &str = "supervisor.pid";

/// Removes runtime folders left by supervisors that were killed. Only folders that carry our
/// marker file are considered, so no other `forkless-*` folder is ever touched; one is stale
/// when it is older than [`STALE_AFTER`] and its bus socket no longer answers.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let uid = rustix::process::getuid().as_raw();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let is_ours = entry.file_name().to_string_lossy().starts_with("forkless-")
            && path.join(MARKER).is_file()
            && entry.metadata().is_ok_and(|m| {
                use std::os::unix::fs::MetadataExt;
                m.is_dir()
                    && m.uid() == uid
                    && m.modified().is_ok_and(|t| t.elapsed().unwrap_or_default() > STALE_AFTER)
            });
        if !is_ours || std::os::unix::net::UnixStream::connect(path.join("bus.sock")).is_ok() {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::warn!("removed the stale runtime folder {} of a supervisor that died", path.display()),
            Err(e) => tracing::warn!("cannot remove the stale runtime folder {}: {e}", path.display()),
        }
    }
}

pub(crate) fn default_parent() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|p| p.is_dir()).unwrap_or_else(std::env::temp_dir)
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
        let kernels = dir.kernel_cache().unwrap();
        assert_eq!(std::fs::metadata(&kernels).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(dir.kernel_cache().unwrap(), kernels, "asking twice is fine");
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn only_marked_stale_folders_are_removed() {
        let base = tempfile::tempdir().unwrap();
        let old = |path: &Path| {
            let status = std::process::Command::new("touch").args(["-d", "1 hour ago"]).arg(path).status().unwrap();
            assert!(status.success());
        };
        let users_folder = base.path().join("forkless-models");
        std::fs::create_dir(&users_folder).unwrap();
        old(&users_folder);
        let dead = RuntimeDir::create(Some(base.path())).unwrap();
        let dead_path = dead.path().to_path_buf();
        std::mem::forget(dead); // as if its supervisor was SIGKILLed
        old(&dead_path);
        let _fresh = RuntimeDir::create(Some(base.path())).unwrap();
        assert!(users_folder.exists(), "a folder without our marker is never touched");
        assert!(!dead_path.exists(), "a marked folder whose bus socket is dead is removed");
    }
}
