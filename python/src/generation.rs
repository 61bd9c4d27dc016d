//! The Python classes over an attached generation: `Generation` (names, dtypes, shapes, one
//! `Tensor` per name) and `Tensor`, a DLPack producer (`__dlpack__`, `__dlpack_device__`) that
//! numpy and torch turn into zero-copy, read-only arrays and tensors; and `Candidate`, what an
//! acceptance check sees of a generation it decides on (names, dtypes, shapes: no values).

use std::sync::Arc;

use forkless_bus::Dtype;
use forkless_worker::Generation;
use pyo3::exceptions::{PyBufferError, PyKeyError, PyValueError};
use pyo3::prelude::*;

use crate::dlpack::{self, Described, DlDataType, DlDevice, DEVICE_CPU, DEVICE_CUDA};

/// numpy/torch-style name and DLPack type of a dtype.
pub fn dtype_info(dtype: Dtype) -> (&'static str, DlDataType) {
    let (name, code, bits) = match dtype {
        Dtype::F64 => ("float64", 2, 64),
        Dtype::F32 => ("float32", 2, 32),
        Dtype::F16 => ("float16", 2, 16),
        Dtype::BF16 => ("bfloat16", 4, 16),
        Dtype::I64 => ("int64", 0, 64),
        Dtype::I32 => ("int32", 0, 32),
        Dtype::I16 => ("int16", 0, 16),
        Dtype::I8 => ("int8", 0, 8),
        Dtype::U8 => ("uint8", 1, 8),
        Dtype::Bool => ("bool", 6, 8),
    };
    (name, DlDataType { code, bits, lanes: 1 })
}

/// The weights of one generation, read-only and mapped into this process for as long as this
/// object, or any array or tensor made from it, is alive.
#[pyclass(frozen, name = "Generation", module = "forkless._native")]
pub struct PyGeneration {
    pub inner: Arc<Generation>,
}

impl PyGeneration {
    fn device(&self) -> DlDevice {
        device_of(&self.inner)
    }
}

/// The DLPack device of a generation's tensors.
fn device_of(generation: &Generation) -> DlDevice {
    match generation.gpu() {
        Some(gpu) if generation.on_gpu() => DlDevice { device_type: DEVICE_CUDA, device_id: gpu.ordinal() as i32 },
        _ => DlDevice { device_type: DEVICE_CPU, device_id: 0 },
    }
}

fn backend_of(generation: &Generation) -> &'static str {
    if generation.on_gpu() {
        "cuda"
    } else {
        "host"
    }
}

/// `[(name, dtype, shape)]` of a generation, in arena order.
fn tensor_list(generation: &Generation) -> Vec<(String, &'static str, Vec<u64>)> {
    generation.manifest().tensors.iter().map(|t| (t.name.clone(), dtype_info(t.dtype).0, t.shape.clone())).collect()
}

#[pymethods]
impl PyGeneration {
    /// The generation number (1, 2, … as hot swaps publish them; 0 for a file loaded privately).
    #[getter]
    fn number(&self) -> u64 {
        self.inner.number()
    }

    /// "cuda" when the weights are in GPU memory, else "host".
    #[getter]
    fn backend(&self) -> &'static str {
        backend_of(&self.inner)
    }

    /// The DLPack device of its tensors: (1, 0) for the CPU, (2, N) for GPU N.
    #[getter]
    fn dlpack_device(&self) -> (i32, i32) {
        let device = self.device();
        (device.device_type, device.device_id)
    }

    /// Where the weights came from (the safetensors file the owner loaded).
    #[getter]
    fn source(&self) -> String {
        self.inner.manifest().source.clone()
    }

    /// `[(name, dtype, shape)]` in arena order.
    fn tensors(&self) -> Vec<(String, &'static str, Vec<u64>)> {
        tensor_list(&self.inner)
    }

    /// What an acceptance check sees of this generation (see `Candidate`).
    fn candidate(&self) -> PyCandidate {
        PyCandidate::of(&self.inner)
    }

    /// The DLPack producer of tensor `name` (KeyError if there is none).
    fn tensor(&self, name: &str) -> PyResult<PyTensor> {
        let entry = self.inner.manifest().tensor(name).ok_or_else(|| {
            PyKeyError::new_err(format!("generation {} has no tensor named {name:?}", self.inner.number()))
        })?;
        let device = self.device();
        let data = if device.device_type == DEVICE_CUDA {
            self.inner.device_address(name)
        } else {
            self.inner.bytes(name).map(|bytes| bytes.as_ptr() as u64)
        }
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let shape = entry.shape.iter().map(|&d| d as i64).collect();
        Ok(PyTensor {
            generation: self.inner.clone(),
            name: name.to_string(),
            dtype: entry.dtype,
            nbytes: entry.len,
            described: Described { data, device, dtype: dtype_info(entry.dtype).1, shape },
        })
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.manifest().tensor(name).is_some()
    }

    fn __len__(&self) -> usize {
        self.inner.manifest().tensors.len()
    }

    /// True when the service runs a batch lane (`[lane] enabled = true`): see `submit`.
    #[getter]
    fn has_lane(&self) -> bool {
        self.inner.lane().is_some()
    }

    /// Queues `data` (bytes) on this generation's batch lane and waits, without the GIL, at most
    /// `timeout` seconds for its answer (bytes), computed by whichever worker runs the next pass
    /// (`forkless.lane_pass`). Raises LaneError (the pass failed it: the message says why),
    /// LaneFull (every slot in use: shed load), TimeoutError or ValueError (too large).
    #[pyo3(signature = (data, timeout=30.0))]
    fn submit<'py>(
        &self,
        py: Python<'py>,
        data: pyo3::pybacked::PyBackedBytes,
        timeout: f64,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        crate::submit::submit(py, &self.inner, &data, timeout)
    }

    /// True when both objects refer to the same mapped generation.
    fn same_as(&self, other: &PyGeneration) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn __repr__(&self) -> String {
        format!(
            "<forkless generation {} ({}, {} tensors, from {})>",
            self.inner.number(),
            self.backend(),
            self.__len__(),
            self.inner.manifest().source
        )
    }
}

