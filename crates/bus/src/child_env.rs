//! What a child inherits from the supervisor, and nothing more.
//!
//! **Environment.** One typed contract, [`ChildEnv`]: the supervisor builds it and turns it
//! into variables ([`ChildEnv::to_vars`]); the owner and workers read it back
//! ([`ChildEnv::from_env`]). Nothing else parses `FORKLESS_*`. The supervisor removes every
//! `FORKLESS_*` variable of its own environment from its children, so only what it sets
//! reaches them (a `FORKLESS_MAX_REQUESTS=1` in the operator's shell would otherwise recycle
//! every worker after each request).
//!
//! | variable | field | set |
//! |---|---|---|
//! | `FORKLESS_ROLE` | [`ChildEnv::role`] | always: `owner` or `worker` |
//! | `FORKLESS_INDEX` | [`ChildEnv::index`] | always |
//! | `FORKLESS_SUPERVISOR_PID` | [`ChildEnv::supervisor_pid`] | always |
//! | `FORKLESS_BUS_FD` | [`ChildEnv::bus_fd`] | with an inherited bus socket |
//! | `FORKLESS_BUS` | [`ChildEnv::bus_path`] | the path-based bus socket |
//! | `FORKLESS_MODEL` | [`ChildEnv::model`] | always |
//! | `FORKLESS_SHARING` | [`ChildEnv::sharing`] | always: `shared` or `none` |
//! | `FORKLESS_BACKEND` | [`ChildEnv::backend`] | always: `host` or `cuda` |
//! | `FORKLESS_CUDA_DEVICE`, `FORKLESS_CUDA_STACK_BYTES`, `FORKLESS_KERNEL_CACHE` | [`CudaEnv`] | backend cuda (a worker: its own device) |
//! | `FORKLESS_CUDA_REPLICAS` | [`CudaEnv::replicas`] | the owner on several GPUs: the other devices, e.g. `1,2,3` |
//! | `FORKLESS_CUDA_ORDINAL`, `CUDA_VISIBLE_DEVICES` | [`CudaEnv::narrowed`] | workers with `[cuda] worker_visible_devices = "own"`: `0`, and their one GPU |
//! | `FORKLESS_HTTP` | [`ChildEnv::http`] | workers: `[workers.http]` (parsed by the worker SDK) |
//! | `FORKLESS_HEARTBEAT_MS` | [`ChildEnv::heartbeat`] | workers with a hang timeout |
//! | `FORKLESS_MAX_REQUESTS` | [`ChildEnv::max_requests`] | workers with `max_requests` |
//!
//! **Descriptors.** A child gets exactly fds 0–2, its listeners (3.., `LISTEN_FDS`) and its bus
//! socket. Everything else is close-on-exec: what the supervisor opens itself (Rust opens
//! everything so), and what it inherited from whoever started it, which
//! [`mark_inherited_fds_cloexec`] marks first thing in `main` (`exec 9<secret` in the shell that
//! started the supervisor would otherwise reach every owner and worker).
//!
//! ```
//! use forkless_bus::child_env::{Backend, ChildEnv, Sharing};
//! use forkless_bus::Role;
//! let env = ChildEnv {
//!     role: Role::Worker,
//!     index: 3,
//!     supervisor_pid: 4242,
//!     bus_fd: Some(4),
//!     bus_path: None,
//!     model: "/srv/model.safetensors".into(),
//!     sharing: Sharing::Shared,
//!     backend: Backend::Host,
//!     heartbeat: Some(std::time::Duration::from_millis(250)),
//!     max_requests: None,
//!     http: None,
//! };
//! let vars: std::collections::HashMap<_, _> = env.to_vars().into_iter().collect();
//! assert_eq!(vars["FORKLESS_INDEX"], "3");
//! let back = ChildEnv::from_vars(|name| vars.get(name).cloned()).unwrap();
//! assert_eq!(back, env);
//! ```

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use crate::wire::Role;
use crate::{
    ENV_BACKEND, ENV_BUS, ENV_BUS_FD, ENV_CUDA_DEVICE, ENV_CUDA_ORDINAL, ENV_CUDA_REPLICAS, ENV_CUDA_STACK_BYTES,
    ENV_CUDA_VISIBLE_DEVICES, ENV_HEARTBEAT_MS, ENV_HTTP, ENV_INDEX, ENV_KERNEL_CACHE, ENV_MAX_REQUESTS, ENV_MODEL,
    ENV_ROLE, ENV_SHARING, ENV_SUPERVISOR_PID,
};

