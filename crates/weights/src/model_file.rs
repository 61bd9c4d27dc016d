//! Reading a safetensors file without trusting it and without mapping it.
//!
//! The header is parsed with the safetensors crate's own types; then every tensor's byte range
//! is checked against the real file size and copied with `pread` in bounded chunks. No mmap of
//! the file: a file truncated under a mapping kills the reader with SIGBUS, while a short
//! `pread` is just an error naming the file.
//!
//! ```no_run
//! use forkless_weights::model_file::ModelFile;
//! let file = ModelFile::open("model.safetensors".as_ref()).unwrap();
//! let (arena, tensors) = file.layout();
//! let mut arena_bytes = vec![0u8; arena.size as usize];
//! file.copy_into(&tensors, |offset, bytes| {
//!     arena_bytes[offset as usize..][..bytes.len()].copy_from_slice(bytes);
//!     Ok(())
//! }).unwrap();
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use forkless_bus::host::ArenaError;
use forkless_bus::manifest::{ArenaDesc, Dtype, LayoutBuilder, TensorEntry};
use safetensors::tensor::{Metadata, TensorInfo};

/// Header length field plus the largest header safetensors itself accepts.
const MAX_HEADER: u64 = 100_000_000;
/// Copy granularity: bounded memory whatever the model size.
const CHUNK: usize = 8 << 20;

/// Why a weights file could not be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open weights file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error(
        "weights file {path} is {kind}, not a regular file: point [model] path (or reload-model) at a safetensors file"
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("weights file {path} is not a valid safetensors file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("weights file {path}: tensor {tensor:?} has dtype {dtype}, which forkless does not serve")]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
    #[error("cannot read weights file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot store weights of {path}: {source}")]
    Store { path: PathBuf, source: ArenaError },
    #[error("cannot put weights of {path} on the GPU: {source}")]
    Gpu { path: PathBuf, source: Box<crate::cuda_error::CudaError> },
}

