//! Python acceptance checks, run where a Rust worker runs its own: in the worker crate's
//! [`Acceptance`] hook, on the link thread, at attach and on every hot swap's offer. So the
//! supervisor hears a Python service's verdict before it commits a swap: a refusal aborts it
//! everywhere and `supervisor reload-model` fails with the check's reason.
//!
//! GIL discipline: the link thread takes the GIL only for the call itself (the candidate's
//! metadata is copied before), and holds no lock of its own meanwhile. Python threads release
//! the GIL whenever they wait on the link (`wait`, `ready`, `wait_for_change`), so a check that
//! needs the GIL can always get it. A check must not wait on the link itself: the link guards
//! its calls against being made from its own thread ([`crate::link::Link::wait`]).

use forkless_worker::{Acceptance, Generation};
use pyo3::prelude::*;

use crate::generation::PyCandidate;

/// A Python callable `check(candidate) -> None | str`: None accepts, a string is the reason to
/// refuse. The package passes one dispatcher (`forkless._core._run_checks`) that runs every
/// check registered with `forkless.attach(accept=...)`.
pub struct PythonCheck {
    check: Py<PyAny>,
}

impl PythonCheck {
    pub fn new(check: Py<PyAny>) -> Self {
        PythonCheck { check }
    }

    fn call(&self, py: Python<'_>, number: u64, candidate: PyCandidate) -> Result<(), String> {
        let verdict = self.check.bind(py).call1((candidate,)).map_err(|e| {
            // The package's dispatcher turns exceptions into reasons itself; this is for a
            // callable passed to `_native.start` directly.
            let traceback = e.traceback(py).and_then(|t| t.format().ok()).unwrap_or_default();
            format!("the acceptance check raised {e} on generation {number}\n{traceback}")
        })?;
        if verdict.is_none() {
            return Ok(());
        }
        match verdict.str() {
            Ok(reason) => Err(reason.to_string()),
            Err(e) => Err(format!(
                "the acceptance check refused generation {number} with a reason that cannot be shown ({e})"
            )),
        }
    }
}

impl Acceptance for PythonCheck {
    fn check(&self, generation: &Generation) -> Result<(), String> {
        let (number, candidate) = (generation.number(), PyCandidate::of(generation));
        Python::try_attach(|py| self.call(py, number, candidate)).unwrap_or_else(|| {
            Err(format!("generation {number} cannot be checked: the Python interpreter is shutting down"))
        })
    }
}
