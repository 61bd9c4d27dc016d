//! What every child process (owner or worker) does first: tie its life to the supervisor.
//!
//! `PR_SET_PDEATHSIG` delivers SIGKILL to us when the *thread* that spawned us exits; the
//! supervisor spawns from one long-lived thread, so in practice that is "when the supervisor
//! dies". The signal is only armed from the moment we set it: if the supervisor died before,
//! we were already re-parented, which `getppid()` reveals, so we compare it with the pid the
//! supervisor put in our environment.
//!
//! Its bus connection a child inherits ready-made: one end of a socketpair at the fd number in
//! `FORKLESS_BUS_FD`, on which the supervisor has already queued the welcome (and, for a
//! worker, the generation). [`take_inherited_bus`] claims it exactly once; workers claim their
//! listening sockets (fds 3.., `LISTEN_FDS`) with [`take_inherited_listeners`].
//!
//! What the supervisor told the child (which fd, which pid) comes from its environment, read
//! once as a [`ChildEnv`].
//!
//! ```no_run
//! # async fn f() {
//! let env = forkless_bus::child_env::ChildEnv::from_env().expect("started by the supervisor");
//! forkless_bus::child::die_with_supervisor(&env).expect("supervisor is gone");
//! let bus = forkless_bus::child::connect_to_supervisor(&env).await.expect("bus");
//! # }
//! ```

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::process::{getppid, set_parent_process_death_signal, Pid, Signal};

use crate::channel::BusStream;
use crate::child_env::ChildEnv;
use crate::ENV_BUS_FD;

/// Exit status of a child that must not be restarted because restarting cannot help (a missing
/// or corrupt weights file, a broken configuration): sysexits' `EX_CONFIG`. The supervisor
/// stops and reports the child's last stderr lines instead of restarting it.
pub const EXIT_FATAL: i32 = 78;

/// Exit status of a child that could not get a resource that should free up soon (memory, GPU
/// memory still held by a process that just died): sysexits' `EX_TEMPFAIL`. The supervisor
/// retries it with backoff and does not count it as a crash.
pub const EXIT_TEMPORARY: i32 = 75;

/// The exit status a child should end with: [`EXIT_TEMPORARY`] when it ran out of memory for
/// now, [`EXIT_FATAL`] when restarting cannot help, 1 otherwise.
pub fn exit_status(out_of_memory: bool, fatal: bool) -> i32 {
    match (out_of_memory, fatal) {
        (true, _) => EXIT_TEMPORARY,
        (false, true) => EXIT_FATAL,
        (false, false) => 1,
    }
}

/// Gives the C allocator's free memory back to the kernel (`malloc_trim(0)`, glibc). A worker
/// calls it after a burst of connections ends: glibc keeps freed heap pages for reuse, so
/// without it the memory a burst used stays in the worker's RSS. A no-op on other C libraries.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only walks the allocator's own free lists
    // under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// True for the errors that mean "out of memory for now": ENOMEM, and ENOSPC from a full shmem.
pub fn is_out_of_memory(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(code) if code == rustix::io::Errno::NOMEM.raw_os_error() || code == rustix::io::Errno::NOSPC.raw_os_error())
}

/// Why a child could not tie itself to its supervisor.
#[derive(Debug, thiserror::Error)]
pub enum OrphanError {
    #[error("cannot set PR_SET_PDEATHSIG: {0}")]
    Prctl(std::io::Error),
    #[error(
        "parent is pid {actual:?}, not the supervisor (pid {expected}): the supervisor is gone, or a \
         wrapper forked this program (end wrapper scripts with `exec program ...`)"
    )]
    Orphaned { expected: u32, actual: Option<i32> },
    #[error(
        "{ENV_LAUNCHER_PID} is not set: a worker forked by a launcher (a WSGI server's master process) \
         needs the launcher to set it (start the server with `python -m forkless.gunicorn`)"
    )]
    NoLauncher,
    #[error(
        "parent is pid {actual:?}, not the launcher (pid {expected}) that forked this worker: the \
         launcher is gone"
    )]
    LauncherGone { expected: i32, actual: Option<i32> },
}

/// Arms SIGKILL-on-parent-death and checks that the parent is still the supervisor.
pub fn die_with_supervisor(env: &ChildEnv) -> Result<(), OrphanError> {
    let expected = env.supervisor_pid;
    set_parent_process_death_signal(Some(Signal::KILL)).map_err(|e| OrphanError::Prctl(e.into()))?;
    let actual = getppid().map(Pid::as_raw_nonzero).map(|p| p.get());
    if actual.and_then(|p| u32::try_from(p).ok()) != Some(expected) {
        return Err(OrphanError::Orphaned { expected, actual });
    }
    Ok(())
}

