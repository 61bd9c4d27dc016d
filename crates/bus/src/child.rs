//! What every child process (owner or worker) does first: tie its life to the supervisor.
//!
//! `PR_SET_PDEATHSIG` delivers SIGKILL to us when the *thread* that spawned us exits; the
//! supervisor spawns from one long-lived thread, so in practice that is "when the supervisor
//! dies". The signal is only armed from the moment we set it: if the supervisor died before,
//! we were already re-parented, which `getppid()` reveals, so we compare it with the pid the
//! supervisor put in our environment.
//!
//! ```no_run
//! forkless_bus::child::die_with_supervisor().expect("supervisor is gone");
//! ```

use rustix::process::{getppid, set_parent_process_death_signal, Pid, Signal};

use crate::ENV_SUPERVISOR_PID;

/// Exit status of a child that must not be restarted because restarting cannot help (a missing
/// or corrupt weights file, a broken configuration): sysexits' `EX_CONFIG`. The supervisor
/// stops and reports the child's last stderr lines instead of restarting it.
pub const EXIT_FATAL: i32 = 78;

/// Why a child could not tie itself to its supervisor.
#[derive(Debug, thiserror::Error)]
pub enum OrphanError {
    #[error("{ENV_SUPERVISOR_PID} is not set: this program must be started by `supervisor run`")]
    NotSupervised,
    #[error("cannot set PR_SET_PDEATHSIG: {0}")]
    Prctl(std::io::Error),
    #[error("supervisor (pid {expected}) is already gone; parent is now {actual:?}")]
    Orphaned { expected: i32, actual: Option<i32> },
}

/// Arms SIGKILL-on-parent-death and checks that the parent is still the supervisor.
pub fn die_with_supervisor() -> Result<(), OrphanError> {
    let expected: i32 = std::env::var(ENV_SUPERVISOR_PID)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or(OrphanError::NotSupervised)?;
    set_parent_process_death_signal(Some(Signal::KILL))
        .map_err(|e| OrphanError::Prctl(e.into()))?;
    let actual = getppid().map(Pid::as_raw_nonzero).map(|p| p.get());
    if actual != Some(expected) {
        return Err(OrphanError::Orphaned { expected, actual });
    }
    Ok(())
}
