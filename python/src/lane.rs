//! The batch lane from Python (`[lane] enabled = true`, docs/LANE.md), the pass's side: a
//! request submits its input with `Generation.submit(bytes)` ([`crate::submit`]); the
//! service's pass, declared with `forkless.lane_pass(run)`, answers a batch of requests from
//! every worker at once: `run(generation, inputs: Inputs) -> list[bytes | Exception]`, where
//! [`Inputs`] is a sequence of bytes that also gives all of them as one (`joined()`).
//!
//! Where the pass runs: on the worker crate's pass-runner thread, one per generation, as in a
//! Rust worker ([`forkless_worker::lane`]). That thread first waits for the worker to be ready
//! (the launchers call `ready()` once the app is imported), so a pass never runs in a
//! half-imported app, then asks the package for the declared pass (none: this worker only
//! submits). It takes the GIL for each pass only.
//!
//! The generation: each pass gets it anew, made from a `Weak` the runner's `Arc` outlives. The
//! runner ends once it is the generation's last holder (a hot swap moved on), so a pass must
//! keep neither the generation nor an array of it after it returns: the old weights would stay
//! mapped, and this worker's runner would run on.

use std::sync::{Arc, Weak};
use std::time::Duration;

use forkless_worker::lane::{Batch, MakeSharedPass, PassFn};
use forkless_worker::Generation;
use pyo3::exceptions::PyBaseException;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyList};

use crate::generation::PyGeneration;

/// How often a runner waiting for the app checks whether its generation is still wanted.
const READY_POLL: Duration = Duration::from_millis(200);

/// Waits at most the given time for the worker to be ready; true if it is.
pub type WaitReady = Box<dyn Fn(Duration) -> bool + Send + Sync>;

/// The package's `forkless._core._lane_pass` (`() -> run | None`, the pass the app declared),
/// and how to wait for the worker to be ready.
pub struct PythonPass {
    declared: Py<PyAny>,
    wait_ready: WaitReady,
}

impl PythonPass {
    pub fn new(declared: Py<PyAny>, wait_ready: WaitReady) -> Self {
        PythonPass { declared, wait_ready }
    }

    /// As the worker crate's pass factory.
    pub fn into_factory(self) -> Box<MakeSharedPass> {
        Box::new(move |generation| self.make(generation))
    }

