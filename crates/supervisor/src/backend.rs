//! Which memory the weights live in: `host` (sealed memfds, any Linux machine) or `cuda`
//! (VMM allocations on one GPU). Resolved once, at start, and kept for the supervisor's life:
//! changing the memory kind of a live generation would need every process restarted anyway.
//!
//! The supervisor never loads CUDA itself (a driver initialised in it would be inherited by
//! nothing, but it would cost memory, and a hung driver would hang the supervisor). So whether
//! a GPU is usable is asked of a short-lived child: `supervisor probe-gpu --device N`, which
//! prints one [`ProbeReport`] line and exits 0 (usable) or 1 (not usable).
//!
//! | asked for | probe | result |
//! |---|---|---|
//! | `host` | not run | host |
//! | `auto` | usable / not | cuda / host (logged with the reason) |
//! | `cuda` | usable / not | cuda / `supervisor run` fails, saying to use `--backend host` |
//!
//! ```
//! use forkless_supervisor::backend::{ProbeReport, ResolvedBackend};
//! let line = r#"{"usable":false,"device":0,"error":"no CUDA driver found"}"#;
//! let report: ProbeReport = serde_json::from_str(line).unwrap();
//! assert_eq!(report.into_result(), Err("no CUDA driver found".to_string()));
//! assert_eq!(ResolvedBackend::Host.to_string(), "host");
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use forkless_bus::child_env::{Backend as ChildBackend, CudaEnv};
use serde::{Deserialize, Serialize};

use crate::config::{Backend, Config, WorkerVisibility};
use crate::spawn::{ChildSpec, Spawner};

/// The longest a probe may take. `cuInit` on a GPU without the persistence daemon can take
/// seconds; a probe still running after this is taken as a driver that hangs.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The backend the supervisor runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ResolvedBackend {
    /// Sealed memfds in host memory.
    #[default]
    Host,
    /// VMM allocations on GPU `device` (`name` as the driver reports it), and on every device
    /// of `devices` when the service spreads over several (`device` is its first).
    Cuda {
        device: u32,
        name: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        devices: Vec<u32>,
    },
}

impl ResolvedBackend {
    /// The GPUs the weights live on (empty on the host).
    pub fn devices(&self) -> Vec<u32> {
        match self {
            ResolvedBackend::Host => Vec::new(),
            ResolvedBackend::Cuda { device, devices, .. } if devices.is_empty() => vec![*device],
            ResolvedBackend::Cuda { devices, .. } => devices.clone(),
        }
    }

    /// The value of `FORKLESS_BACKEND` for the children.
    pub fn env_value(&self) -> &'static str {
        match self {
            ResolvedBackend::Host => "host",
            ResolvedBackend::Cuda { .. } => "cuda",
        }
    }
}

impl std::fmt::Display for ResolvedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolvedBackend::Host => f.write_str("host"),
            ResolvedBackend::Cuda { device, name, devices } if devices.len() <= 1 => {
                write!(f, "cuda: {name} (device {device})")
            }
            ResolvedBackend::Cuda { name, devices, .. } => {
                write!(f, "cuda: {} × {name} (devices {devices:?})", devices.len())
            }
        }
    }
}

/// The backend in force for the supervisor's life, and what its children need to use it.
#[derive(Debug, Clone, Default)]
pub struct RunningBackend {
    pub resolved: ResolvedBackend,
    /// `[model] backend` as the config file said at start (a `--backend` flag aside), so a
    /// reload that changes it can be told apart from one that does not.
    pub configured: Backend,
    /// Where CUDA children cache compiled kernels (`FORKLESS_KERNEL_CACHE`); backend cuda only.
    pub kernel_cache: Option<PathBuf>,
}

