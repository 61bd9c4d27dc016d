//! Process groups of the children, recorded in the runtime folder, so that what a child
//! started (its own children: `sh -c "sleep 777 & exec worker"`) never outlives it.
//!
//! Every child runs in a process group of its own (its pgid is its pid). While the supervisor
//! lives, a child's exit or stop ends its whole group: SIGTERM, then SIGKILL (see
//! [`crate::children`]). A SIGKILLed supervisor cannot do that, and `PR_SET_PDEATHSIG` reaches
//! only the children themselves, so each group is also recorded as a file `groups/<pgid>` in
//! the runtime folder; the next start of the same config ends the groups its dead predecessor
//! recorded ([`end_stale_groups`]).
//!
//! A recorded number may name somebody else's group by then (pids are reused), so a process is
//! signalled only if it proves it belongs to us: it is in the group, runs as our uid, and its
//! environment carries `FORKLESS_SUPERVISOR_PID=<the recording supervisor's pid>`, which the
//! supervisor gives every child and every descendant inherits. The check and the signal go
//! through one pidfd, so a pid reused between the two is never hit. A descendant that scrubbed
//! its environment, or changed its uid, is beyond this (under systemd the unit's cgroup still
//! ends it: see deploy/README.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal};

/// How long leftovers of a dead supervisor get between SIGTERM and SIGKILL.
pub const STALE_GRACE: Duration = Duration::from_secs(2);

/// The record of live children's process groups: one empty file per group.
#[derive(Debug, Clone)]
pub struct ProcessGroups {
    dir: PathBuf,
    supervisor_pid: u32,
}

impl ProcessGroups {
    /// Records into `dir` (created 0700), for the supervisor `supervisor_pid`.
    pub fn new(dir: PathBuf, supervisor_pid: u32) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        Ok(ProcessGroups { dir, supervisor_pid })
    }

    /// The supervisor whose children these are.
    pub fn supervisor_pid(&self) -> u32 {
        self.supervisor_pid
    }

    /// Records the group `pgid` (a child just started). A failure is logged, not fatal: the
    /// group still ends with its child while the supervisor lives.
    pub fn record(&self, pgid: u32) {
        if let Err(e) = std::fs::write(self.dir.join(pgid.to_string()), b"") {
            tracing::warn!("cannot record process group {pgid} in {}: {e}", self.dir.display());
        }
    }

    /// Forgets the group `pgid` (it has no member left).
    pub fn forget(&self, pgid: u32) {
        let _ = std::fs::remove_file(self.dir.join(pgid.to_string()));
    }

    /// Every recorded group.
    pub fn recorded(&self) -> Vec<u32> {
        recorded_in(&self.dir)
    }
}

fn recorded_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut groups: Vec<u32> = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    groups.sort_unstable();
    groups
}

/// Ends the groups recorded in `dir` by the dead supervisor `dead_pid` (or by this process,
/// on its way out): SIGTERM to every verified member, SIGKILL to those still there after
/// [`STALE_GRACE`]. Returns how many processes it found.
///
/// If `dead_pid` names a live process again, its pid was reused, perhaps by another supervisor
/// whose children carry the same marker: then nothing is touched (leftovers are safer than
/// killing a stranger).
pub fn end_stale_groups(dir: &Path, dead_pid: u32) -> usize {
    let groups = recorded_in(dir);
    if groups.is_empty() {
        return 0;
    }
    if dead_pid != std::process::id() && std::path::Path::new(&format!("/proc/{dead_pid}")).exists() {
        tracing::warn!(
            "supervisor pid {dead_pid} is in use again (pid reuse): leaving the process groups it recorded in {} alone",
            dir.display()
        );
        return 0;
    }
    let found: usize = groups.iter().map(|&g| signal_verified_members(g, dead_pid, Signal::TERM)).sum();
    let deadline = Instant::now() + STALE_GRACE;
    while found > 0 && Instant::now() < deadline && groups.iter().any(|&g| !verified_members(g, dead_pid).is_empty()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pgid in &groups {
        signal_verified_members(pgid, dead_pid, Signal::KILL);
    }
    found
}

/// Sends `signal` to every process of group `pgid` that proves it descends from supervisor
/// `supervisor_pid` (see the module docs); returns how many it reached.
pub fn signal_verified_members(pgid: u32, supervisor_pid: u32, signal: Signal) -> usize {
    verified_members(pgid, supervisor_pid)
        .into_iter()
        .filter(|(pid, pidfd)| match rustix::process::pidfd_send_signal(pidfd, signal) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("cannot signal pid {pid} of group {pgid}: {e}");
                false
            }
        })
        .count()
}