/// Environment variable with the pid of a launcher: a process the supervisor exec'd that forks
/// the real worker (a WSGI server's master process, such as gunicorn's, with one worker). The
/// launcher sets it for its child.
pub const ENV_LAUNCHER_PID: &str = "FORKLESS_LAUNCHER_PID";

/// [`die_with_supervisor`] for a worker that a launcher forked: arms SIGKILL-on-parent-death and
/// checks that the parent is still the launcher named in `FORKLESS_LAUNCHER_PID`. The launcher
/// itself calls [`die_with_supervisor`] before it forks, so supervisor → launcher → worker die
/// as a chain: the worker dies with the launcher, the launcher with the supervisor.
pub fn die_with_launcher() -> Result<(), OrphanError> {
    let expected: i32 =
        std::env::var(ENV_LAUNCHER_PID).ok().and_then(|v| v.parse().ok()).ok_or(OrphanError::NoLauncher)?;
    set_parent_process_death_signal(Some(Signal::KILL)).map_err(|e| OrphanError::Prctl(e.into()))?;
    let actual = getppid().map(Pid::as_raw_nonzero).map(|p| p.get());
    if actual != Some(expected) {
        return Err(OrphanError::LauncherGone { expected, actual });
    }
    Ok(())
}

/// Why an inherited descriptor cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("{0} is not set: this program must be started by `supervisor run`")]
    NotSet(&'static str),
    #[error("{name}={value:?} is not valid here")]
    BadValue { name: &'static str, value: String },
    #[error("the inherited {0} was already taken by this process")]
    AlreadyTaken(&'static str),
    #[error("inherited fd {fd} is not {expected}: {reason}")]
    WrongKind { fd: RawFd, expected: &'static str, reason: String },
}

static BUS_TAKEN: AtomicBool = AtomicBool::new(false);
static LISTENERS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of inherited descriptor `fd` once `check` has accepted it (so a number that
/// names something else is left alone, not closed), and marks it close-on-exec so that our own
/// children do not inherit it in turn.
fn claim_inherited_fd(
    fd: RawFd,
    expected: &'static str,
    check: impl FnOnce(BorrowedFd<'_>) -> Result<(), String>,
) -> Result<OwnedFd, InheritError> {
    let wrong = |reason: String| InheritError::WrongKind { fd, expected, reason };
    // SAFETY: F_GETFD on any number is harmless: it fails with EBADF if nothing is open there.
    // The borrow ends with this statement.
    rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).map_err(|e| wrong(e.to_string()))?;
    // SAFETY: `fd` is open (just checked) and stays open while borrowed: nothing in this
    // process closes descriptors it does not own, and the caller's TAKEN flag ensures no
    // other claim on this number exists.
    check(unsafe { BorrowedFd::borrow_raw(fd) }).map_err(wrong)?;
    // SAFETY: the supervisor placed this descriptor here for us (its number came from our
    // environment), `check` confirmed it is what we expect, and the caller's TAKEN flag makes
    // this the only OwnedFd ever created for it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(|e| wrong(e.to_string()))?;
    Ok(owned)
}

fn is_socket(fd: BorrowedFd<'_>) -> Result<(), String> {
    let mode = rustix::fs::fstat(fd).map_err(|e| e.to_string())?.st_mode;
    if mode & 0o170000 != 0o140000 {
        return Err("not a socket".into());
    }
    Ok(())
}

/// Claims the bus socket the supervisor placed at fd `fd` (`FORKLESS_BUS_FD`). Must run inside
/// a tokio runtime. Succeeds at most once per process. The socket must be one end of a
/// socketpair the supervisor (`supervisor`, its pid) created (`SO_PEERCRED` names it), so a
/// grandchild that merely inherited the variable never adopts an unrelated descriptor.
pub fn take_inherited_bus(fd: RawFd, supervisor: u32) -> Result<BusStream, InheritError> {
    if fd <= 2 {
        return Err(InheritError::BadValue { name: ENV_BUS_FD, value: fd.to_string() });
    }
    if BUS_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(InheritError::AlreadyTaken("bus socket"));
    }
    let owned = claim_inherited_fd(fd, "the supervisor's bus socket", |fd| {
        is_socket(fd)?;
        let peer = rustix::net::sockopt::socket_peercred(fd).map_err(|e| e.to_string())?;
        match peer.pid.as_raw_nonzero().get() {
            pid if u32::try_from(pid) == Ok(supervisor) => Ok(()),
            pid => Err(format!("its peer is pid {pid}, not the supervisor (pid {supervisor})")),
        }
    })?;
    let stream = std::os::unix::net::UnixStream::from(owned);
    let fd = stream.as_raw_fd();
    BusStream::from_std(stream).map_err(|e| InheritError::WrongKind {
        fd,
        expected: "a socket tokio can register",
        reason: e.to_string(),
    })
}

/// Claims the listening sockets passed under the systemd convention (`LISTEN_FDS` sockets at
/// fds 3..; `LISTEN_PID`, if set, must be our pid). Succeeds at most once per process.
///
/// Why not the `listenfd` crate: it calls `std::env::remove_var`, which is unsound once other
/// threads run (a tokio runtime's), and workers take their listener inside the runtime. The
/// variables stay set; the sockets become close-on-exec, so our children do not inherit them.
pub fn take_inherited_listeners() -> Result<Vec<std::net::TcpListener>, InheritError> {
    let count = std::env::var("LISTEN_FDS").map_err(|_| InheritError::NotSet("LISTEN_FDS"))?;
    let count: i32 = count
        .parse()
        .ok()
        .filter(|&n| (1..=64).contains(&n))
        .ok_or(InheritError::BadValue { name: "LISTEN_FDS", value: count })?;
    if let Ok(pid) = std::env::var("LISTEN_PID") {
        if !pid.is_empty() && pid != std::process::id().to_string() {
            return Err(InheritError::BadValue { name: "LISTEN_PID", value: pid });
        }
    }
    if LISTENERS_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(InheritError::AlreadyTaken("listening sockets"));
    }
    (3..3 + count)
        .map(|fd| {
            let owned = claim_inherited_fd(fd, "a listening TCP socket", |fd| {
                is_socket(fd)?;
                match rustix::net::sockopt::socket_acceptconn(fd) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("socket is not listening".into()),
                    Err(e) => Err(e.to_string()),
                }
            })?;
            Ok(std::net::TcpListener::from(owned))
        })
        .collect()
}

/// Why a child could not open its bus connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Inherit(#[from] InheritError),
    #[error("cannot connect to the supervisor's bus at {path}: {source}")]
    Connect { path: std::path::PathBuf, source: std::io::Error },
    #[error("bus: {0}")]
    Send(#[from] crate::channel::SendError),
    #[error("bus: {0}")]
    Recv(#[from] crate::channel::RecvError),
    #[error("the supervisor refused this {role:?}: {reason}")]
    Refused { role: crate::Role, reason: String },
    #[error("the supervisor speaks bus protocol {theirs}, this program {ours}: rebuild it against the same forkless")]
    Version { theirs: u32, ours: u32 },
    #[error("the supervisor sent {0} where a welcome was expected")]
    Unexpected(&'static str),
}

/// Opens the bus as `env.role`: the inherited socket (`FORKLESS_BUS_FD`) when there is one,
/// else the path in `FORKLESS_BUS`; says hello and checks the welcome's protocol version.
pub async fn connect_to_supervisor(env: &ChildEnv) -> Result<BusStream, ConnectError> {
    use crate::wire::{Message, PROTOCOL_VERSION};
    let role = env.role;
    let mut bus = match (env.bus_fd, &env.bus_path) {
        (Some(fd), _) => take_inherited_bus(fd, env.supervisor_pid)?,
        (None, Some(path)) => {
            let path = path.clone();
            BusStream::connect(&path).await.map_err(|source| ConnectError::Connect { path, source })?
        }
        (None, None) => return Err(InheritError::NotSet(ENV_BUS_FD).into()),
    };
    bus.send(&Message::hello(role, std::process::id()), &[]).await?;
    match bus.recv().await?.0 {
        Message::Welcome { version } if version == PROTOCOL_VERSION => Ok(bus),
        Message::Welcome { version } => Err(ConnectError::Version { theirs: version, ours: PROTOCOL_VERSION }),
        Message::Refused { reason } => Err(ConnectError::Refused { role, reason }),
        other => Err(ConnectError::Unexpected(other.kind())),
    }
}

/// CPU time consumed so far by the calling thread (for attach timing).
pub fn thread_cpu_time() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launched_worker_checks_its_launcher() {
        // One test for every case: they share the process environment.
        std::env::remove_var(ENV_LAUNCHER_PID);
        assert!(matches!(die_with_launcher(), Err(OrphanError::NoLauncher)));
        // Our own pid is never our parent: the check must see that the launcher is gone.
        std::env::set_var(ENV_LAUNCHER_PID, std::process::id().to_string());
        let err = die_with_launcher().unwrap_err();
        std::env::remove_var(ENV_LAUNCHER_PID);
        assert!(matches!(err, OrphanError::LauncherGone { .. }), "{err}");
        assert!(err.to_string().contains("launcher"), "{err}");
    }
}