    /// The worker crate's pass factory ([`MakeSharedPass`]), on the runner thread of
    /// `generation`.
    fn make(&self, generation: &Arc<Generation>) -> Result<Option<PassFn>, String> {
        while !(self.wait_ready)(READY_POLL) {
            if Arc::strong_count(generation) == 1 {
                return Ok(None); // swapped out before the app was loaded
            }
        }
        let run = Python::try_attach(|py| -> PyResult<Option<Py<PyAny>>> {
            let run = self.declared.bind(py).call0()?;
            Ok((!run.is_none()).then(|| run.unbind()))
        })
        .ok_or("the Python interpreter is shutting down")?
        .map_err(|e| format!("cannot get the lane pass from forkless._core: {e}"))?;
        let Some(run) = run else { return Ok(None) };
        let generation = Arc::downgrade(generation);
        Ok(Some(Box::new(move |_: &Generation, batch: &mut Batch<'_>| run_pass(&run, &generation, batch))))
    }
}

fn run_pass(run: &Py<PyAny>, generation: &Weak<Generation>, batch: &mut Batch<'_>) {
    let Some(generation) = generation.upgrade() else {
        return fail_all(batch, "the generation was unmapped before its pass");
    };
    let number = generation.number();
    let Some(outcome) = Python::try_attach(|py| call(py, run, generation, batch)) else {
        // The process is exiting (a drain, a recycle). These requests are other workers' too:
        // unwinding lets go of the lease, and the next holder puts this batch back in the
        // queue, as after a crash, instead of failing it. This runner thread ends here.
        panic!("lane pass of generation {number}: the Python interpreter is shutting down; the batch goes back to the queue");
    };
    if let Err(PassFailure { reason, detail }) = outcome {
        tracing::error!(generation = number, "lane pass of {} requests failed: {reason}\n{detail}", batch.len());
        fail_all(batch, &reason);
    }
}

/// Why a whole pass failed: `reason` goes to every request of it (the lane keeps its first 64
/// bytes, so it starts with what went wrong), `detail` (a traceback) to this worker's log.
struct PassFailure {
    reason: String,
    detail: String,
}

impl From<String> for PassFailure {
    fn from(reason: String) -> Self {
        PassFailure { reason, detail: String::new() }
    }
}

/// One pass in Python: every request answered, or `Err` for the whole batch.
fn call(
    py: Python<'_>,
    run: &Py<PyAny>,
    generation: Arc<Generation>,
    batch: &mut Batch<'_>,
) -> Result<(), PassFailure> {
    let python = |e: PyErr| PassFailure {
        detail: e.traceback(py).and_then(|t| t.format().ok()).unwrap_or_default(),
        reason: e.to_string(),
    };
    let inputs = Py::new(py, Inputs::of(py, batch).map_err(python)?).map_err(python)?;
    let generation = Py::new(py, PyGeneration { inner: generation }).map_err(python)?;
    let outputs = run.bind(py).call1((generation, inputs)).map_err(python)?;
    let outputs: Vec<Bound<'_, PyAny>> = outputs
        .extract()
        .map_err(|_| format!("pass returned a {}, not a list, one output per input", type_name(&outputs)))?;
    if outputs.len() != batch.len() {
        return Err(format!("pass returned {} outputs for {} inputs", outputs.len(), batch.len()).into());
    }
    for (i, output) in outputs.iter().enumerate() {
        answer(batch, i, output);
    }
    Ok(())
}

/// A pass's inputs, oldest first: a sequence of bytes (`len`, `[i]`, iteration), copied out of
/// the lane once, into one bytes object, which `joined()` returns as it is: so
/// `np.frombuffer(inputs.joined(), np.float32).reshape(len(inputs), -1)` is the batch as one
/// array, with no further copy and no Python loop over the requests.
#[pyclass(frozen, name = "Inputs", module = "forkless._native", sequence)]
pub struct Inputs {
    joined: Py<PyBytes>,
    /// (start, end) of each input in `joined`.
    spans: Vec<(usize, usize)>,
}

impl Inputs {
    fn of(py: Python<'_>, batch: &Batch<'_>) -> PyResult<Inputs> {
        let mut spans = Vec::with_capacity(batch.len());
        let mut end = 0;
        for i in 0..batch.len() {
            let len = batch.input(i).len();
            spans.push((end, end + len));
            end += len;
        }
        let joined = PyBytes::new_with(py, end, |buffer| {
            for (i, &(start, end)) in spans.iter().enumerate() {
                buffer[start..end].copy_from_slice(batch.input(i));
            }
            Ok(())
        })?;
        Ok(Inputs { joined: joined.unbind(), spans })
    }

    fn item<'py>(&self, py: Python<'py>, i: usize) -> Bound<'py, PyBytes> {
        let (start, end) = self.spans[i];
        PyBytes::new(py, &self.joined.as_bytes(py)[start..end])
    }
}

#[pymethods]
impl Inputs {
    fn __len__(&self) -> usize {
        self.spans.len()
    }

    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyBytes>> {
        let len = self.spans.len() as isize;
        let i = if index < 0 { index + len } else { index };
        if !(0..len).contains(&i) {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!("input {index} of a pass of {len} inputs")));
        }
        Ok(self.item(py, i as usize))
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let items = PyList::new(py, (0..self.spans.len()).map(|i| self.item(py, i)))?;
        Ok(items.try_iter()?.into_any())
    }

    /// Every input, one after the other, in one bytes object (no copy).
    fn joined(&self, py: Python<'_>) -> Py<PyBytes> {
        self.joined.clone_ref(py)
    }

    /// The length of each input, in bytes.
    fn sizes(&self) -> Vec<usize> {
        self.spans.iter().map(|(start, end)| end - start).collect()
    }

    fn __repr__(&self) -> String {
        format!("<forkless lane inputs: {} requests, {} bytes>", self.spans.len(), self.spans.last().map_or(0, |s| s.1))
    }
}

/// Request `i`'s answer: bytes, or an exception that fails this request alone.
fn answer(batch: &mut Batch<'_>, i: usize, output: &Bound<'_, PyAny>) {
    if let Ok(bytes) = output.extract::<PyBackedBytes>() {
        if let Err(too_large) = batch.set_output(i, &bytes) {
            let (len, capacity) = (too_large.len, too_large.capacity);
            batch.fail(i, &format!("answer of {len} bytes > [lane] output_bytes = {capacity}"));
        }
    } else if output.is_instance_of::<PyBaseException>() {
        let reason = output.str().map(|s| s.to_string()).unwrap_or_else(|_| type_name(output));
        batch.fail(i, &format!("{}: {reason}", type_name(output)));
    } else {
        batch.fail(i, &format!("pass answered with a {}, not bytes or an exception", type_name(output)));
    }
}

fn type_name(object: &Bound<'_, PyAny>) -> String {
    object.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "object".into())
}

fn fail_all(batch: &mut Batch<'_>, reason: &str) {
    for i in 0..batch.len() {
        batch.fail(i, reason);
    }
}