/// What an acceptance check sees of a generation it decides on: its number, its source, where
/// its tensors live, and each tensor's name, dtype and shape; not the values. The check runs
/// on a generation the worker crate lends for the length of the call (a hot swap's offer, which
/// may yet be aborted and unmapped), so nothing that outlives the call may point into it: this
/// is a copy of the metadata, the same at attach and at a swap.
#[pyclass(frozen, name = "Candidate", module = "forkless._native")]
pub struct PyCandidate {
    number: u64,
    source: String,
    backend: &'static str,
    device: DlDevice,
    tensors: Vec<(String, &'static str, Vec<u64>)>,
}

impl PyCandidate {
    /// Copies the metadata of `generation` (no GIL needed).
    pub fn of(generation: &Generation) -> Self {
        PyCandidate {
            number: generation.number(),
            source: generation.manifest().source.clone(),
            backend: backend_of(generation),
            device: device_of(generation),
            tensors: tensor_list(generation),
        }
    }
}

#[pymethods]
impl PyCandidate {
    #[getter]
    fn number(&self) -> u64 {
        self.number
    }

    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    #[getter]
    fn dlpack_device(&self) -> (i32, i32) {
        (self.device.device_type, self.device.device_id)
    }

    #[getter]
    fn source(&self) -> String {
        self.source.clone()
    }

    /// `[(name, dtype, shape)]` in arena order.
    fn tensors(&self) -> Vec<(String, &'static str, Vec<u64>)> {
        self.tensors.clone()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.tensors.iter().any(|(n, _, _)| n == name)
    }

    fn __len__(&self) -> usize {
        self.tensors.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<forkless candidate generation {} ({}, {} tensors, from {})>",
            self.number,
            self.backend,
            self.tensors.len(),
            self.source
        )
    }
}

/// One tensor of a generation as a DLPack producer: `numpy.from_dlpack(t)`,
/// `torch.from_dlpack(t)`. Each export holds the generation mapped until its consumer lets go.
#[pyclass(frozen, name = "Tensor", module = "forkless._native")]
pub struct PyTensor {
    generation: Arc<Generation>,
    name: String,
    dtype: Dtype,
    nbytes: u64,
    described: Described,
}

#[pymethods]
impl PyTensor {
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_info(self.dtype).0
    }

    #[getter]
    fn shape(&self) -> Vec<i64> {
        self.described.shape.clone()
    }

    #[getter]
    fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// The address of element 0 (host or device memory).
    #[getter]
    fn data_ptr(&self) -> u64 {
        self.described.data
    }

    #[getter]
    fn generation(&self) -> u64 {
        self.generation.number()
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (self.described.device.device_type, self.described.device.device_id)
    }

    /// The DLPack protocol (array API 2023.12). The memory is never written after the owner
    /// published it and is mapped read-only here, so any stream may read it without
    /// synchronising; `copy=True` and other devices are refused (BufferError).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let device = self.described.device;
        if let Some((kind, id)) = dl_device {
            if (kind, id) != (device.device_type, device.device_id) {
                return Err(PyBufferError::new_err(format!(
                    "tensor {:?} lives on DLPack device {:?} and cannot be exported to {:?} without a copy: \
                     take it where it is and copy it there",
                    self.name,
                    (device.device_type, device.device_id),
                    (kind, id)
                )));
            }
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err(format!(
                "tensor {:?} is shared, read-only memory exported without a copy; copy=True is not supported: \
                 export it, then copy the result",
                self.name
            )));
        }
        if let Some(stream) = stream.filter(|s| !s.is_none()) {
            if device.device_type == DEVICE_CPU {
                return Err(PyBufferError::new_err("a CPU tensor takes no stream (stream must be None)"));
            }
            if stream.extract::<i64>()? == 0 {
                return Err(PyValueError::new_err(
                    "stream 0 is ambiguous in DLPack: pass 1 for CUDA's legacy default stream",
                ));
            }
        }
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        dlpack::export(py, self.generation.clone(), &self.described, versioned)
    }

    fn __repr__(&self) -> String {
        format!(
            "<forkless tensor {:?} {} {:?} of generation {}>",
            self.name,
            dtype_info(self.dtype).0,
            self.described.shape,
            self.generation.number()
        )
    }
}
