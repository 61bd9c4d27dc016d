//! `forkless._native`: the Rust half of the `forkless` Python package.
//!
//! - [`link`]: attaching to the supervisor on a background thread (a small tokio runtime), and
//!   everything the worker crate does after that: heartbeats, hot swaps, releases, `ready()`,
//!   request counting, the end of the worker;
//! - [`accept`]: the Python acceptance check, run in the worker crate's hook (at attach and on
//!   every hot swap's offer), so a refusal reaches the supervisor;
//! - [`lane`] and [`submit`]: the batch lane, the pass a service declares and
//!   `Generation.submit`;
//! - [`generation`]: the `Generation` and `Tensor` classes, zero-copy through DLPack
//!   ([`dlpack`], the crate's only `unsafe`: C structs and capsules), and `Candidate`, what a
//!   check sees.
//!
//! The pure-Python package around it (`forkless/`) adds numpy/torch views, module binding,
//! generation switching between requests, WSGI/ASGI middleware and the server launchers.

#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod accept;
#[allow(unsafe_code)] // C structs and capsules: every block says why it holds
mod dlpack;
mod generation;
mod lane;
mod link;
mod submit;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkless_worker::Parent;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use accept::PythonCheck;
use generation::{PyCandidate, PyGeneration, PyTensor};
use link::{Failure, OnShutdown, StartOptions};

create_exception!(
    _native,
    AttachFailed,
    PyRuntimeError,
    "The worker could not attach: args are (message, exit_code); exit_code tells the supervisor what to do \
     (78: restarting cannot help, 75: retry later, 1: restart)."
);

fn failed(failure: Failure) -> PyErr {
    AttachFailed::new_err((failure.message, failure.exit_code))
}

fn not_attached() -> PyErr {
    PyRuntimeError::new_err("this process is not attached: call forkless.attach() first (in the worker process)")
}

fn attached() -> PyResult<Arc<link::Attached>> {
    link::get().and_then(|l| l.attached()).ok_or_else(not_attached)
}

/// Child logging as the supervisor wants it: plain lines on stderr, which it re-emits with
/// role, index and pid (`RUST_LOG` filters).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .try_init();
}

/// Who this process's parent is: "auto" reads `FORKLESS_LAUNCHER_PID` (set by a launcher such as
/// `python -m forkless.gunicorn` for the worker it forks).
fn parent(mode: &str) -> Result<Parent, Failure> {
    let fatal = |message: String| Failure { message, exit_code: forkless_worker::EXIT_FATAL };
    match mode {
        "supervisor" => Ok(Parent::Supervisor),
        "launcher" => Ok(Parent::Launcher),
        "auto" => match std::env::var(forkless_bus::child::ENV_LAUNCHER_PID) {
            Err(_) => Ok(Parent::Supervisor),
            Ok(pid) if pid == std::process::id().to_string() => Err(fatal(
                "forkless.attach() was called in the launcher (the gunicorn master process): attach in the \
                 worker it forks (do not use --preload; the app is imported in the worker)"
                    .into(),
            )),
            Ok(_) => Ok(Parent::Launcher),
        },
        other => Err(fatal(format!("parent must be \"auto\", \"supervisor\" or \"launcher\", not {other:?}"))),
    }
}

/// Starts attaching on the background thread (once per process; later calls do nothing).
///
/// `check(candidate) -> None | str`, if given, is the service's acceptance check: the worker
/// crate calls it on the link thread (with the GIL) for the generation it attaches and for every
/// generation a hot swap offers, with a `Candidate` (metadata only). None accepts; a string
/// refuses with that reason: at attach the attach fails (exit code 78), at a swap the supervisor
/// aborts it and `reload-model` fails with the reason. Only the first call's check is used.
///
/// `lane() -> run | None`, if given, is asked for the service's lane pass once per generation
/// that has a lane, on that generation's pass-runner thread, after `ready()` (see [`lane`]).
#[pyfunction]
#[pyo3(signature = (parent="auto", on_shutdown="sigterm", check=None, lane=None))]
fn start(
    parent: &str,
    on_shutdown: &str,
    check: Option<Bound<'_, PyAny>>,
    lane: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let on_shutdown = match on_shutdown {
        "sigterm" => OnShutdown::Terminate,
        "none" => OnShutdown::Nothing,
        other => {
            return Err(PyValueError::new_err(format!("on_shutdown must be \"sigterm\" or \"none\", not {other:?}")))
        }
    };
    let parent = self::parent(parent).map_err(failed)?;
    if let Some(check) = check.as_ref().filter(|c| !c.is_callable()) {
        return Err(PyTypeError::new_err(format!(
            "check must be a callable(candidate) -> None | str, not {}",
            check.get_type().name()?
        )));
    }
    if let Some(lane) = lane.as_ref().filter(|l| !l.is_callable()) {
        return Err(PyTypeError::new_err(format!(
            "lane must be a callable() -> run | None, not {}",
            lane.get_type().name()?
        )));
    }
    if link::get().is_none() {
        init_logging();
    }
    let check = check.map(|c| PythonCheck::new(c.unbind()));
    let lane = lane.map(|declared| {
        let ready: lane::WaitReady = Box::new(|timeout| link::get().is_some_and(|l| l.wait_ready(timeout)));
        lane::PythonPass::new(declared.unbind(), ready).into_factory()
    });
    link::start(StartOptions { parent, on_shutdown, check, lane }).map_err(failed)?;
    Ok(())
}