struct FileTensor {
    dtype: Dtype,
    shape: Vec<u64>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// An opened, header-validated safetensors file.
pub struct ModelFile {
    path: PathBuf,
    file: File,
    /// Sorted by name, so the arena layout does not depend on header order.
    tensors: BTreeMap<String, FileTensor>,
}

impl ModelFile {
    /// Opens `path` and validates its header against the file's real size.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = open_regular(path)?;
        let corrupt = |reason: String| LoadError::Corrupt { path: path.into(), reason };
        let read = |source| LoadError::Read { path: path.into(), source };
        let file_len = file.metadata().map_err(read)?.len();
        let mut prefix = [0u8; 8];
        file.read_exact_at(&mut prefix, 0)
            .map_err(|_| corrupt(format!("file is {file_len} bytes, too short for a header")))?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(corrupt(format!("header length {header_len} does not fit in {file_len} bytes")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8).map_err(read)?;
        let metadata: Metadata = serde_json::from_slice(&header).map_err(|e| corrupt(format!("bad header: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            let tensor = Self::check_tensor(path, &name, info, data_start, file_len)?;
            tensors.insert(name, tensor);
        }
        Ok(ModelFile { path: path.into(), file, tensors })
    }

    fn check_tensor(
        path: &Path,
        name: &str,
        info: &TensorInfo,
        data_start: u64,
        file_len: u64,
    ) -> Result<FileTensor, LoadError> {
        let dtype = convert_dtype(info.dtype).ok_or_else(|| LoadError::UnsupportedDtype {
            path: path.into(),
            tensor: name.into(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
        let expected = shape.iter().try_fold(dtype.size(), |acc, &d| acc.checked_mul(d));
        let (start, end) = match (data_start.checked_add(start), data_start.checked_add(end)) {
            (Some(start), Some(end)) => (start, end),
            _ => (u64::MAX, u64::MAX),
        };
        if end < start || Some(end - start) != expected || end > file_len {
            return Err(LoadError::Corrupt {
                path: path.into(),
                reason: format!("tensor {name:?} claims bytes {start}..{end} of a {file_len}-byte file"),
            });
        }
        Ok(FileTensor { dtype, shape, start, end })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One arena holding every tensor, at aligned offsets, in name order.
    pub fn layout(&self) -> (ArenaDesc, Vec<TensorEntry>) {
        let mut layout = LayoutBuilder::default();
        for (name, t) in &self.tensors {
            layout.push(name.clone(), t.dtype, t.shape.clone());
        }
        layout.finish()
    }

    /// `(file_offset, arena_offset, len)` of every tensor of `layout`: what a bulk copy (the
    /// GPU upload) reads from [`Self::file`] and where it puts it.
    pub fn pieces(&self, layout: &[TensorEntry]) -> Vec<(u64, u64, u64)> {
        layout
            .iter()
            .filter_map(|entry| self.tensors.get(&entry.name).map(|t| (t.start, entry.offset, t.end - t.start)))
            .collect()
    }

    /// The open file (read with `pread`, never mapped: a file truncated under a mapping
    /// would kill the reader with SIGBUS).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Copies every tensor of `layout` into the arena through `write(arena_offset, bytes)`.
    pub fn copy_into(
        &self,
        layout: &[TensorEntry],
        mut write: impl FnMut(u64, &[u8]) -> Result<(), ArenaError>,
    ) -> Result<(), LoadError> {
        let mut buf = vec![0u8; CHUNK];
        for entry in layout {
            let Some(t) = self.tensors.get(&entry.name) else {
                continue;
            };
            let mut done = 0;
            while t.start + done < t.end {
                let n = (t.end - t.start - done).min(CHUNK as u64) as usize;
                self.file
                    .read_exact_at(&mut buf[..n], t.start + done)
                    .map_err(|source| LoadError::Read { path: self.path.clone(), source })?;
                write(entry.offset + done, &buf[..n])
                    .map_err(|source| LoadError::Store { path: self.path.clone(), source })?;
                done += n as u64;
            }
        }
        Ok(())
    }
}

/// Opens `path` for reading only if it is a regular file. A FIFO would block `open` until some
/// writer shows up (forever, as far as a supervisor's start timeout can tell), and a device
/// or a directory is no model either. The path is checked first, then opened non-blocking (so
/// a FIFO swapped in meanwhile cannot block us), and the opened descriptor checked again: that
/// check is the one that counts, since the path may change between the two.
fn open_regular(path: &Path) -> Result<File, LoadError> {
    let open_error = |source| LoadError::Open { path: path.into(), source };
    let not_regular = |mode| LoadError::NotRegular { path: path.into(), kind: file_kind(mode) };
    let stat = rustix::fs::stat(path).map_err(|e| open_error(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(not_regular(stat.st_mode));
    }
    use rustix::fs::OFlags;
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::open(path, flags, rustix::fs::Mode::empty()).map_err(|e| open_error(e.into()))?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| open_error(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(not_regular(stat.st_mode));
    }
    rustix::fs::fcntl_setfl(&fd, OFlags::empty()).map_err(|e| open_error(e.into()))?;
    Ok(File::from(fd))
}

/// What a file that is not a regular file is, for the error message.
pub fn file_kind(mode: rustix::fs::RawMode) -> &'static str {
    use rustix::fs::FileType;
    match FileType::from_raw_mode(mode) {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Symlink => "a symbolic link",
        FileType::Unknown => "not a file",
    }
}

fn convert_dtype(dtype: safetensors::Dtype) -> Option<Dtype> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::F64 => Dtype::F64,
        S::F32 => Dtype::F32,
        S::F16 => Dtype::F16,
        S::BF16 => Dtype::BF16,
        S::I64 => Dtype::I64,
        S::I32 => Dtype::I32,
        S::I16 => Dtype::I16,
        S::I8 => Dtype::I8,
        S::U8 => Dtype::U8,
        S::BOOL => Dtype::Bool,
        _ => return None,
    })
}

/// Writes f32 tensors to a safetensors file (used to make example and test models).
pub fn write_f32_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<(), LoadError> {
    let views = tensors.iter().map(|(name, shape, data)| {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes);
        (name.to_string(), view.expect("shape matches data"))
    });
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| LoadError::Read { path: path.into(), source: std::io::Error::other(e.to_string()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(dir: &Path) -> PathBuf {
        let path = dir.join("m.safetensors");
        let w: Vec<f32> = (0..12).map(|i| i as f32).collect();
        write_f32_safetensors(&path, &[("weight", vec![3, 4], &w), ("bias", vec![3], &[1.0, 2.0, 3.0])]).unwrap();
        path
    }

    #[test]
    fn loads_tensors_in_name_order_at_aligned_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let file = ModelFile::open(&model(dir.path())).unwrap();
        let (arena, tensors) = file.layout();
        assert_eq!(tensors[0].name, "bias");
        assert_eq!(tensors[1].offset, 256);
        let mut bytes = vec![0u8; arena.size as usize];
        file.copy_into(&tensors, |off, b| {
            bytes[off as usize..][..b.len()].copy_from_slice(b);
            Ok(())
        })
        .unwrap();
        let w: &[f32] = bytemuck::cast_slice(&bytes[256..256 + 48]);
        assert_eq!(w[11], 11.0);
    }

    #[test]
    fn missing_truncated_and_garbage_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.safetensors");
        let err = ModelFile::open(&missing).err().unwrap();
        assert!(matches!(err, LoadError::Open { .. }) && err.to_string().contains("nope.safetensors"));

        let path = model(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 4).unwrap();
        let err = ModelFile::open(&path).err().unwrap();
        assert!(matches!(err, LoadError::Corrupt { .. }), "{err}");

        std::fs::write(&path, b"this is not a model at all").unwrap();
        let err = ModelFile::open(&path).err().unwrap();
        assert!(matches!(err, LoadError::Corrupt { .. }) && err.to_string().contains("m.safetensors"));
    }

    /// A FIFO without a writer used to block `open` forever; now it is refused at once, named.
    #[test]
    fn fifos_directories_and_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.safetensors");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        for (path, kind) in [(fifo.as_path(), "FIFO"), (dir.path(), "directory"), (Path::new("/dev/zero"), "device")] {
            let err = ModelFile::open(path).err().unwrap();
            assert!(matches!(err, LoadError::NotRegular { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains(&path.display().to_string()) && text.contains(kind), "{text}");
            assert!(text.contains("[model] path"), "{text}");
        }
    }
}