impl RunningBackend {
    /// The backend the owner and every worker are told (`FORKLESS_BACKEND`, and with cuda the
    /// device, the stack limit and the kernel cache). The stack limit comes from the config in
    /// force, so a reload applies it to the processes it restarts; the device never changes.
    /// The backend a child of `role` gets: the owner the first device and the others as
    /// replicas; a worker the first device (the spawner then puts each worker on its own).
    pub fn for_children(&self, config: &Config, role: forkless_bus::Role) -> ChildBackend {
        match &self.resolved {
            ResolvedBackend::Host => ChildBackend::Host,
            ResolvedBackend::Cuda { device, .. } => ChildBackend::Cuda(CudaEnv {
                device: *device,
                stack_limit_bytes: Some(config.cuda.stack_limit_bytes),
                kernel_cache: self.kernel_cache.clone(),
                replicas: match role {
                    forkless_bus::Role::Owner => self.resolved.devices().into_iter().skip(1).collect(),
                    forkless_bus::Role::Worker => Vec::new(),
                },
                narrowed: None,
            }),
        }
    }

    /// What a reloaded config asks that cannot take effect without a restart (the backend or
    /// the GPU), as a warning to log; the running backend is kept either way.
    pub fn reload_warning(&self, fresh: &Config) -> Option<String> {
        let keep = format!(
            "keeping backend {} until the supervisor restarts (the memory kind of live weights cannot change)",
            self.resolved
        );
        if fresh.model.backend != self.configured {
            let (was, now) = (self.configured.name(), fresh.model.backend.name());
            return Some(format!("[model] backend changed from {was} to {now} in {}: {keep}", fresh.source.display()));
        }
        match &self.resolved {
            ResolvedBackend::Cuda { device, .. } if fresh.cuda.device != *device => Some(format!(
                "[cuda] device changed from {device} to {} in {}: {keep}",
                fresh.cuda.device,
                fresh.source.display()
            )),
            _ => None,
        }
    }
}

/// Why `supervisor run` cannot start with the backend it was asked for.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend cuda: no usable GPU on device {device}: {reason}{}", advice(reason))]
    NoGpu { device: u32, reason: String },
}

/// The way out, unless the reason already gives it.
fn advice(reason: &str) -> &'static str {
    if reason.contains("--backend host") {
        ""
    } else {
        ": use --backend host (or auto)"
    }
}

/// The one line `supervisor probe-gpu` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub usable: bool,
    pub device: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Compute capability as `major.minor`, e.g. `9.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_mem_bytes: Option<u64>,
    /// The driver's CUDA version, `1000 * major + 10 * minor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<i32>,
    /// How many GPUs the driver shows (for `[cuda] devices = "all"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_count: Option<u32>,
    /// Why the GPU is not usable, saying what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProbeReport {
    /// A GPU found unusable (or not found) for `reason`.
    pub fn unusable(device: u32, reason: String) -> Self {
        ProbeReport {
            usable: false,
            device,
            name: None,
            compute_capability: None,
            total_mem_bytes: None,
            driver_version: None,
            device_count: None,
            error: Some(reason),
        }
    }

    /// Probes GPU `device` from the calling process: loads the CUDA driver into it (no
    /// context), so only `supervisor probe-gpu` calls this, never the supervisor itself.
    pub fn probe_in_this_process(device: u32) -> Self {
        let probed = forkless_gpu::probe(device as usize).and_then(|info| info.require_vmm().map(|()| info));
        match probed {
            Ok(info) => ProbeReport {
                usable: true,
                device,
                compute_capability: Some(format!("{}.{}", info.compute_capability.0, info.compute_capability.1)),
                total_mem_bytes: Some(info.total_mem),
                driver_version: Some(info.driver_version),
                device_count: u32::try_from(info.device_count).ok(),
                name: Some(info.name),
                error: None,
            },
            Err(e) => ProbeReport::unusable(device, e.to_string()),
        }
    }

    /// The GPU's name, or why it cannot be used.
    pub fn into_result(self) -> Result<String, String> {
        match (self.usable, self.name) {
            (true, Some(name)) => Ok(name),
            (true, None) => Ok(format!("GPU {}", self.device)),
            (false, _) => Err(self.error.unwrap_or_else(|| "the probe gave no reason".into())),
        }
    }
}