/// Members of group `pgid` that pass the check, each with a pidfd opened before the check.
fn verified_members(pgid: u32, supervisor_pid: u32) -> Vec<(u32, std::os::fd::OwnedFd)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let uid = rustix::process::getuid().as_raw();
    let marker = format!("{}={supervisor_pid}", forkless_bus::ENV_SUPERVISOR_PID);
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| process_group_of(pid) == Some(pgid))
        .filter_map(|pid| {
            let raw = Pid::from_raw(i32::try_from(pid).ok()?)?;
            let pidfd = rustix::process::pidfd_open(raw, PidfdFlags::empty()).ok()?;
            // Checked after the pidfd is open: whatever /proc shows now is the process the
            // pidfd holds, or it has died (and the signal then reaches nobody).
            let belongs = process_group_of(pid) == Some(pgid) && owner_of(pid) == Some(uid) && has_env(pid, &marker);
            belongs.then_some((pid, pidfd))
        })
        .collect()
}

/// The process group of `pid`, from `/proc/PID/stat` (the fields after the command name:
/// state, ppid, pgrp).
fn process_group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, fields) = stat.rsplit_once(") ")?;
    fields.split_whitespace().nth(2)?.parse().ok()
}

fn owner_of(pid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}")).ok().map(|m| m.uid())
}

fn has_env(pid: u32, entry: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|environ| environ.split(|&b| b == 0).any(|e| e == entry.as_bytes()))
}

/// Signals the process group `pid` leads; false if it has no member left. (A group keeps its
/// number reserved while it has members, so this cannot hit somebody else's group.)
pub(crate) fn signal_group(pid: u32, signal: rustix::process::Signal) -> bool {
    match i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        Some(pgid) => rustix::process::kill_process_group(pgid, signal).is_ok(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process group of our own, whose member carries (or not) the marker of `supervisor`.
    fn spawn_group(supervisor: Option<u32>) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new("sleep");
        command.arg("600").process_group(0).env_remove(forkless_bus::ENV_SUPERVISOR_PID);
        if let Some(pid) = supervisor {
            command.env(forkless_bus::ENV_SUPERVISOR_PID, pid.to_string());
        }
        command.spawn().unwrap()
    }

    #[test]
    fn only_members_that_prove_they_are_ours_are_signalled() {
        let dead_supervisor = 999_999_999;
        let mut ours = spawn_group(Some(dead_supervisor));
        let mut stranger = spawn_group(None);
        let mut other_supervisors = spawn_group(Some(dead_supervisor - 1));
        let dir = tempfile::tempdir().unwrap();
        let groups = ProcessGroups::new(dir.path().join("groups"), dead_supervisor).unwrap();
        for child in [&ours, &stranger, &other_supervisors] {
            groups.record(child.id());
        }
        assert_eq!(end_stale_groups(&dir.path().join("groups"), dead_supervisor), 1);
        assert!(ours.wait().unwrap().code().is_none(), "ours was killed by a signal");
        assert!(stranger.try_wait().unwrap().is_none(), "a group without our marker is never touched");
        assert!(other_supervisors.try_wait().unwrap().is_none(), "nor one of another supervisor");
        for child in [&mut stranger, &mut other_supervisors] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    #[test]
    fn nothing_is_touched_when_the_dead_supervisors_pid_is_in_use_again() {
        let mut reused = spawn_group(None);
        let mut marked = spawn_group(Some(reused.id()));
        let dir = tempfile::tempdir().unwrap();
        let groups = ProcessGroups::new(dir.path().join("groups"), reused.id()).unwrap();
        groups.record(marked.id());
        assert_eq!(end_stale_groups(&dir.path().join("groups"), reused.id()), 0);
        assert!(marked.try_wait().unwrap().is_none(), "a process of a live supervisor was killed");
        for child in [&mut reused, &mut marked] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

#[cfg(test)]
mod module_example {
    /// What this module's documentation once showed as an example (the module is private now).
    #[test]
    fn the_module_in_a_few_lines() {
        let dir = tempfile::tempdir().unwrap();
        let groups = crate::groups::ProcessGroups::new(dir.path().join("groups"), 4242).unwrap();
        groups.record(31337);
        assert_eq!(groups.recorded(), vec![31337]);
        groups.forget(31337);
        assert!(groups.recorded().is_empty());
    }
}
