//! `config.toml`: one [`Config`] struct, unknown keys rejected, relative paths resolved
//! against the config file's folder, every error naming the file and the key.
//!
//! ```
//! let text = r#"
//! [model]
//! path = "weights.safetensors"
//! [workers]
//! command = ["linear-worker"]
//! count = 2
//! listen = ["127.0.0.1:0"]
//! "#;
//! let config = forkless_supervisor::config::Config::parse(text, "/srv/demo/config.toml".as_ref()).unwrap();
//! assert_eq!(config.model.path, std::path::Path::new("/srv/demo/weights.safetensors"));
//! assert_eq!(config.workers.count, 2);
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}{}: `{key}` {problem}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid { path: PathBuf, key: &'static str, line: Option<usize>, problem: String },
}

/// The whole configuration of one supervisor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub supervisor: SupervisorConfig,
    pub model: ModelConfig,
    pub workers: WorkersConfig,
    #[serde(default)]
    pub restart: RestartConfig,
    #[serde(default)]
    pub cuda: CudaConfig,
    #[serde(default)]
    pub lane: LaneConfig,
    /// How the chaos harness checks this service's answers (`chaos run`, docs/CHAOS.md). The
    /// supervisor keeps it without reading it; `forkless-chaos` parses it.
    #[serde(default)]
    pub check: Option<toml::Table>,
    /// The file this was read from (not a TOML key).
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// Private (0700) folder for the bus socket; default `$XDG_RUNTIME_DIR` or the temp dir.
    pub runtime_dir: Option<PathBuf>,
    /// Seconds a stopping child gets between SIGTERM and SIGKILL.
    pub graceful_timeout_s: f64,
    /// Address of the Prometheus `/metrics`, `/livez` and `/readyz` endpoints; none if unset.
    pub metrics_listen: Option<String>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig { runtime_dir: None, graceful_timeout_s: 30.0, metrics_listen: None }
    }
}

/// How workers get their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// One owner loads the weights once; every worker maps the same arena read-only.
    #[default]
    Shared,
    /// No owner; every worker loads its own private copy (the "no --preload" baseline).
    None,
}

/// Which memory holds the weights (see [`crate::backend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `cuda` where `[cuda] device` is a usable GPU, else `host`; decided once, at start.
    #[default]
    Auto,
    /// Sealed memfds in host memory: runs on any Linux machine.
    Host,
    /// VMM allocations on `[cuda] device`; `supervisor run` fails if that GPU is not usable.
    Cuda,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Host => "host",
            Backend::Cuda => "cuda",
        }
    }
}

/// The driver's default per-thread stack limit is 1024 B, which costs ~520 MiB per context
/// on an H100; 64 B costs ~270 MiB. Small is safe: the driver raises the limit for a kernel
/// launch that needs more (and keeps it raised), so it only ever costs what kernels use.
pub const DEFAULT_CUDA_STACK_BYTES: u64 = 64;
/// Largest `stack_limit_bytes` accepted (a typo guard: 1 MiB per thread would not fit).
pub const MAX_CUDA_STACK_BYTES: u64 = 64 * 1024;

/// `[cuda]`: used when the backend is `cuda` (or `auto` finds a GPU).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CudaConfig {
    /// The GPU the arena lives on; the owner and every worker use it (see `devices` for more).
    pub device: u32,
    /// Every GPU of the node the service uses: `[0, 1, …]` or `"all"`. One arena per device in
    /// each generation (the file is read once, the other devices get device-to-device copies),
    /// and workers spread over the devices in turn (worker i on the i-th device, mod n).
    pub devices: Option<DeviceSet>,
    /// Workers per device: `[workers] count` becomes this × the number of devices.
    pub workers_per_device: Option<u32>,
    /// What happens when one device keeps failing (its workers exceed the restart intensity,
    /// e.g. its arena cannot be imported): `stop` the service (default), or `degrade`: stop
    /// that device's workers, report it, and keep serving on the others.
    pub on_device_failure: DeviceFailure,
    /// Which GPUs a worker sees: `all` (default), or `own`, where the supervisor sets each
    /// worker's `CUDA_VISIBLE_DEVICES` to its one device, so its `cuInit` and context creation
    /// touch one GPU instead of all of them (faster cold starts with several devices).
    pub worker_visible_devices: WorkerVisibility,
    /// Per-thread stack limit (`CU_LIMIT_STACK_SIZE`) of every CUDA context forkless starts:
    /// the driver reserves it for every thread the GPU can hold (1024 B: ~250 MiB of a
    /// context's ~520 MiB on an H100).
    pub stack_limit_bytes: u64,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            device: 0,
            devices: None,
            workers_per_device: None,
            on_device_failure: DeviceFailure::Stop,
            worker_visible_devices: WorkerVisibility::All,
            stack_limit_bytes: DEFAULT_CUDA_STACK_BYTES,
        }
    }
}