/// Resolves `requested` (the config's `[model] backend`, or `--backend`) for `config`,
/// probing the GPU through `exe probe-gpu` where needed.
pub async fn resolve(
    requested: Backend,
    config: &Config,
    spawner: &Spawner,
    exe: &Path,
) -> Result<ResolvedBackend, BackendError> {
    if requested == Backend::Host {
        return Ok(ResolvedBackend::Host);
    }
    let probed = probe_devices(spawner, exe, config.cuda.requested_devices()).await;
    match (probed, requested) {
        (Ok((devices, name)), _) => {
            let device = devices[0];
            let devices = if devices.len() > 1 { devices } else { Vec::new() };
            Ok(ResolvedBackend::Cuda { device, name, devices })
        }
        (Err((device, reason)), Backend::Cuda) => Err(BackendError::NoGpu { device, reason }),
        (Err((_, reason)), _) => {
            tracing::info!("no usable GPU ({reason}): backend host");
            Ok(ResolvedBackend::Host)
        }
    }
}

/// Probes every requested device (in parallel; `None`: every device the driver shows) and
/// returns them with the first one's name, or the first device that is not usable and why.
async fn probe_devices(
    spawner: &Spawner,
    exe: &Path,
    requested: Option<Vec<u32>>,
) -> Result<(Vec<u32>, String), (u32, String)> {
    let devices = match requested {
        Some(devices) => devices,
        None => {
            let report = probe_report(spawner, exe, 0).await.map_err(|reason| (0, reason))?;
            let count = report.device_count.unwrap_or(1).max(1);
            (0..count).collect()
        }
    };
    let probes: Vec<_> = devices
        .iter()
        .map(|&device| {
            let (spawner, exe) = (spawner.clone(), exe.to_path_buf());
            tokio::spawn(async move { probe(&spawner, &exe, device).await })
        })
        .collect();
    let mut names = Vec::with_capacity(devices.len());
    for (&device, probe) in devices.iter().zip(probes) {
        let result = probe.await.unwrap_or_else(|e| Err(format!("the GPU probe task failed: {e}")));
        names.push(result.map_err(|reason| (device, reason))?);
    }
    Ok((devices, names.swap_remove(0)))
}

/// Runs `exe probe-gpu --device N`: the GPU's name, or why it cannot be used.
pub async fn probe(spawner: &Spawner, exe: &Path, device: u32) -> Result<String, String> {
    probe_report(spawner, exe, device).await?.into_result()
}

/// Runs `exe probe-gpu --device N` and returns its report (usable or not), or why it gave none.
async fn probe_report(spawner: &Spawner, exe: &Path, device: u32) -> Result<ProbeReport, String> {
    let mut spec = ChildSpec::new(exe.to_path_buf());
    spec.args = vec!["probe-gpu".into(), "--device".into(), device.to_string()];
    let child = spawner.spawn(spec).await.map_err(|e| format!("cannot run the GPU probe: {e}"))?;
    let pid = child.id().unwrap_or(0);
    let output = match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.map_err(|e| format!("the GPU probe failed: {e}"))?,
        Err(_) => {
            crate::groups::signal_group(pid, rustix::process::Signal::KILL);
            return Err(format!(
                "the GPU probe did not answer within {PROBE_TIMEOUT:?}: the driver hangs; check nvidia-smi"
            ));
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = stdout.lines().rev().find_map(|line| serde_json::from_str::<ProbeReport>(line).ok());
    match report {
        Some(report) => Ok(report),
        None => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(format!("the GPU probe ended with {} and no report: {}", output.status, stderr.trim()))
        }
    }
}

/// Puts a worker's CUDA settings on its `device` (multi-GPU placement; `None`: the service's one
/// device, already set), seen alone as ordinal 0 with `[cuda] worker_visible_devices = "own"`
/// (`supervisors`: the supervisor's own `CUDA_VISIBLE_DEVICES`).
pub(crate) fn place_worker(
    cuda: &mut CudaEnv,
    device: Option<u32>,
    visibility: WorkerVisibility,
    supervisors: Option<&str>,
) {
    if let Some(device) = device {
        cuda.device = device;
    }
    cuda.narrowed = match visibility {
        WorkerVisibility::All => None,
        WorkerVisibility::Own => visible_entry(supervisors, cuda.device),
    };
}

