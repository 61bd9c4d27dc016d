//! DLPack 1.0 export: the one place in this crate that speaks C to Python consumers.
//!
//! [`export`] wraps a tensor of an attached generation in a PyCapsule that numpy
//! (`numpy.from_dlpack`) and torch (`torch.from_dlpack`) consume without a copy:
//! - asked with `max_version >= (1, 0)`: a `DLManagedTensorVersioned` in a capsule named
//!   `dltensor_versioned`, flagged `DLPACK_FLAG_BITMASK_READ_ONLY`;
//! - asked without (`max_version=None`, an older consumer): the legacy `DLManagedTensor` in a
//!   capsule named `dltensor` (it has no flags; numpy >= 2.2.5 makes such arrays read-only).
//!
//! Ownership follows the DLPack rules. The managed tensor owns an `Arc<Generation>`, so the
//! weights stay mapped while any consumer holds the tensor; its `deleter` drops that reference
//! (from any thread, without the GIL: it only drops Rust data). A consumer renames the capsule
//! to `used_dltensor[_versioned]` and calls the deleter when done; a capsule never consumed
//! calls it from its own destructor.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use forkless_worker::Generation;
use pyo3::ffi;
use pyo3::prelude::*;

/// `kDLCPU`
pub const DEVICE_CPU: i32 = 1;
/// `kDLCUDA`
pub const DEVICE_CUDA: i32 = 2;
/// `DLPACK_FLAG_BITMASK_READ_ONLY`
const FLAG_READ_ONLY: u64 = 1;

const VERSIONED: &CStr = c"dltensor_versioned";
const LEGACY: &CStr = c"dltensor";

/// `DLDevice`
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DlDevice {
    pub device_type: i32,
    pub device_id: i32,
}

/// `DLDataType`: type code (`kDLInt` 0, `kDLUInt` 1, `kDLFloat` 2, `kDLBfloat` 4, `kDLBool`
/// 6), bits, lanes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DlDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

/// `DLTensor`
#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

/// `DLPackVersion`
#[repr(C)]
struct DlPackVersion {
    major: u32,
    minor: u32,
}

/// `DLManagedTensorVersioned` (DLPack >= 1.0)
#[repr(C)]
struct ManagedVersioned {
    version: DlPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut ManagedVersioned)>,
    flags: u64,
    dl_tensor: DlTensor,
}

/// `DLManagedTensor` (DLPack < 1.0)
#[repr(C)]
struct ManagedLegacy {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut ManagedLegacy)>,
}

/// What one export keeps alive: the managed struct handed to the consumer (first, so a
/// pointer to it is a pointer to the whole), the shape and strides it points into, and the
/// generation that keeps the memory mapped.
#[repr(C)]
struct Export<M> {
    managed: M,
    shape: Box<[i64]>,
    strides: Box<[i64]>,
    _generation: Arc<Generation>,
}

/// A tensor to export: where it is and what it looks like.
#[derive(Debug, Clone)]
pub struct Described {
    pub data: u64,
    pub device: DlDevice,
    pub dtype: DlDataType,
    pub shape: Vec<i64>,
}

/// Row-major strides in elements.
fn contiguous_strides(shape: &[i64]) -> Box<[i64]> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides.into_boxed_slice()
}

unsafe extern "C" fn delete_versioned(managed: *mut ManagedVersioned) {
    if managed.is_null() {
        return;
    }
    // SAFETY: `managed` is the first field of an `Export<ManagedVersioned>` that `export` leaked
    // with `Box::into_raw` and stored in `manager_ctx`; DLPack calls the deleter exactly once
    // (the consumer when done, or the capsule destructor if never consumed), so this is the
    // only reclaim of that box.
    drop(unsafe { Box::from_raw((*managed).manager_ctx as *mut Export<ManagedVersioned>) });
}

unsafe extern "C" fn delete_legacy(managed: *mut ManagedLegacy) {
    if managed.is_null() {
        return;
    }
    // SAFETY: as in `delete_versioned`, for the legacy struct.
    drop(unsafe { Box::from_raw((*managed).manager_ctx as *mut Export<ManagedLegacy>) });
}

/// Capsule destructor: a capsule that still carries its unused name was never consumed, so the
/// tensor is still ours to delete; a consumed one (renamed `used_…`) belongs to its consumer.
unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: CPython calls this with the capsule being destroyed, holding the GIL. The
    // IsValid checks set no error; GetPointer is only called with the name just validated,
    // so it cannot fail; the error indicator is saved and restored around the whole body, as
    // a destructor may run while an exception is being raised.
    unsafe {
        let (mut kind, mut value, mut trace) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
        ffi::PyErr_Fetch(&mut kind, &mut value, &mut trace);
        if ffi::PyCapsule_IsValid(capsule, VERSIONED.as_ptr()) == 1 {
            let managed = ffi::PyCapsule_GetPointer(capsule, VERSIONED.as_ptr()) as *mut ManagedVersioned;
            if let Some(deleter) = managed.as_ref().and_then(|m| m.deleter) {
                deleter(managed);
            }
        } else if ffi::PyCapsule_IsValid(capsule, LEGACY.as_ptr()) == 1 {
            let managed = ffi::PyCapsule_GetPointer(capsule, LEGACY.as_ptr()) as *mut ManagedLegacy;
            if let Some(deleter) = managed.as_ref().and_then(|m| m.deleter) {
                deleter(managed);
            }
        }
        ffi::PyErr_Restore(kind, value, trace);
    }
}