/// `[cuda] devices`: a list of device numbers, or `"all"` (every GPU the driver shows).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum DeviceSet {
    List(Vec<u32>),
    Named(String),
}

/// `[cuda] on_device_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceFailure {
    /// A device whose workers keep failing stops the service, like any other crash loop.
    #[default]
    Stop,
    /// Its workers are stopped and it is reported; the other devices keep serving.
    Degrade,
}

/// `[cuda] worker_visible_devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WorkerVisibility {
    /// Workers inherit the supervisor's view of the GPUs and open their device by its number.
    #[default]
    All,
    /// Each worker sees only its own device (as ordinal 0); torch in a Python worker sees
    /// `cuda:0`. Owners always see every device: they copy between them.
    Own,
}

/// Most GPUs one service spreads over (one arena per device travels as one fd each).
pub const MAX_DEVICES: usize = forkless_bus::manifest::MAX_ARENAS;

impl CudaConfig {
    /// The devices asked for: an explicit list, `None` for "all" (the probe decides), or
    /// `device` alone.
    pub fn requested_devices(&self) -> Option<Vec<u32>> {
        match &self.devices {
            Some(DeviceSet::List(list)) => Some(list.clone()),
            Some(DeviceSet::Named(_)) => None,
            None => Some(vec![self.device]),
        }
    }
}

/// `[lane]`: one batch lane per generation, through which the requests of every worker join
/// one pass over the weights (see `forkless_bus::lane` and docs/LANE.md). Off by default: the
/// service decides how a batch is computed, so it must be written to use the lane.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LaneConfig {
    pub enabled: bool,
    /// At most this many requests per pass.
    pub max_batch: u32,
    /// A pass that is not full waits up to this long after its oldest request (µs).
    pub max_wait_us: u64,
    /// A pass that is not full also waits up to this long after the previous pass ended, for
    /// as many requests as it carried to come back (µs; 0, the default: off). For closed-loop
    /// clients, which otherwise split into two cohorts of half a batch (docs/LANE.md).
    pub linger_us: u64,
    /// Requests in flight at once across all workers (queued, running, being answered).
    pub slots: u32,
    /// Largest input of one request, in bytes.
    pub input_bytes: u32,
    /// Largest output of one request, in bytes.
    pub output_bytes: u32,
}

impl Default for LaneConfig {
    fn default() -> Self {
        LaneConfig {
            enabled: false,
            max_batch: 32,
            max_wait_us: 100,
            linger_us: 0,
            slots: 256,
            input_bytes: 64 << 10,
            output_bytes: 4 << 10,
        }
    }
}

impl LaneConfig {
    /// The lane's layout, when it is on (room for as many processes as a lane takes: workers
    /// come and go, and their replacements overlap them).
    pub fn layout(&self) -> Option<forkless_bus::lane::LaneLayout> {
        self.enabled.then_some(forkless_bus::lane::LaneLayout {
            slots: self.slots,
            input_capacity: self.input_bytes,
            output_capacity: self.output_bytes,
            processes: forkless_bus::lane::MAX_PROCESSES,
        })
    }

    /// What the workers' pass runners are told, when it is on.
    pub fn settings(&self) -> Option<forkless_bus::wire::LaneSettings> {
        self.enabled.then_some(forkless_bus::wire::LaneSettings {
            max_batch: self.max_batch,
            max_wait_us: self.max_wait_us,
            linger_us: self.linger_us,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The safetensors file.
    pub path: PathBuf,
    #[serde(default)]
    pub sharing: Sharing,
    /// Command run (once, before anything else) when `path` does not exist; it must create
    /// the file, whose path it finds in `FORKLESS_MODEL`.
    #[serde(default)]
    pub make_if_missing: Option<Vec<String>>,
    /// `auto` (default), `host` or `cuda`; `supervisor run --backend` overrides it.
    #[serde(default)]
    pub backend: Backend,
    /// A hot swap's load (`reload-model`) that takes longer than this fails with that reason,
    /// and the stuck owner is replaced (it re-adopts the live generation).
    #[serde(default = "default_load_timeout")]
    pub load_timeout_s: f64,
}

fn default_load_timeout() -> f64 {
    300.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// Program and arguments. A bare program name is looked up beside the `supervisor`
    /// executable first, then in `PATH`; a relative path is relative to the config file.
    pub command: Vec<String>,
    #[serde(default = "default_count")]
    pub count: u32,
    /// Addresses the supervisor binds and hands to every worker (fds 3.., `LISTEN_FDS`).
    pub listen: Vec<String>,
    #[serde(default = "default_backlog")]
    pub backlog: i32,
    /// Extra environment for workers.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A worker silent (no heartbeat) this long is killed and replaced; 0 turns it off
    /// (gunicorn's `--timeout`).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Seconds a child (worker or owner) may take to become ready before it is killed and
    /// counted as a failed start.
    #[serde(default = "default_start_timeout")]
    pub start_timeout_s: f64,
    /// Recycle a worker after it served this many requests (plus up to `max_requests_jitter`,
    /// drawn per worker, so they do not all recycle at once); 0 turns it off.
    #[serde(default)]
    pub max_requests: u64,
    #[serde(default)]
    pub max_requests_jitter: u64,
    /// HTTP limits of workers that serve with `forkless_worker::serve`.
    #[serde(default)]
    pub http: HttpConfig,
}

/// `[workers.http]`: limits against slow, idle and oversized clients, passed to workers in
/// `FORKLESS_HTTP` (see `forkless_worker::http::HttpLimits`, which says why each default).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// From accept (or a request's first byte) to the end of its headers: cuts slowloris.
    pub header_timeout_s: f64,
    /// From the end of the headers to the end of the body: cuts stalled uploads.
    pub body_timeout_s: f64,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout_s: f64,
    /// Largest request body (413 beyond).
    pub max_body_bytes: u64,
    /// Connections one worker serves at once (a fast 503 beyond).
    pub max_connections: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout_s: 10.0,
            body_timeout_s: 30.0,
            idle_timeout_s: 75.0,
            max_body_bytes: 2 << 20,
            max_connections: 1024,
        }
    }
}

