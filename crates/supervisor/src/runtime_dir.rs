//! The supervisor's private runtime folder, one per config: `<parent>/forkless-<hash>`, where
//! `<parent>` is `[supervisor] runtime_dir` (else `$XDG_RUNTIME_DIR`, else the temp dir) and
//! `<hash>` hashes the config file's canonical path, so every command given the same
//! `-c CONFIG` finds it. It is the trust boundary: mode 0700, owned by the supervisor's uid,
//! checked on every start (and by every control command), and it holds everything no other
//! user may reach:
//!
//! | entry | what |
//! |---|---|
//! | `lock` | `flock`ed by the running supervisor: "already running" is the kernel's word, and a dead supervisor's lock is gone with it |
//! | `supervisor.pid` | the running supervisor's pid; left behind by a killed one, it says whose groups to end |
//! | `control.sock` | the control socket (`supervisor status|stop|…`) |
//! | `bus.sock` | the path-based bus socket (children use inherited socketpairs) |
//! | `kernels/` | compiled CUDA kernels (a planted one would run in every worker) |
//! | `groups/` | one file per child's process group (see [`crate::groups`]) |
//!
//! A folder owned by another uid, open to group or others, or not a folder at all is refused,
//! naming it and saying what to do: its contents cannot be trusted. So is a parent folder that
//! another user could write to (owned by another non-root uid, or writable by others without
//! the sticky bit): they could swap the folder for their own.
//!
//! A folder left by a supervisor that was killed is recovered on the next start: its recorded
//! process groups are ended, its sockets and cache removed. The folder goes when its supervisor
//! exits.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::groups::ProcessGroups;

/// Why the runtime folder cannot be used. Each names the folder and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("cannot create the runtime folder {path}: {source} (set [supervisor] runtime_dir to a folder this user can write)")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a folder (a file or a symbolic link sits at the runtime folder's place): remove it")]
    NotAFolder { path: PathBuf },
    #[error(
        "runtime folder {path} belongs to uid {owner}, not to this user (uid {uid}): it cannot be trusted; remove it, \
         or set [supervisor] runtime_dir to a private folder (e.g. $XDG_RUNTIME_DIR)"
    )]
    NotOurs { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "runtime folder {path} has mode {mode:03o}, open to group or others: remove it (the supervisor recreates it \
         with mode 700) or `chmod 700` it"
    )]
    OpenToOthers { path: PathBuf, mode: u32 },
    #[error(
        "the runtime folder's parent {path} can be written by {who} (mode {mode:03o}, owner uid {owner}), who could \
         swap the runtime folder for their own: set [supervisor] runtime_dir to a folder only this user (or root) \
         can write, or one with the sticky bit like /tmp"
    )]
    UnsafeParent { path: PathBuf, who: &'static str, mode: u32, owner: u32 },
    #[error(
        "a supervisor for this config is already running (pid {pid}, runtime folder {path}): stop it first \
         (`supervisor stop -c CONFIG`)"
    )]
    Running { path: PathBuf, pid: String },
    #[error("runtime folder {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What sits in the runtime folder.
const LOCK: &str = "lock";
const PID_FILE: &str = "supervisor.pid";
const CONTROL_SOCKET: &str = "control.sock";
const BUS_SOCKET: &str = "bus.sock";
const KERNELS: &str = "kernels";
const GROUPS: &str = "groups";

/// The parent folder used when the config names none.
pub fn default_parent() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|p| p.is_dir()).unwrap_or_else(std::env::temp_dir)
}

/// Where the runtime folder of the config at `config` lives, under `parent` (default:
/// [`default_parent`]).
pub fn path_for(config: &Path, parent: Option<&Path>) -> PathBuf {
    let parent = parent.map(Path::to_path_buf).unwrap_or_else(default_parent);
    let absolute = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let hash = xxhash_rust::xxh3::xxh3_64(absolute.as_os_str().as_encoded_bytes());
    parent.join(format!("forkless-{hash:016x}"))
}

/// The control socket inside the runtime folder at `dir`.
pub fn control_socket_in(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// The private folder of a running supervisor, locked for its lifetime; removed when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    groups: ProcessGroups,
    /// Holds the `flock`; released (by the kernel, if need be) when the supervisor goes.
    _lock: File,
}