/// Prefix of every variable of the contract; the supervisor strips its own from children.
pub const PREFIX: &str = "FORKLESS_";

/// Everything the supervisor tells a child through its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildEnv {
    pub role: Role,
    /// The slot's index (workers 0..N-1; the owner 0).
    pub index: u32,
    /// The supervisor's pid: the child checks it is still its parent.
    pub supervisor_pid: u32,
    /// The inherited, already-connected bus socket (after the listeners).
    pub bus_fd: Option<RawFd>,
    /// The path-based bus socket, for a child without an inherited one.
    pub bus_path: Option<PathBuf>,
    /// The weights file (`[model] path`).
    pub model: PathBuf,
    pub sharing: Sharing,
    pub backend: Backend,
    /// How often a ready worker sends a heartbeat; `None`: never (no hang timeout).
    pub heartbeat: Option<Duration>,
    /// Requests after which a worker drains and exits 0 to be replaced; `None`: never.
    pub max_requests: Option<u64>,
    /// A worker's HTTP limits (`[workers.http]`), encoded as the worker SDK's
    /// `HttpLimits::to_env_value` writes them and parsed there.
    pub http: Option<String>,
}

/// How workers get their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// From the owner's arena, mapped read-only.
    #[default]
    Shared,
    /// Each worker loads its own copy (the baseline).
    None,
}

/// Which memory holds the weights.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Host,
    Cuda(CudaEnv),
}

/// The `[cuda]` settings every CUDA child uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CudaEnv {
    pub device: u32,
    /// Per-thread stack limit of the CUDA context (`cuCtxSetLimit(CU_LIMIT_STACK_SIZE)`).
    pub stack_limit_bytes: Option<u64>,
    /// A private folder for compiled kernels.
    pub kernel_cache: Option<PathBuf>,
    /// The owner of a generation on several GPUs: the devices it copies `device`'s arena to.
    pub replicas: Vec<u32>,
    /// A worker that sees only its own GPU: the `CUDA_VISIBLE_DEVICES` entry that names
    /// `device` (an index or a UUID, as the supervisor's own list gave it). The worker opens
    /// it as ordinal 0 and still calls it `device` in manifests and status.
    pub narrowed: Option<String>,
}

impl CudaEnv {
    /// The ordinal that opens `device` in this process: 0 where the view was narrowed to it.
    pub fn ordinal(&self) -> Option<u32> {
        self.narrowed.as_ref().map(|_| 0)
    }
}

/// Why a child's environment is not what `supervisor run` gives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChildEnvError {
    #[error("{0} is not set: this program must be started by `supervisor run`")]
    Missing(&'static str),
    #[error("{name}={value:?} is not valid: {expected} (it is set by `supervisor run`)")]
    Invalid { name: &'static str, value: String, expected: &'static str },
}

impl ChildEnv {
    /// Reads the contract from this process's environment.
    pub fn from_env() -> Result<Self, ChildEnvError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the contract from any source of variables (`var(name)`).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ChildEnvError> {
        let vars = Vars(&var);
        let role = match vars.required(ENV_ROLE)?.as_str() {
            "owner" => Role::Owner,
            "worker" => Role::Worker,
            other => return Err(invalid(ENV_ROLE, other, "owner or worker")),
        };
        Ok(ChildEnv {
            role,
            index: vars.number(ENV_INDEX)?.ok_or(ChildEnvError::Missing(ENV_INDEX))?,
            supervisor_pid: vars.positive(ENV_SUPERVISOR_PID)?.ok_or(ChildEnvError::Missing(ENV_SUPERVISOR_PID))?,
            bus_fd: bus_fd(&vars)?,
            bus_path: var(ENV_BUS).map(PathBuf::from),
            model: PathBuf::from(vars.required(ENV_MODEL)?),
            sharing: sharing(&vars)?,
            backend: backend(&vars)?,
            heartbeat: vars.positive(ENV_HEARTBEAT_MS)?.map(Duration::from_millis),
            max_requests: vars.positive(ENV_MAX_REQUESTS)?,
            http: var(ENV_HTTP),
        })
    }