impl HttpConfig {
    /// The `FORKLESS_HTTP` value workers parse.
    pub fn env_value(&self) -> String {
        let ms = |s: f64| ((s * 1000.0).round() as u64).max(1);
        format!(
            "header_timeout_ms={},body_timeout_ms={},idle_timeout_ms={},max_body_bytes={},max_connections={}",
            ms(self.header_timeout_s),
            ms(self.body_timeout_s),
            ms(self.idle_timeout_s),
            self.max_body_bytes,
            self.max_connections
        )
    }
}

fn default_count() -> u32 {
    1
}
fn default_timeout() -> f64 {
    30.0
}
fn default_start_timeout() -> f64 {
    60.0
}
fn default_backlog() -> i32 {
    1024
}

/// Backoff between restarts of a child that keeps dying.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// A child that ran this long is healthy again: its next restart starts from the initial backoff.
    pub reset_after_s: f64,
    /// Restart intensity (Erlang/OTP): more than `max_restarts` unplanned restarts of one role
    /// within `within_s` seconds stops everything, and the supervisor exits non-zero naming the
    /// process that kept dying.
    pub max_restarts: u32,
    pub within_s: f64,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            reset_after_s: 1.0,
            max_restarts: 10,
            within_s: 60.0,
        }
    }
}

/// Largest worker count accepted (a typo guard, not a resource limit).
pub const MAX_WORKERS: u32 = 1024;

/// Longest duration any `*_s` key accepts (one day): beyond it a number is a typo, and far
/// beyond it it no longer fits a `Duration` (`1e300` used to panic a supervisor thread).
pub const MAX_SECONDS: f64 = 86_400.0;
/// Longest grace a stopping child gets (one hour).
pub const MAX_GRACE_SECONDS: f64 = 3_600.0;
/// Smallest non-zero timeout: a shorter one would kill children faster than they can answer.
pub const MIN_TIMEOUT_SECONDS: f64 = 0.1;
/// Longest restart backoff (one hour, in ms).
pub const MAX_BACKOFF_MS: u64 = 3_600_000;
/// Largest `listen(2)` backlog (the kernel caps it at `net.core.somaxconn` anyway).
pub const MAX_BACKLOG: i64 = 65_535;
/// Largest `max_requests` and `max_requests_jitter` (their sum must not overflow).
pub const MAX_REQUESTS: u64 = 1_000_000_000_000;
/// Largest `max_restarts`.
pub const MAX_RESTARTS: u32 = 1_000_000;
/// Largest CUDA device ordinal accepted.
pub const MAX_CUDA_DEVICE: u32 = 1023;

/// Seconds from a validated config as a `Duration`. Validation keeps every value finite and in
/// range; should an unvalidated value slip through, it saturates instead of panicking.
fn seconds(value: f64) -> Duration {
    match Duration::try_from_secs_f64(value) {
        Ok(duration) => duration,
        Err(_) if value > 0.0 => Duration::from_secs(MAX_SECONDS as u64),
        Err(_) => Duration::ZERO,
    }
}

impl SupervisorConfig {
    /// SIGTERM → SIGKILL grace for a stopping child.
    pub fn graceful_timeout(&self) -> Duration {
        seconds(self.graceful_timeout_s)
    }
}

impl WorkersConfig {
    /// How long a ready worker may stay silent before it counts as hung; `None` when off.
    pub fn timeout(&self) -> Option<Duration> {
        (self.timeout_s > 0.0).then(|| seconds(self.timeout_s))
    }

    /// How long a child may take to become ready.
    pub fn start_timeout(&self) -> Duration {
        seconds(self.start_timeout_s)
    }

