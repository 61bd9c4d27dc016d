//! `Generation.submit`: a request's side of the batch lane. It queues the input on the
//! generation's lane and waits, without the GIL, for the answer a pass (in any worker) gives it
//! ([`crate::lane`] is the pass's side). Also the exceptions it raises.

use std::time::Duration;

use forkless_worker::lane::{SubmitError, WaitError};
use forkless_worker::Generation;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(
    _native,
    LaneError,
    PyRuntimeError,
    "A request on the batch lane has no answer: the pass failed it (the message says why), or the lane is unusable."
);
create_exception!(
    _native,
    LaneFull,
    LaneError,
    "Every slot of the batch lane is in use: shed load (answer 503), or raise [lane] slots."
);

/// The longest `submit` may be told to wait.
const MAX_TIMEOUT_S: f64 = 86_400.0;

/// `Generation.submit`: queues `data` on the generation's lane and waits for the answer.
pub fn submit<'py>(
    py: Python<'py>,
    generation: &Generation,
    data: &[u8],
    timeout_s: f64,
) -> PyResult<Bound<'py, PyBytes>> {
    if !(timeout_s > 0.0 && timeout_s <= MAX_TIMEOUT_S) {
        return Err(PyValueError::new_err(format!("timeout must be in (0, {MAX_TIMEOUT_S}] seconds, not {timeout_s}")));
    }
    let lane = generation.lane().ok_or_else(|| {
        LaneError::new_err(format!(
            "generation {} has no batch lane: set [lane] enabled = true in the supervisor's config",
            generation.number()
        ))
    })?;
    let ticket = lane.submit(data).map_err(|e| match e {
        SubmitError::Full { .. } => LaneFull::new_err(e.to_string()),
        SubmitError::TooLarge { .. } => PyValueError::new_err(format!("{e} ([lane] input_bytes)")),
        other => LaneError::new_err(other.to_string()),
    })?;
    let timeout = Duration::from_secs_f64(timeout_s);
    let reply = py.detach(|| ticket.wait(timeout)).map_err(|e| match e {
        WaitError::TimedOut(_) => PyTimeoutError::new_err(format!(
            "{e}: is a lane pass declared (forkless.lane_pass) in the service's workers?"
        )),
        other => LaneError::new_err(other.to_string()),
    })?;
    Ok(PyBytes::new(py, &reply))
}