impl RuntimeDir {
    /// Opens (creating it if needed) and locks the runtime folder of the config at `config`,
    /// checking it and its parent, and recovering what a killed predecessor left.
    pub fn open(config: &Path, parent: Option<&Path>) -> Result<Self, RuntimeDirError> {
        let path = path_for(config, parent);
        let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        // A parent we create is ours alone (whatever the umask): nobody else can swap our folder.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(|source| RuntimeDirError::Create { path: parent.clone(), source })?;
        check_parent(&parent)?;
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeDirError::Create { path, source: e });
            }
            _ => {}
        }
        check_private(&path)?;
        let lock = lock(&path)?;
        recover_stale(&path)?;
        let io = |source| RuntimeDirError::Io { path: path.clone(), source };
        std::fs::write(path.join(PID_FILE), std::process::id().to_string()).map_err(io)?;
        let groups = ProcessGroups::new(path.join(GROUPS), std::process::id()).map_err(io)?;
        Ok(RuntimeDir { path, groups, _lock: lock })
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the control socket lives.
    pub fn control_socket(&self) -> PathBuf {
        control_socket_in(&self.path)
    }

    /// Where the bus socket lives.
    pub fn bus_socket(&self) -> PathBuf {
        self.path.join(BUS_SOCKET)
    }

    /// The record of the children's process groups.
    pub fn groups(&self) -> &ProcessGroups {
        &self.groups
    }

    /// Creates (mode 0700) and returns the folder where CUDA children cache compiled kernels:
    /// private like the rest of this folder, since a planted kernel would run in every worker.
    /// It goes with the folder when the supervisor exits, so a cache never outlives the binaries
    /// (and driver) that filled it.
    pub fn kernel_cache(&self) -> Result<PathBuf, RuntimeDirError> {
        let path = self.path.join(KERNELS);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .or_else(|e| if path.is_dir() { Ok(()) } else { Err(e) })
            .map_err(|source| RuntimeDirError::Io { path: path.clone(), source })?;
        Ok(path)
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        // Stragglers of children already reaped (a grandchild still in its grace) go now:
        // nothing of ours outlives the supervisor.
        crate::groups::end_stale_groups(&self.path.join(GROUPS), std::process::id());
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot remove the runtime folder {}: {e}", self.path.display());
        }
    }
}

/// Refuses a parent another user could write to: they could rename our folder away and put
/// theirs in its place. Root's folders, our own, and sticky shared ones (/tmp) are fine.
fn check_parent(parent: &Path) -> Result<(), RuntimeDirError> {
    let meta = std::fs::metadata(parent).map_err(|source| RuntimeDirError::Io { path: parent.into(), source })?;
    let uid = rustix::process::getuid().as_raw();
    let (mode, owner) = (meta.mode() & 0o7777, meta.uid());
    let sticky = mode & 0o1000 != 0;
    let who = if owner != uid && owner != 0 {
        "its owner"
    } else if mode & 0o022 != 0 && !sticky {
        "group or others"
    } else {
        return Ok(());
    };
    Err(RuntimeDirError::UnsafeParent { path: parent.into(), who, mode, owner })
}

/// Checks that `path` is a real folder (not a link), ours, and closed to everyone else.
pub fn check_private(path: &Path) -> Result<(), RuntimeDirError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| RuntimeDirError::Io { path: path.into(), source })?;
    if !meta.is_dir() {
        return Err(RuntimeDirError::NotAFolder { path: path.into() });
    }
    let uid = rustix::process::getuid().as_raw();
    if meta.uid() != uid {
        return Err(RuntimeDirError::NotOurs { path: path.into(), owner: meta.uid(), uid });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(RuntimeDirError::OpenToOthers { path: path.into(), mode: meta.mode() & 0o777 });
    }
    Ok(())
}

/// Takes the folder's lock, or says who holds it. A lock file unlinked by an exiting
/// supervisor between our open and our lock is retried, so two starts never both win.
fn lock(dir: &Path) -> Result<File, RuntimeDirError> {
    let path = dir.join(LOCK);
    let io = |source: std::io::Error| RuntimeDirError::Io { path: path.clone(), source };
    loop {
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::open(&path, flags, Mode::RUSR | Mode::WUSR).map_err(|e| io(e.into()))?;
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let pid = std::fs::read_to_string(dir.join(PID_FILE)).unwrap_or_default().trim().to_string();
                return Err(RuntimeDirError::Running { path: dir.into(), pid });
            }
            Err(e) => return Err(io(e.into())),
        }
        let locked = rustix::fs::fstat(&fd).map_err(|e| io(e.into()))?;
        match std::fs::symlink_metadata(&path) {
            Ok(now) if now.ino() == locked.st_ino && now.dev() == locked.st_dev => return Ok(File::from(fd)),
            _ => continue,
        }
    }
}