    /// A worker's heartbeat period: four per timeout, between 10 ms and 1 s (so request counts
    /// stay fresh); `None` when the hang timeout is off.
    pub fn heartbeat_period(&self) -> Option<Duration> {
        self.timeout().map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
    }
}

impl ModelConfig {
    /// How long a hot swap's load may take.
    pub fn load_timeout(&self) -> Duration {
        seconds(self.load_timeout_s)
    }
}

impl RestartConfig {
    /// Up this long, a child is healthy again (its next restart is immediate).
    pub fn reset_after(&self) -> Duration {
        seconds(self.reset_after_s)
    }

    /// The restart-intensity window.
    pub fn within(&self) -> Duration {
        seconds(self.within_s)
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses `text` as if read from `path` (relative paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        config.source = path.into();
        let base = path.parent().unwrap_or(Path::new("."));
        config.model.path = base.join(&config.model.path);
        config.supervisor.runtime_dir = config.supervisor.runtime_dir.map(|d| base.join(d));
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { path, key, problem, .. } => {
                ConfigError::Invalid { path, key, line: line_of(text, key), problem }
            }
            other => other,
        })?;
        Ok(config)
    }

    fn invalid(&self, key: &'static str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: self.source.clone(), key, line: None, problem: problem.into() }
    }

    /// Checks that `value` (of `key`) is finite and within `range` seconds; `off_allowed` also
    /// accepts 0 (the key's "off").
    fn check_seconds(
        &self,
        key: &'static str,
        value: f64,
        range: std::ops::RangeInclusive<f64>,
        off_allowed: bool,
    ) -> Result<(), ConfigError> {
        if (off_allowed && value == 0.0) || range.contains(&value) {
            return Ok(());
        }
        let off = if off_allowed { "0 (off) or " } else { "" };
        Err(self.invalid(
            key,
            format!("must be {off}a number of seconds from {} to {} (it is {value})", range.start(), range.end()),
        ))
    }

    /// Checks that integer `value` (of `key`) lies within `range`.
    fn check_range<T>(&self, key: &'static str, value: T, range: std::ops::RangeInclusive<T>) -> Result<(), ConfigError>
    where
        T: PartialOrd + std::fmt::Display,
    {
        if range.contains(&value) {
            return Ok(());
        }
        Err(self.invalid(key, format!("must be between {} and {} (it is {value})", range.start(), range.end())))
    }

    fn validate_numbers(&self) -> Result<(), ConfigError> {
        let (w, r) = (&self.workers, &self.restart);
        self.check_seconds(
            "supervisor.graceful_timeout_s",
            self.supervisor.graceful_timeout_s,
            0.0..=MAX_GRACE_SECONDS,
            false,
        )?;
        self.check_seconds("workers.timeout_s", w.timeout_s, MIN_TIMEOUT_SECONDS..=MAX_SECONDS, true)?;
        self.check_seconds("workers.start_timeout_s", w.start_timeout_s, MIN_TIMEOUT_SECONDS..=MAX_SECONDS, false)?;
        self.check_seconds("restart.reset_after_s", r.reset_after_s, 0.0..=MAX_SECONDS, false)?;
        self.check_seconds("restart.within_s", r.within_s, 0.0..=MAX_SECONDS, false)?;
        self.check_seconds(
            "model.load_timeout_s",
            self.model.load_timeout_s,
            MIN_TIMEOUT_SECONDS..=MAX_SECONDS,
            false,
        )?;
        self.check_range("workers.count", w.count, 1..=MAX_WORKERS)?;
        self.check_range("workers.backlog", i64::from(w.backlog), 1..=MAX_BACKLOG)?;
        self.check_range("workers.max_requests", w.max_requests, 0..=MAX_REQUESTS)?;
        self.check_range("workers.max_requests_jitter", w.max_requests_jitter, 0..=MAX_REQUESTS)?;
        self.check_range("restart.backoff_initial_ms", r.backoff_initial_ms, 0..=MAX_BACKOFF_MS)?;
        self.check_range("restart.backoff_max_ms", r.backoff_max_ms, 0..=MAX_BACKOFF_MS)?;
        self.check_range("restart.max_restarts", r.max_restarts, 0..=MAX_RESTARTS)?;
        self.check_range("cuda.device", self.cuda.device, 0..=MAX_CUDA_DEVICE)?;
        self.validate_devices()?;
        if r.backoff_initial_ms > r.backoff_max_ms {
            return Err(self.invalid("restart.backoff_initial_ms", "must not exceed restart.backoff_max_ms"));
        }
        Ok(())
    }

    /// `[workers] env` may not set what the supervisor sets itself (the child-environment
    /// contract, `FORKLESS_*`, and systemd's `LISTEN_*`), nor hold what no environment can.
    fn validate_env(&self) -> Result<(), ConfigError> {
        for (name, value) in &self.workers.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(self.invalid("workers.env", format!("{name:?} is not a valid environment variable")));
            }
            if name == forkless_bus::ENV_CUDA_VISIBLE_DEVICES
                && self.cuda.worker_visible_devices == WorkerVisibility::Own
            {
                return Err(self.invalid(
                    "workers.env",
                    format!(
                        "{name:?} is set by the supervisor with [cuda] worker_visible_devices = \"own\": \
                         remove one of the two"
                    ),
                ));
            }
            if name.starts_with("FORKLESS_") || name.starts_with("LISTEN_") {
                return Err(self.invalid(
                    "workers.env",
                    format!("{name:?} is reserved: the supervisor sets FORKLESS_* and LISTEN_* itself"),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_numbers()?;
        self.validate_env()?;
        self.validate_http()?;
        if self.workers.command.first().is_none_or(|p| p.is_empty()) {
            return Err(self.invalid("workers.command", "must name a program, e.g. [\"linear-worker\"]"));
        }
        if self.workers.listen.is_empty() {
            return Err(self.invalid("workers.listen", "needs at least one address, e.g. [\"127.0.0.1:8080\"]"));
        }
        for addr in &self.workers.listen {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.invalid("workers.listen", format!("{addr:?} is not an IP:port address")));
            }
        }
        if let Some(addr) = &self.supervisor.metrics_listen {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.invalid("supervisor.metrics_listen", format!("{addr:?} is not an IP:port address")));
            }
        }
        if self.model.make_if_missing.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(self.invalid("model.make_if_missing", "must name a program or be left out"));
        }
        self.validate_lane()?;
        if !(1..=MAX_CUDA_STACK_BYTES).contains(&self.cuda.stack_limit_bytes) {
            return Err(self.invalid(
                "cuda.stack_limit_bytes",
                format!(
                    "must be between 1 and {MAX_CUDA_STACK_BYTES} bytes (default {DEFAULT_CUDA_STACK_BYTES}; the driver's own is 1024)"
                ),
            ));
        }
        Ok(())
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        let cuda = &self.cuda;
        match &cuda.devices {
            None => {}
            Some(DeviceSet::Named(name)) if name == "all" => {}
            Some(DeviceSet::Named(name)) => {
                return Err(self.invalid("cuda.devices", format!("{name:?}: give a list like [0, 1] or \"all\"")))
            }
            Some(DeviceSet::List(list)) => {
                if list.is_empty() || list.len() > MAX_DEVICES {
                    return Err(self.invalid("cuda.devices", format!("must list 1 to {MAX_DEVICES} devices")));
                }
                let mut seen = std::collections::BTreeSet::new();
                for &device in list {
                    self.check_range("cuda.devices", device, 0..=MAX_CUDA_DEVICE)?;
                    if !seen.insert(device) {
                        return Err(self.invalid("cuda.devices", format!("lists device {device} twice")));
                    }
                }
            }
        }
        if cuda.devices.is_some() && cuda.device != 0 {
            return Err(self.invalid("cuda.device", "set either [cuda] device or [cuda] devices, not both"));
        }
        if let Some(n) = cuda.workers_per_device {
            self.check_range("cuda.workers_per_device", n, 1..=MAX_WORKERS)?;
        }
        Ok(())
    }

    fn validate_lane(&self) -> Result<(), ConfigError> {
        let lane = &self.lane;
        self.check_range("lane.max_batch", lane.max_batch, 1..=1024)?;
        self.check_range("lane.max_wait_us", lane.max_wait_us, 0..=1_000_000)?;
        self.check_range("lane.linger_us", lane.linger_us, 0..=1_000_000)?;
        self.check_range("lane.slots", lane.slots, 1..=forkless_bus::lane::MAX_SLOTS)?;
        self.check_range("lane.input_bytes", lane.input_bytes, 1..=16 << 20)?;
        self.check_range("lane.output_bytes", lane.output_bytes, 1..=16 << 20)?;
        if let Some(Err(e)) = lane.layout().map(|l| l.size()) {
            return Err(self.invalid("lane", format!("this lane cannot be made: {e}")));
        }
        Ok(())
    }

    fn validate_http(&self) -> Result<(), ConfigError> {
        let http = &self.workers.http;
        for (key, value) in [
            ("workers.http.header_timeout_s", http.header_timeout_s),
            ("workers.http.body_timeout_s", http.body_timeout_s),
            ("workers.http.idle_timeout_s", http.idle_timeout_s),
        ] {
            self.check_seconds(key, value, 0.001..=MAX_SECONDS, false)?;
        }
        self.check_range("workers.http.max_body_bytes", http.max_body_bytes, 1..=u64::MAX)?;
        self.check_range("workers.http.max_connections", http.max_connections, 1..=1 << 20)?;
        Ok(())
    }

    /// How many workers run: `[cuda] workers_per_device` × the devices in use when that is set
    /// and the weights are on GPUs, else `[workers] count`.
    pub fn worker_count(&self, devices: usize) -> u32 {
        match (self.cuda.workers_per_device, devices) {
            (Some(per_device), 1..) => per_device.saturating_mul(devices as u32).min(MAX_WORKERS),
            _ => self.workers.count,
        }
    }

    /// The folder relative program paths are resolved against.
    pub fn base_dir(&self) -> &Path {
        self.source.parent().unwrap_or(Path::new("."))
    }
}