/// Waits for the attach (at most `timeout` seconds; forever if None), without the GIL.
/// True once attached, False on timeout; raises AttachFailed if it failed.
#[pyfunction]
#[pyo3(signature = (timeout=None))]
fn wait(py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
    let link = link::get().ok_or_else(not_attached)?;
    let timeout = timeout.map(|s| Duration::from_secs_f64(s.max(0.0)));
    py.detach(|| link.wait(timeout)).map(|a| a.is_some()).map_err(failed)
}

/// True once `start()` was called in this process.
#[pyfunction]
fn started() -> bool {
    link::get().is_some()
}

/// True once attached (and not in a forked child of the attached process).
#[pyfunction]
fn is_attached() -> bool {
    link::get().and_then(|l| l.attached()).is_some()
}

/// Reports this worker ready to the supervisor (once), without the GIL.
#[pyfunction]
fn ready(py: Python<'_>) -> PyResult<()> {
    let link = link::get().ok_or_else(not_attached)?;
    py.detach(|| link.ready()).map_err(failed)
}

#[pyfunction]
fn is_ready() -> bool {
    link::get().is_some_and(|l| l.is_ready())
}

/// The generation the worker crate serves now (a hot swap replaces it between requests).
#[pyfunction]
fn current() -> PyResult<PyGeneration> {
    Ok(PyGeneration { inner: attached()?.generations.current() })
}

/// The number of the generation the worker crate serves now.
#[pyfunction]
fn current_number() -> PyResult<u64> {
    Ok(attached()?.generations.current().number())
}

/// Waits (without the GIL, at most `timeout` seconds) for the current generation to be other
/// than `number`; returns the new number, or None on timeout.
#[pyfunction]
fn wait_for_change(py: Python<'_>, number: u64, timeout: f64) -> PyResult<Option<u64>> {
    let attached = attached()?;
    let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
    Ok(py.detach(|| loop {
        let now = attached.generations.current().number();
        if now != number {
            return Some(now);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }))
}

/// Counts one finished request (heartbeats report it; `max_requests` recycles on it).
#[pyfunction]
fn request_finished() -> PyResult<()> {
    attached()?.requests.finished();
    Ok(())
}

/// Requests counted so far.
#[pyfunction]
fn served() -> PyResult<u64> {
    Ok(attached()?.requests.served())
}

/// True once the worker has decided to stop (`max_requests`, or the supervisor is gone).
#[pyfunction]
fn shutdown_requested() -> PyResult<bool> {
    Ok(attached()?.shutdown.is_cancelled())
}

/// The CUDA per-thread stack limit of this process's context in bytes (None on the host
/// backend). The driver raises it for a kernel that needs more and keeps it.
#[pyfunction]
fn cuda_stack_limit() -> PyResult<Option<usize>> {
    match &attached()?.gpu {
        Some(gpu) => gpu.stack_limit().map(Some).map_err(|e| PyRuntimeError::new_err(e.to_string())),
        None => Ok(None),
    }
}

/// Opens GPU `device`'s primary context in this process and sets its per-thread stack limit,
/// as a worker's attach does, but without a supervisor: for measuring what a context costs
/// (scripts/gpu_python.py). The context stays retained for the life of the process. Returns
/// the stack limit in force.
#[pyfunction]
#[pyo3(signature = (device, stack_limit=None))]
fn cuda_open(py: Python<'_>, device: usize, stack_limit: Option<usize>) -> PyResult<usize> {
    static OPENED: std::sync::OnceLock<forkless_gpu::Gpu> = std::sync::OnceLock::new();
    let error = |e: forkless_gpu::GpuError| PyRuntimeError::new_err(format!("GPU {device}: {e}"));
    py.detach(|| {
        let gpu = match OPENED.get() {
            Some(gpu) => gpu.clone(),
            None => {
                let gpu = forkless_gpu::Gpu::open(device).map_err(error)?;
                OPENED.get_or_init(|| gpu).clone()
            }
        };
        if let Some(bytes) = stack_limit {
            gpu.set_stack_limit(bytes).map_err(error)?;
        }
        gpu.stack_limit().map_err(error)
    })
}

/// What the worker knows about itself: index, backend, device, attach timings.
#[pyfunction]
fn info<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let attached = attached()?;
    let dict = PyDict::new(py);
    dict.set_item("index", attached.index)?;
    dict.set_item("pid", std::process::id())?;
    dict.set_item("backend", if attached.gpu.is_some() { "cuda" } else { "host" })?;
    dict.set_item("cuda_device", attached.gpu.as_ref().map(|g| g.ordinal()))?;
    dict.set_item("attach_ms", attached.attach_ms)?;
    dict.set_item("attach_wall_us", attached.attach_wall_us)?;
    dict.set_item("requests", attached.requests.served())?;
    Ok(dict)
}