/// The `DLTensor` of `tensor`, pointing at shape and strides arrays of `tensor.shape.len()`
/// elements (null until the export that owns them is in place).
fn dl_tensor(tensor: &Described, shape: *mut i64, strides: *mut i64) -> DlTensor {
    DlTensor {
        data: tensor.data as *mut c_void,
        device: tensor.device,
        ndim: tensor.shape.len() as i32,
        dtype: tensor.dtype,
        shape,
        strides,
        byte_offset: 0,
    }
}

/// A DLPack capsule for `tensor`, which lives in `generation`: versioned and read-only when
/// the consumer understands DLPack 1.x, legacy otherwise.
pub fn export<'py>(
    py: Python<'py>,
    generation: Arc<Generation>,
    tensor: &Described,
    versioned: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let shape: Box<[i64]> = tensor.shape.clone().into_boxed_slice();
    let strides = contiguous_strides(&shape);
    if versioned {
        let export = Box::new(Export {
            managed: ManagedVersioned {
                version: DlPackVersion { major: 1, minor: 0 },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_versioned),
                flags: FLAG_READ_ONLY,
                dl_tensor: dl_tensor(tensor, std::ptr::null_mut(), std::ptr::null_mut()),
            },
            shape,
            strides,
            _generation: generation,
        });
        let raw = Box::into_raw(export);
        // SAFETY: `raw` is a valid, uniquely owned Export that we just leaked. Pointing the
        // managed struct at the boxed shape/strides is sound: boxed slices do not move when the
        // Export does not, and they live exactly as long as the Export. From here on the box is
        // reclaimed only by the deleter (directly below if the capsule cannot be made).
        unsafe {
            let e = &mut *raw;
            e.managed.manager_ctx = raw as *mut c_void;
            e.managed.dl_tensor = dl_tensor(tensor, e.shape.as_mut_ptr(), e.strides.as_mut_ptr());
        }
        capsule(py, raw as *mut c_void, VERSIONED, || {
            // SAFETY: the capsule was not created, so nothing else refers to `raw`.
            unsafe { delete_versioned(raw as *mut ManagedVersioned) }
        })
    } else {
        let export = Box::new(Export {
            managed: ManagedLegacy {
                dl_tensor: dl_tensor(tensor, std::ptr::null_mut(), std::ptr::null_mut()),
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_legacy),
            },
            shape,
            strides,
            _generation: generation,
        });
        let raw = Box::into_raw(export);
        // SAFETY: as in the versioned branch.
        unsafe {
            let e = &mut *raw;
            e.managed.manager_ctx = raw as *mut c_void;
            e.managed.dl_tensor = dl_tensor(tensor, e.shape.as_mut_ptr(), e.strides.as_mut_ptr());
        }
        capsule(py, raw as *mut c_void, LEGACY, || {
            // SAFETY: the capsule was not created, so nothing else refers to `raw`.
            unsafe { delete_legacy(raw as *mut ManagedLegacy) }
        })
    }
}

fn capsule<'py>(
    py: Python<'py>,
    pointer: *mut c_void,
    name: &'static CStr,
    on_failure: impl FnOnce(),
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: `pointer` is non-null and owned by the capsule from here on (its destructor or
    // the consumer deletes it); `name` is a 'static C string, as PyCapsule requires (it keeps
    // the pointer, not a copy). We hold the GIL (`py`).
    let raw = unsafe { ffi::PyCapsule_New(pointer, name.as_ptr(), Some(capsule_destructor)) };
    // SAFETY: `raw` is a new reference or null with an exception set, which is what
    // `from_owned_ptr_or_err` expects.
    let made = unsafe { Bound::from_owned_ptr_or_err(py, raw) };
    if made.is_err() {
        on_failure();
    }
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_are_row_major_in_elements() {
        assert_eq!(&*contiguous_strides(&[4, 3, 2]), &[6, 2, 1]);
        assert_eq!(&*contiguous_strides(&[7]), &[1]);
        assert!(contiguous_strides(&[]).is_empty());
        assert_eq!(&*contiguous_strides(&[0, 5]), &[5, 1]);
    }

    #[test]
    fn structs_have_the_c_layout() {
        // dlpack.h on x86_64: DLTensor 48 bytes; DLManagedTensorVersioned 80, DLManagedTensor 64.
        assert_eq!(std::mem::size_of::<DlTensor>(), 48);
        assert_eq!(std::mem::size_of::<ManagedVersioned>(), 80);
        assert_eq!(std::mem::offset_of!(ManagedVersioned, flags), 24);
        assert_eq!(std::mem::offset_of!(ManagedVersioned, dl_tensor), 32);
        assert_eq!(std::mem::size_of::<ManagedLegacy>(), 64);
    }
}