/// Once locked, a pid file means its supervisor died without cleaning up: end the process
/// groups it recorded and remove its sockets and cache.
fn recover_stale(dir: &Path) -> Result<(), RuntimeDirError> {
    let Ok(text) = std::fs::read_to_string(dir.join(PID_FILE)) else { return Ok(()) };
    let dead: u32 = text.trim().parse().unwrap_or(0);
    tracing::warn!("recovering the stale runtime folder {} of supervisor {dead}, which died", dir.display());
    let ended = crate::groups::end_stale_groups(&dir.join(GROUPS), dead);
    if ended > 0 {
        tracing::warn!("ended {ended} leftover process(es) of supervisor {dead}'s children");
    }
    let control = dir.join(CONTROL_SOCKET);
    if control.exists() {
        tracing::warn!("removing the stale control socket {} of a supervisor that died", control.display());
    }
    for name in [CONTROL_SOCKET, BUS_SOCKET, PID_FILE] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    for name in [KERNELS, GROUPS] {
        let _ = std::fs::remove_dir_all(dir.join(name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn is_private_locked_and_removed_on_drop() {
        let base = tempfile::tempdir().unwrap();
        let config = base.path().join("config.toml");
        let dir = RuntimeDir::open(&config, Some(base.path())).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let kernels = dir.kernel_cache().unwrap();
        assert_eq!(std::fs::metadata(&kernels).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(dir.kernel_cache().unwrap(), kernels, "asking twice is fine");
        let err = RuntimeDir::open(&config, Some(base.path())).unwrap_err();
        assert!(matches!(err, RuntimeDirError::Running { .. }), "{err}");
        assert!(err.to_string().contains(&std::process::id().to_string()), "{err}");
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        drop(RuntimeDir::open(&config, Some(base.path())).unwrap());
    }

    #[test]
    fn a_dead_supervisors_folder_is_recovered() {
        let base = tempfile::tempdir().unwrap();
        let config = base.path().join("config.toml");
        // What a SIGKILLed supervisor leaves: the folder, its pid file and sockets; no lock.
        let path = path_for(&config, Some(base.path()));
        std::fs::DirBuilder::new().mode(0o700).create(&path).unwrap();
        std::fs::write(path.join(BUS_SOCKET), b"").unwrap();
        std::fs::write(path.join(PID_FILE), b"999999999").unwrap();
        let fresh = RuntimeDir::open(&config, Some(base.path())).unwrap();
        assert!(!fresh.bus_socket().exists(), "the stale bus socket is gone");
        let pid = std::fs::read_to_string(path.join(PID_FILE)).unwrap();
        assert_eq!(pid, std::process::id().to_string());
    }

    #[test]
    fn folders_others_could_touch_are_refused_by_name() {
        let base = tempfile::tempdir().unwrap();
        let config = base.path().join("config.toml");
        let path = path_for(&config, Some(base.path()));
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = RuntimeDir::open(&config, Some(base.path())).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("755") && err.contains("chmod 700"), "{err}");
        std::fs::remove_dir(&path).unwrap();
        std::os::unix::fs::symlink(base.path(), &path).unwrap();
        let err = RuntimeDir::open(&config, Some(base.path())).unwrap_err();
        assert!(matches!(err, RuntimeDirError::NotAFolder { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
        let shared = base.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = RuntimeDir::open(&config, Some(&shared)).unwrap_err();
        assert!(matches!(err, RuntimeDirError::UnsafeParent { .. }), "{err}");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        drop(RuntimeDir::open(&config, Some(&shared)).unwrap());
    }
}

#[cfg(test)]
mod module_example {
    /// What this module's documentation once showed as an example (the module is private now).
    #[test]
    fn the_module_in_a_few_lines() {
        let base = tempfile::tempdir().unwrap();
        let config = base.path().join("config.toml");
        let dir = crate::runtime_dir::RuntimeDir::open(&config, Some(base.path())).unwrap();
        assert!(dir.bus_socket().starts_with(base.path()));
        assert_eq!(dir.path(), crate::runtime_dir::path_for(&config, Some(base.path())));
    }
}