/// For a launcher (the gunicorn master): arm SIGKILL-on-parent-death and check that the parent
/// is the supervisor. Raises AttachFailed (exit code 78) otherwise.
#[pyfunction]
fn die_with_supervisor() -> PyResult<()> {
    let fatal = |e: &dyn std::fmt::Display| AttachFailed::new_err((e.to_string(), forkless_worker::EXIT_FATAL));
    let env = forkless_bus::child_env::ChildEnv::from_env().map_err(|e| fatal(&e))?;
    forkless_bus::child::die_with_supervisor(&env).map_err(|e| fatal(&e))
}

/// A safetensors file as a generation private to this process (read-only host memory, number
/// 0), without a supervisor: for tests, tools and notebooks.
#[pyfunction]
fn load(py: Python<'_>, path: PathBuf) -> PyResult<PyGeneration> {
    let generation = py
        .detach(|| forkless_worker::load_private(&path))
        .map_err(|e| PyValueError::new_err(format!("{}: {e}", path.display())))?;
    Ok(PyGeneration { inner: Arc::new(generation) })
}

#[pymodule]
#[pyo3(name = "_native")]
fn forkless_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("AttachFailed", m.py().get_type::<AttachFailed>())?;
    m.add("LaneError", m.py().get_type::<submit::LaneError>())?;
    m.add("LaneFull", m.py().get_type::<submit::LaneFull>())?;
    m.add("ENV_LAUNCHER_PID", forkless_bus::child::ENV_LAUNCHER_PID)?;
    m.add("EXIT_FATAL", forkless_worker::EXIT_FATAL)?;
    m.add_class::<PyCandidate>()?;
    m.add_class::<PyGeneration>()?;
    m.add_class::<PyTensor>()?;
    m.add_class::<lane::Inputs>()?;
    for function in [
        wrap_pyfunction!(start, m)?,
        wrap_pyfunction!(wait, m)?,
        wrap_pyfunction!(started, m)?,
        wrap_pyfunction!(is_attached, m)?,
        wrap_pyfunction!(ready, m)?,
        wrap_pyfunction!(is_ready, m)?,
        wrap_pyfunction!(current, m)?,
        wrap_pyfunction!(current_number, m)?,
        wrap_pyfunction!(wait_for_change, m)?,
        wrap_pyfunction!(request_finished, m)?,
        wrap_pyfunction!(served, m)?,
        wrap_pyfunction!(shutdown_requested, m)?,
        wrap_pyfunction!(cuda_stack_limit, m)?,
        wrap_pyfunction!(cuda_open, m)?,
        wrap_pyfunction!(info, m)?,
        wrap_pyfunction!(die_with_supervisor, m)?,
        wrap_pyfunction!(load, m)?,
    ] {
        m.add_function(function)?;
    }
    Ok(())
}