    /// The variables that carry this contract, ready for `Command::envs`.
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        let role = match self.role {
            Role::Owner => "owner",
            Role::Worker => "worker",
        };
        let sharing = match self.sharing {
            Sharing::Shared => "shared",
            Sharing::None => "none",
        };
        let mut vars = vec![
            (ENV_ROLE, role.to_string()),
            (ENV_INDEX, self.index.to_string()),
            (ENV_SUPERVISOR_PID, self.supervisor_pid.to_string()),
            (ENV_MODEL, self.model.display().to_string()),
            (ENV_SHARING, sharing.to_string()),
        ];
        vars.extend(self.bus_fd.map(|fd| (ENV_BUS_FD, fd.to_string())));
        vars.extend(self.bus_path.as_ref().map(|p| (ENV_BUS, p.display().to_string())));
        vars.extend(self.heartbeat.map(|h| (ENV_HEARTBEAT_MS, h.as_millis().max(1).to_string())));
        vars.extend(self.max_requests.map(|n| (ENV_MAX_REQUESTS, n.to_string())));
        vars.extend(self.http.as_ref().map(|h| (ENV_HTTP, h.clone())));
        match &self.backend {
            Backend::Host => vars.push((ENV_BACKEND, "host".into())),
            Backend::Cuda(cuda) => {
                vars.push((ENV_BACKEND, "cuda".into()));
                vars.push((ENV_CUDA_DEVICE, cuda.device.to_string()));
                vars.extend(cuda.stack_limit_bytes.map(|b| (ENV_CUDA_STACK_BYTES, b.to_string())));
                vars.extend(cuda.kernel_cache.as_ref().map(|p| (ENV_KERNEL_CACHE, p.display().to_string())));
                if !cuda.replicas.is_empty() {
                    let list: Vec<String> = cuda.replicas.iter().map(ToString::to_string).collect();
                    vars.push((ENV_CUDA_REPLICAS, list.join(",")));
                }
                if let Some(visible) = &cuda.narrowed {
                    vars.push((ENV_CUDA_ORDINAL, "0".into()));
                    vars.push((ENV_CUDA_VISIBLE_DEVICES, visible.clone()));
                }
            }
        }
        vars
    }

    /// The CUDA settings, with backend cuda.
    pub fn cuda(&self) -> Option<&CudaEnv> {
        match &self.backend {
            Backend::Cuda(cuda) => Some(cuda),
            Backend::Host => None,
        }
    }
}

/// A variable source with typed getters.
struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    fn required(&self, name: &'static str) -> Result<String, ChildEnvError> {
        (self.0)(name).ok_or(ChildEnvError::Missing(name))
    }

    fn number<T: std::str::FromStr>(&self, name: &'static str) -> Result<Option<T>, ChildEnvError> {
        (self.0)(name).map(|v| v.parse().map_err(|_| invalid(name, &v, "expected a non-negative integer"))).transpose()
    }

    fn positive<T: std::str::FromStr + Default + PartialEq>(
        &self,
        name: &'static str,
    ) -> Result<Option<T>, ChildEnvError> {
        match self.number::<T>(name)? {
            Some(n) if n == T::default() => Err(invalid(name, "0", "expected a positive integer")),
            other => Ok(other),
        }
    }
}

fn invalid(name: &'static str, value: &str, expected: &'static str) -> ChildEnvError {
    ChildEnvError::Invalid { name, value: value.into(), expected }
}

fn bus_fd(vars: &Vars<'_>) -> Result<Option<RawFd>, ChildEnvError> {
    match vars.number::<RawFd>(ENV_BUS_FD)? {
        Some(fd) if fd <= 2 => Err(invalid(ENV_BUS_FD, &fd.to_string(), "expected a descriptor number above 2")),
        other => Ok(other),
    }
}

fn sharing(vars: &Vars<'_>) -> Result<Sharing, ChildEnvError> {
    match (vars.0)(ENV_SHARING).as_deref() {
        None | Some("shared") => Ok(Sharing::Shared),
        Some("none") => Ok(Sharing::None),
        Some(other) => Err(invalid(ENV_SHARING, other, "expected shared or none")),
    }
}

fn backend(vars: &Vars<'_>) -> Result<Backend, ChildEnvError> {
    match (vars.0)(ENV_BACKEND).as_deref() {
        None | Some("host") => Ok(Backend::Host),
        Some("cuda") => Ok(Backend::Cuda(CudaEnv {
            device: vars.number(ENV_CUDA_DEVICE)?.unwrap_or(0),
            stack_limit_bytes: vars.number(ENV_CUDA_STACK_BYTES)?,
            kernel_cache: (vars.0)(ENV_KERNEL_CACHE).map(PathBuf::from),
            replicas: devices(vars, ENV_CUDA_REPLICAS)?,
            narrowed: narrowed(vars)?,
        })),
        Some(other) => Err(invalid(ENV_BACKEND, other, "expected host or cuda")),
    }
}