/// The line (1-based) where `key` (`table.name`) is set in `text`, if it is.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let (table, name) = key.split_once('.')?;
    let document = toml::de::DeTable::parse(text).ok()?;
    let table = find_key(document.get_ref(), table)?;
    let offset = find_key(table.get_ref().as_table()?, name)?.span().start;
    Some(text.get(..offset)?.matches('\n').count() + 1)
}

fn find_key<'a, 'i>(
    entries: &'a toml::de::DeTable<'i>,
    wanted: &str,
) -> Option<&'a toml::Spanned<toml::de::DeValue<'i>>> {
    entries.iter().find(|(k, _)| k.get_ref().as_ref() == wanted).map(|(_, v)| v)
}

/// Resolves a program named in the config: a bare name is looked up beside the running
/// executable (so `target/release/supervisor` finds `target/release/linear-worker`), then in
/// `PATH`; a relative path is taken relative to `base`.
pub fn resolve_program(program: &str, base: &Path) -> PathBuf {
    if program.contains('/') {
        return base.join(program);
    }
    let beside_us = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join(program)));
    match beside_us {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from(program),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[model]\npath = \"m.safetensors\"\n[workers]\ncommand = [\"w\"]\nlisten = [\"127.0.0.1:0\"]\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/forkless/config.toml"))
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.workers.count, 1);
        assert_eq!(c.model.sharing, Sharing::Shared);
        assert_eq!(c.model.path, Path::new("/etc/forkless/m.safetensors"));
        assert_eq!(c.restart.backoff_initial_ms, 100);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse(&format!("{GOOD}colour = \"blue\"\n")).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("colour") && err.contains("line 6"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = parse(&GOOD.replace("[\"w\"]", "\"w\"")).unwrap_err().to_string();
        assert!(err.contains("command") && err.contains("line 4"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = parse(&format!("{GOOD}count = 0\n")).unwrap_err().to_string();
        assert!(err.contains("workers.count"), "{err}");
        let err = parse(&GOOD.replace("127.0.0.1:0", "localhost")).unwrap_err().to_string();
        assert!(err.contains("workers.listen"), "{err}");
        let err = parse(&GOOD.replace("path = \"m.safetensors\"", "path = \"m\"\nsharing = \"some\"")).unwrap_err();
        assert!(err.to_string().contains("sharing"), "{err}");
    }

    /// Every number is finite and in range, and a refusal names the key and its line.
    #[test]
    fn absurd_numbers_are_refused_with_key_and_line() {
        for (table, line, key) in [
            ("[supervisor]", "graceful_timeout_s = 1e300", "supervisor.graceful_timeout_s"),
            ("[supervisor]", "graceful_timeout_s = nan", "supervisor.graceful_timeout_s"),
            ("[supervisor]", "graceful_timeout_s = -0.5", "supervisor.graceful_timeout_s"),
            ("[workers]", "timeout_s = inf", "workers.timeout_s"),
            ("[workers]", "timeout_s = 0.001", "workers.timeout_s"),
            ("[workers]", "start_timeout_s = 0", "workers.start_timeout_s"),
            ("[workers]", "backlog = -1", "workers.backlog"),
            ("[workers]", "backlog = 0", "workers.backlog"),
            ("[workers]", "backlog = 100000", "workers.backlog"),
            ("[workers]", "max_requests = 18446744073709551615", "workers.max_requests"),
            ("[workers]", "max_requests_jitter = 1e3", "max_requests_jitter"),
            ("[restart]", "reset_after_s = 1e20", "restart.reset_after_s"),
            ("[restart]", "within_s = -inf", "restart.within_s"),
            ("[restart]", "backoff_max_ms = 99999999999", "restart.backoff_max_ms"),
            ("[restart]", "max_restarts = 4000000000", "restart.max_restarts"),
            ("[cuda]", "device = 100000", "cuda.device"),
            ("[lane]", "linger_us = 1000001", "lane.linger_us"),
        ] {
            let text = match table {
                "[workers]" => format!("{GOOD}{line}\n"),
                _ => format!("{GOOD}{table}\n{line}\n"),
            };
            let number = text.lines().position(|l| l == line).unwrap() + 1;
            let err = match parse(&text) {
                Ok(_) => panic!("{line} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(key) && err.contains(&format!("line {number}")), "{line}: {err}");
        }
    }

    #[test]
    fn in_range_numbers_give_durations() {
        let text = GOOD.to_string() + "timeout_s = 2\nstart_timeout_s = 0.5\nbacklog = 65535\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.workers.timeout(), Some(Duration::from_secs(2)));
        assert_eq!(c.workers.heartbeat_period(), Some(Duration::from_millis(500)));
        assert_eq!(c.workers.start_timeout(), Duration::from_millis(500));
        assert_eq!(c.supervisor.graceful_timeout(), Duration::from_secs(30));
        let c = parse(&(GOOD.to_string() + "timeout_s = 0\n")).unwrap();
        assert_eq!((c.workers.timeout(), c.workers.heartbeat_period()), (None, None));
    }

    #[test]
    fn reserved_worker_variables_are_refused() {
        for env in ["{ FORKLESS_MAX_REQUESTS = \"1\" }", "{ LISTEN_FDS = \"3\" }", "{ \"A=B\" = \"x\" }"] {
            let err = parse(&format!("{GOOD}env = {env}\n")).unwrap_err().to_string();
            assert!(err.contains("workers.env") && err.contains("line 6"), "{err}");
        }
        parse(&format!("{GOOD}env = {{ RUST_LOG = \"debug\" }}\n")).unwrap();
    }

    #[test]
    fn backend_and_cuda_keys_parse_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.model.backend, Backend::Auto);
        assert_eq!(c.cuda, CudaConfig { device: 0, stack_limit_bytes: 64, ..CudaConfig::default() });
        let text = GOOD.replace("[workers]", "backend = \"cuda\"\n[workers]")
            + "[cuda]\ndevice = 1\nstack_limit_bytes = 128\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.model.backend, Backend::Cuda);
        assert_eq!(c.cuda, CudaConfig { device: 1, stack_limit_bytes: 128, ..CudaConfig::default() });
        let c = parse(&GOOD.replace("[workers]", "backend = \"host\"\n[workers]")).unwrap();
        assert_eq!(c.model.backend, Backend::Host);
    }

    #[test]
    fn workers_may_see_only_their_own_gpu() {
        assert_eq!(parse(GOOD).unwrap().cuda.worker_visible_devices, WorkerVisibility::All);
        let own = GOOD.to_string() + "[cuda]\ndevices = [0, 1]\nworker_visible_devices = \"own\"\n";
        assert_eq!(parse(&own).unwrap().cuda.worker_visible_devices, WorkerVisibility::Own);
        let bad = GOOD.to_string() + "[cuda]\nworker_visible_devices = \"some\"\n";
        assert!(parse(&bad).unwrap_err().to_string().contains("worker_visible_devices"));
        // The supervisor sets CUDA_VISIBLE_DEVICES itself then; with "all" the operator may.
        let env = "env = { CUDA_VISIBLE_DEVICES = \"1\" }\n";
        let err = parse(&format!("{GOOD}{env}[cuda]\nworker_visible_devices = \"own\"\n")).unwrap_err().to_string();
        assert!(err.contains("workers.env") && err.contains("worker_visible_devices"), "{err}");
        parse(&format!("{GOOD}{env}")).unwrap();
    }

    #[test]
    fn several_gpus_are_a_list_or_all() {
        let c = parse(
            &(GOOD.to_string()
                + "[cuda]\ndevices = [2, 0, 3]\nworkers_per_device = 2\non_device_failure = \"degrade\"\n"),
        )
        .unwrap();
        assert_eq!(c.cuda.requested_devices(), Some(vec![2, 0, 3]));
        assert_eq!((c.cuda.workers_per_device, c.cuda.on_device_failure), (Some(2), DeviceFailure::Degrade));
        let all = parse(&(GOOD.to_string() + "[cuda]\ndevices = \"all\"\n")).unwrap();
        assert_eq!(all.cuda.requested_devices(), None, "the probe finds them");
        assert_eq!(parse(GOOD).unwrap().cuda.requested_devices(), Some(vec![0]), "device alone");
        for (bad, key) in [
            ("devices = []", "cuda.devices"),
            ("devices = [0, 0]", "cuda.devices"),
            ("devices = \"some\"", "cuda.devices"),
            ("devices = [0, 5000]", "cuda.devices"),
            ("device = 1\ndevices = [0, 1]", "cuda.device"),
            ("workers_per_device = 0", "cuda.workers_per_device"),
            ("on_device_failure = \"ignore\"", "on_device_failure"),
        ] {
            let err = parse(&(GOOD.to_string() + "[cuda]\n" + bad + "\n")).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_backend_values_and_cuda_keys_are_named() {
        let err = parse(&GOOD.replace("[workers]", "backend = \"gpu\"\n[workers]")).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("backend") && err.contains("cuda"), "{err}");
        let err = parse(&format!("{GOOD}[cuda]\ndevise = 1\n")).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("devise"), "{err}");
        let err = parse(&format!("{GOOD}[cuda]\nstack_limit_bytes = 0\n")).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("cuda.stack_limit_bytes"), "{err}");
        let err = parse(&format!("{GOOD}[cuda]\ndevice = -1\n")).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("device"), "{err}");
    }

    #[test]
    fn shipped_configs_are_valid() {
        for (name, text) in [
            ("examples/linear/config.toml", include_str!("../../../examples/linear/config.toml")),
            ("examples/linear/config-seed.toml", include_str!("../../../examples/linear/config-seed.toml")),
            ("examples/linear/config-chaos.toml", include_str!("../../../examples/linear/config-chaos.toml")),
            ("examples/linear/config-gpu.toml", include_str!("../../../examples/linear/config-gpu.toml")),
            ("examples/mlp/config.toml", include_str!("../../../examples/mlp/config.toml")),
            ("deploy/config.toml", include_str!("../../../deploy/config.toml")),
            ("deploy/config-multigpu.toml", include_str!("../../../deploy/config-multigpu.toml")),
        ] {
            if let Err(e) = Config::parse(text, Path::new(name)) {
                panic!("{name}: {e}");
            }
        }
    }

    /// The config in a manifest's ConfigMap (the block under `config.toml: |`).
    fn configmap_config(name: &str, manifest: &str) -> Config {
        let (_, block) = manifest.split_once("config.toml: |\n").expect("a config.toml entry");
        let text: String = block
            .lines()
            .take_while(|line| line.is_empty() || line.starts_with("    "))
            .map(|line| format!("{}\n", line.get(4..).unwrap_or("")))
            .collect();
        Config::parse(&text, Path::new(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_kubernetes_configmap_holds_a_valid_config() {
        let config = configmap_config("deploy/kubernetes.yaml", include_str!("../../../deploy/kubernetes.yaml"));
        assert_eq!(config.model.backend, Backend::Cuda);
    }

    /// The multi-GPU files ask for what their comments say: every GPU, 4 workers each,
    /// degrade, the lane; and the ConfigMap is the TOML file with the pod's paths.
    #[test]
    fn the_multi_gpu_deployment_configs_are_valid_and_agree() {
        let file =
            Config::parse(include_str!("../../../deploy/config-multigpu.toml"), Path::new("config-multigpu.toml"))
                .unwrap_or_else(|e| panic!("{e}"));
        let pod = configmap_config(
            "deploy/kubernetes-multigpu.yaml",
            include_str!("../../../deploy/kubernetes-multigpu.yaml"),
        );
        for config in [&file, &pod] {
            assert_eq!(config.model.backend, Backend::Cuda);
            assert_eq!(config.cuda.devices, Some(DeviceSet::Named("all".into())));
            assert_eq!(config.cuda.requested_devices(), None, "the probe counts the GPUs");
            assert_eq!(config.cuda.workers_per_device, Some(4));
            assert_eq!(config.worker_count(8), 32);
            assert_eq!(config.cuda.on_device_failure, DeviceFailure::Degrade);
            assert_eq!((config.lane.enabled, config.lane.max_batch, config.lane.max_wait_us), (true, 32, 100));
        }
        assert_eq!(file.cuda, pod.cuda);
        assert_eq!(file.lane, pod.lane);
    }

    #[test]
    fn http_limits_have_defaults_and_are_checked() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.workers.http, HttpConfig::default());
        assert_eq!(
            c.workers.http.env_value(),
            "header_timeout_ms=10000,body_timeout_ms=30000,idle_timeout_ms=75000,max_body_bytes=2097152,max_connections=1024"
        );
        let c = parse(&format!("{GOOD}[workers.http]\nheader_timeout_s = 0.5\nmax_connections = 8\n")).unwrap();
        assert!(c.workers.http.env_value().starts_with("header_timeout_ms=500,"));
        for (bad, key) in [
            ("header_timeout_s = 0", "workers.http.header_timeout_s"),
            ("max_connections = 0", "workers.http.max_connections"),
            ("idle_timeout = 5", "idle_timeout"),
        ] {
            let err = parse(&format!("{GOOD}[workers.http]\n{bad}\n")).unwrap_err().to_string();
            assert!(err.contains("config.toml") && err.contains(key), "{err}");
        }
    }

    #[test]
    fn a_check_table_is_kept_for_the_chaos_harness() {
        let c = parse(&format!("{GOOD}[check]\npath = \"/predict\"\n")).unwrap();
        assert_eq!(c.check.unwrap()["path"].as_str(), Some("/predict"));
    }

    #[test]
    fn relative_program_paths_resolve_against_the_config() {
        assert_eq!(resolve_program("./bin/w", Path::new("/srv")), Path::new("/srv/./bin/w"));
        assert_eq!(
            resolve_program("surely-not-beside-the-test-binary", Path::new("/srv")),
            Path::new("surely-not-beside-the-test-binary")
        );
    }
}