/// The `CUDA_VISIBLE_DEVICES` value that shows a worker only the service's device `device`:
/// the `device`-th entry of the supervisor's own list where it has one (an index, a UUID or a
/// MIG instance, as the operator wrote it), else `device` itself. Children inherit the
/// supervisor's `CUDA_DEVICE_ORDER`, so the entry names the GPU the owner calls `device`.
/// `None` when the list has no such entry (the worker then keeps the full view).
pub(crate) fn visible_entry(supervisors: Option<&str>, device: u32) -> Option<String> {
    match supervisors {
        None => Some(device.to_string()),
        Some(list) => {
            let entry = list.split(',').map(str::trim).nth(device as usize)?;
            (!entry.is_empty()).then(|| entry.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_round_trip() {
        let usable = ProbeReport {
            usable: true,
            device: 0,
            name: Some("NVIDIA H100".into()),
            compute_capability: Some("9.0".into()),
            total_mem_bytes: Some(80 << 30),
            driver_version: Some(13000),
            device_count: Some(1),
            error: None,
        };
        let line = serde_json::to_string(&usable).unwrap();
        assert!(!line.contains("error"), "{line}");
        let back: ProbeReport = serde_json::from_str(&line).unwrap();
        assert_eq!(back.into_result(), Ok("NVIDIA H100".into()));
        let line = serde_json::to_string(&ProbeReport::unusable(1, "no GPU".into())).unwrap();
        assert_eq!(line, r#"{"usable":false,"device":1,"error":"no GPU"}"#);
    }

    #[test]
    fn the_cuda_error_says_what_to_do_once() {
        let err = BackendError::NoGpu { device: 0, reason: "no CUDA driver found".into() }.to_string();
        assert_eq!(err, "backend cuda: no usable GPU on device 0: no CUDA driver found: use --backend host (or auto)");
        let err = BackendError::NoGpu { device: 2, reason: "no driver: install it, or use --backend host".into() };
        assert_eq!(err.to_string().matches("--backend host").count(), 1, "{err}");
    }

    fn config(extra_model: &str, extra: &str) -> Config {
        let text = format!(
            "[model]\npath = \"m\"\n{extra_model}\n[workers]\ncommand = [\"w\"]\nlisten = [\"127.0.0.1:0\"]\n{extra}"
        );
        Config::parse(&text, Path::new("/srv/config.toml")).unwrap()
    }

    #[test]
    fn children_learn_the_backend_and_cuda_settings() {
        let host = RunningBackend::default();
        assert_eq!(host.for_children(&config("", ""), forkless_bus::Role::Owner), ChildBackend::Host);
        let cuda = RunningBackend {
            resolved: ResolvedBackend::Cuda { device: 1, name: "GPU".into(), devices: vec![] },
            configured: Backend::Auto,
            kernel_cache: Some("/run/forkless-x/kernels".into()),
        };
        let expected = CudaEnv {
            device: 1,
            stack_limit_bytes: Some(64),
            kernel_cache: Some("/run/forkless-x/kernels".into()),
            replicas: vec![],
            narrowed: None,
        };
        let config = config("", "[cuda]\ndevice = 1\nstack_limit_bytes = 64\n");
        assert_eq!(cuda.for_children(&config, forkless_bus::Role::Worker), ChildBackend::Cuda(expected));
        let several = RunningBackend {
            resolved: ResolvedBackend::Cuda { device: 2, name: "GPU".into(), devices: vec![2, 0, 3] },
            ..cuda
        };
        let ChildBackend::Cuda(owner) = several.for_children(&config, forkless_bus::Role::Owner) else { panic!() };
        assert_eq!((owner.device, owner.replicas), (2, vec![0, 3]), "the owner copies the first device to the others");
        assert_eq!(several.resolved.devices(), vec![2, 0, 3]);
    }

    #[test]
    fn reloads_that_change_the_backend_or_gpu_are_warned_about() {
        let cuda = RunningBackend {
            resolved: ResolvedBackend::Cuda { device: 0, name: "GPU".into(), devices: vec![] },
            configured: Backend::Auto,
            kernel_cache: None,
        };
        assert_eq!(cuda.reload_warning(&config("", "[cuda]\nstack_limit_bytes = 128\n")), None);
        let warning = cuda.reload_warning(&config("backend = \"host\"", "")).unwrap();
        assert!(warning.contains("from auto to host") && warning.contains("keeping backend cuda"), "{warning}");
        let warning = cuda.reload_warning(&config("", "[cuda]\ndevice = 1\n")).unwrap();
        assert!(warning.contains("[cuda] device changed from 0 to 1"), "{warning}");
        let host = RunningBackend::default();
        assert_eq!(host.reload_warning(&config("", "[cuda]\ndevice = 1\n")), None, "no GPU in use");
    }

    #[test]
    fn resolved_backends_read_well_and_serialise_tagged() {
        let cuda = ResolvedBackend::Cuda { device: 0, name: "NVIDIA H100".into(), devices: vec![] };
        assert_eq!(cuda.to_string(), "cuda: NVIDIA H100 (device 0)");
        assert_eq!(cuda.env_value(), "cuda");
        assert_eq!(serde_json::to_string(&cuda).unwrap(), r#"{"kind":"cuda","device":0,"name":"NVIDIA H100"}"#);
        assert_eq!(serde_json::to_string(&ResolvedBackend::Host).unwrap(), r#"{"kind":"host"}"#);
    }

    #[test]
    fn own_visibility_narrows_each_worker_to_its_device() {
        let base = CudaEnv { device: 0, ..CudaEnv::default() };
        let placed = |device, visibility, supervisors| {
            let mut cuda = base.clone();
            place_worker(&mut cuda, device, visibility, supervisors);
            (cuda.device, cuda.narrowed.clone(), cuda.ordinal())
        };
        assert_eq!(placed(Some(1), WorkerVisibility::All, None), (1, None, None), "default: the full view");
        assert_eq!(placed(Some(1), WorkerVisibility::Own, None), (1, Some("1".into()), Some(0)));
        assert_eq!(placed(Some(1), WorkerVisibility::Own, Some("4,6")), (1, Some("6".into()), Some(0)));
        assert_eq!(placed(None, WorkerVisibility::Own, Some("5")), (0, Some("5".into()), Some(0)), "one device");
        assert_eq!(placed(Some(3), WorkerVisibility::Own, Some("4,6")), (3, None, None), "not in the list");
        // What the worker reads back: ordinal 0, still device 1, and CUDA's variable.
        let mut cuda = base.clone();
        place_worker(&mut cuda, Some(1), WorkerVisibility::Own, Some("GPU-aa,GPU-bb"));
        let env = forkless_bus::child_env::ChildEnv {
            role: forkless_bus::Role::Worker,
            index: 1,
            supervisor_pid: 1,
            bus_fd: None,
            bus_path: None,
            model: "m.safetensors".into(),
            sharing: forkless_bus::child_env::Sharing::Shared,
            backend: ChildBackend::Cuda(cuda),
            heartbeat: None,
            max_requests: None,
            http: None,
        };
        let vars = env.to_vars();
        assert!(vars.contains(&("CUDA_VISIBLE_DEVICES", "GPU-bb".into())), "{vars:?}");
        assert!(vars.contains(&("FORKLESS_CUDA_ORDINAL", "0".into())), "{vars:?}");
        assert!(vars.contains(&("FORKLESS_CUDA_DEVICE", "1".into())), "{vars:?}");
    }

    #[test]
    fn a_worker_sees_the_entry_of_its_device_in_the_supervisors_list() {
        assert_eq!(visible_entry(None, 3).as_deref(), Some("3"));
        assert_eq!(visible_entry(Some("2,3"), 1).as_deref(), Some("3"), "device 1 of the supervisor is GPU 3");
        let uuids = "GPU-8f6a1c2e-0000-0000-0000-000000000001, GPU-8f6a1c2e-0000-0000-0000-000000000002";
        assert_eq!(visible_entry(Some(uuids), 1).as_deref(), Some("GPU-8f6a1c2e-0000-0000-0000-000000000002"));
        assert_eq!(visible_entry(Some("MIG-1234"), 0).as_deref(), Some("MIG-1234"));
        assert_eq!(visible_entry(Some("0,1"), 2), None, "no such entry: keep the full view");
        assert_eq!(visible_entry(Some(""), 0), None);
    }
}