/// `FORKLESS_CUDA_ORDINAL=0` marks a view the supervisor narrowed; `CUDA_VISIBLE_DEVICES` alone
/// may come from the operator's shell and says nothing about the service's numbering.
fn narrowed(vars: &Vars<'_>) -> Result<Option<String>, ChildEnvError> {
    match (vars.0)(ENV_CUDA_ORDINAL).as_deref() {
        None => Ok(None),
        Some("0") => match (vars.0)(ENV_CUDA_VISIBLE_DEVICES) {
            Some(visible) if !visible.is_empty() && !visible.contains(',') => Ok(Some(visible)),
            other => Err(invalid(ENV_CUDA_VISIBLE_DEVICES, &other.unwrap_or_default(), "expected one GPU")),
        },
        Some(other) => Err(invalid(ENV_CUDA_ORDINAL, other, "expected 0")),
    }
}

/// A comma-separated list of device numbers (unset: none).
fn devices(vars: &Vars<'_>, name: &'static str) -> Result<Vec<u32>, ChildEnvError> {
    let Some(list) = (vars.0)(name) else { return Ok(Vec::new()) };
    list.split(',')
        .map(|d| d.trim().parse().map_err(|_| invalid(name, &list, "expected device numbers: 1,2,3")))
        .collect()
}

/// Marks every descriptor above 2 that this process holds close-on-exec, and returns how many
/// it marked. The supervisor calls it first thing in `main`, before any thread exists: what it
/// inherited from whoever started it must not reach its children.
pub fn mark_inherited_fds_cloexec() -> std::io::Result<usize> {
    let numbers: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    let mut marked = 0;
    for fd in numbers {
        // SAFETY: the borrow lasts for these two fcntl calls only. The number was listed as
        // open a moment ago (the directory's own fd, closed since, fails F_GETFD harmlessly),
        // and no other thread exists yet that could close it or reuse the number meanwhile.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let Ok(flags) = rustix::io::fcntl_getfd(borrowed) else { continue };
        if !flags.contains(rustix::io::FdFlags::CLOEXEC) {
            rustix::io::fcntl_setfd(borrowed, flags | rustix::io::FdFlags::CLOEXEC)?;
            marked += 1;
        }
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn path() -> impl Strategy<Value = PathBuf> {
        "/[a-zA-Z0-9 ._-]{1,40}".prop_map(PathBuf::from)
    }

    fn cuda() -> impl Strategy<Value = Backend> {
        (
            any::<u32>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(path()),
            proptest::collection::vec(any::<u32>(), 0..4),
            proptest::option::of("[0-9]{1,2}|GPU-[0-9a-f-]{8,36}|MIG-[0-9a-f-]{8,36}"),
        )
            .prop_map(|(device, stack_limit_bytes, kernel_cache, replicas, narrowed)| {
                Backend::Cuda(CudaEnv { device, stack_limit_bytes, kernel_cache, replicas, narrowed })
            })
    }

    fn child_env() -> impl Strategy<Value = ChildEnv> {
        (
            (any::<bool>(), any::<u32>(), 1..=u32::MAX, proptest::option::of(3..=RawFd::MAX)),
            (proptest::option::of(path()), path(), any::<bool>(), prop_oneof![Just(Backend::Host), cuda()]),
            (proptest::option::of(1..=u64::from(u32::MAX)), proptest::option::of(1..=u64::MAX)),
        )
            .prop_map(
                |((owner, index, supervisor_pid, bus_fd), (bus_path, model, none, backend), (ms, max))| ChildEnv {
                    role: if owner { Role::Owner } else { Role::Worker },
                    index,
                    supervisor_pid,
                    bus_fd,
                    bus_path,
                    model,
                    sharing: if none { Sharing::None } else { Sharing::Shared },
                    backend,
                    heartbeat: ms.map(Duration::from_millis),
                    max_requests: max,
                    http: None,
                },
            )
    }

    proptest! {
        /// Whatever the supervisor sets, a child reads back unchanged.
        #[test]
        fn round_trips_through_variables(env in child_env()) {
            let vars: HashMap<&str, String> = env.to_vars().into_iter().collect();
            // Ours, and CUDA's own variable only where the supervisor narrowed the view.
            let narrowed = vars.contains_key(ENV_CUDA_ORDINAL);
            prop_assert!(vars.keys().all(|k| k.starts_with(PREFIX) || (narrowed && *k == ENV_CUDA_VISIBLE_DEVICES)));
            prop_assert_eq!(ChildEnv::from_vars(|name| vars.get(name).cloned()).unwrap(), env);
        }
    }

    fn minimal() -> HashMap<&'static str, String> {
        [(ENV_ROLE, "worker"), (ENV_INDEX, "0"), (ENV_SUPERVISOR_PID, "42"), (ENV_MODEL, "/m")]
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect()
    }

    #[test]
    fn unset_optional_variables_take_the_defaults() {
        let vars = minimal();
        let env = ChildEnv::from_vars(|name| vars.get(name).cloned()).unwrap();
        assert_eq!(
            (env.sharing, env.backend, env.heartbeat, env.max_requests),
            (Sharing::Shared, Backend::Host, None, None)
        );
        let mut vars = minimal();
        vars.insert(ENV_BACKEND, "cuda".into());
        let env = ChildEnv::from_vars(|name| vars.get(name).cloned()).unwrap();
        assert_eq!(
            env.cuda(),
            Some(&CudaEnv {
                device: 0,
                stack_limit_bytes: None,
                kernel_cache: None,
                replicas: Vec::new(),
                narrowed: None
            })
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            (ENV_ROLE, "boss"),
            (ENV_INDEX, "-1"),
            (ENV_SUPERVISOR_PID, "0"),
            (ENV_BUS_FD, "1"),
            (ENV_SHARING, "some"),
            (ENV_BACKEND, "gpu"),
            (ENV_HEARTBEAT_MS, "0"),
            (ENV_MAX_REQUESTS, "lots"),
        ] {
            let mut vars = minimal();
            vars.insert(name, value.into());
            vars.insert(ENV_BACKEND, vars.get(ENV_BACKEND).cloned().unwrap_or_else(|| "host".into()));
            let err = ChildEnv::from_vars(|n| vars.get(n).cloned()).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("supervisor run"), "{err}");
        }
        let mut vars = minimal();
        vars.remove(ENV_MODEL);
        let err = ChildEnv::from_vars(|n| vars.get(n).cloned()).unwrap_err();
        assert_eq!(err, ChildEnvError::Missing(ENV_MODEL));
    }

    #[test]
    fn a_narrowed_view_names_one_gpu_and_an_inherited_one_is_ignored() {
        let cuda = |pairs: &[(&'static str, &str)]| {
            let mut vars = minimal();
            vars.insert(ENV_BACKEND, "cuda".into());
            vars.insert(ENV_CUDA_DEVICE, "1".into());
            for (k, v) in pairs {
                vars.insert(k, v.to_string());
            }
            ChildEnv::from_vars(|n| vars.get(n).cloned()).map(|env| env.cuda().cloned().unwrap())
        };
        // The operator's own CUDA_VISIBLE_DEVICES says nothing about the service's numbering.
        assert_eq!(cuda(&[(ENV_CUDA_VISIBLE_DEVICES, "3,4")]).unwrap().ordinal(), None);
        let narrowed = cuda(&[(ENV_CUDA_ORDINAL, "0"), (ENV_CUDA_VISIBLE_DEVICES, "GPU-ab")]).unwrap();
        assert_eq!((narrowed.device, narrowed.ordinal(), narrowed.narrowed.as_deref()), (1, Some(0), Some("GPU-ab")));
        for (bad, name) in [
            (&[(ENV_CUDA_ORDINAL, "1"), (ENV_CUDA_VISIBLE_DEVICES, "2")][..], ENV_CUDA_ORDINAL),
            (&[(ENV_CUDA_ORDINAL, "0")][..], ENV_CUDA_VISIBLE_DEVICES),
            (&[(ENV_CUDA_ORDINAL, "0"), (ENV_CUDA_VISIBLE_DEVICES, "2,3")][..], ENV_CUDA_VISIBLE_DEVICES),
        ] {
            let err = cuda(bad).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    const CHILD_ENV: &str = "FORKLESS_TEST_MARK_CLOEXEC";

    /// Runs only inside the child started by `inherited_descriptors_become_close_on_exec`,
    /// where no other test runs threads that open and close descriptors meanwhile.
    #[test]
    #[ignore = "helper: run by inherited_descriptors_become_close_on_exec in a child process"]
    fn child_marks_its_descriptors() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&file);
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()).unwrap();
        assert!(mark_inherited_fds_cloexec().unwrap() >= 1);
        assert!(rustix::io::fcntl_getfd(fd).unwrap().contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn inherited_descriptors_become_close_on_exec() {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_env::tests::child_marks_its_descriptors", "--ignored", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success() && text.contains("1 passed"), "{text}");
    }
}
