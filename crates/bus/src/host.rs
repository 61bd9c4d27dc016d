//! The `host` memory kind: one sealed memfd per arena, mapped read-only by every reader.
//!
//! Why memfd and not POSIX shared memory (`shm_open`, the `shared_memory` crate): a memfd has
//! no name in `/dev/shm`, so a SIGKILLed process leaks nothing; its memory lives exactly as long
//! as some process holds an fd or a mapping. And it can be **sealed**: after
//! `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW` nobody, not even the creator, can change or
//! resize its contents, so readers may treat the bytes as immutable.
//!
//! Readers get a second, **read-only** open of the same memfd ([`SealedArena::read_only_fd`]),
//! and map it `PROT_READ`/`MAP_SHARED`. Three independent locks keep weights read-only:
//! the seal (no writable mapping or `write` is possible), the `O_RDONLY` file (the kernel never
//! grants `VM_MAYWRITE`, so `mprotect` cannot add write access), and `&[u8]` in Rust.
//!
//! ```
//! use forkless_bus::host::{ArenaMap, ArenaWriter};
//! let writer = ArenaWriter::create("example", 4096).unwrap();
//! writer.write_at(0, b"weights").unwrap();
//! let sealed = writer.seal().unwrap();
//! let map = ArenaMap::map(sealed.read_only_fd().unwrap(), 4096).unwrap();
//! assert_eq!(&map.bytes()[..7], b"weights");
//! ```

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use memmap2::{Mmap, MmapMut, MmapOptions};
use rustix::fs::{Mode, OFlags, SealFlags};

/// Seals every arena carries before it is published.
pub const REQUIRED_SEALS: SealFlags = SealFlags::WRITE.union(SealFlags::SHRINK).union(SealFlags::GROW);

/// Failure while building an arena.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error("cannot create memfd {name:?}: {source}")]
    Create { name: String, source: memfd::Error },
    #[error("cannot size memfd to {size} bytes: {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("write of {len} bytes at offset {offset} would end past the arena's {size} bytes")]
    OutOfBounds { offset: u64, len: usize, size: u64 },
    #[error("cannot write to memfd: {0}")]
    Write(std::io::Error),
    #[error("cannot seal memfd: {0}")]
    Seal(std::io::Error),
    #[error(
        "cannot seal memfd: the kernel still saw a writable mapping or a pinned page after {tries} tries \
         over {waited:?} (EBUSY); is another thread mapping the arena, or is the host under heavy memory pressure?"
    )]
    SealBusy { tries: u32, waited: std::time::Duration },
    #[error("cannot reopen memfd read-only through /proc/self/fd: {0}")]
    Reopen(std::io::Error),
}

/// Failure while mapping an arena received from another process.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("arena fd is not a sealed memfd (seals {found:?}, need WRITE|SHRINK|GROW): refusing mutable memory")]
    NotSealed { found: Option<SealFlags> },
    #[error("arena fd holds {actual} bytes but the manifest says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("arena fd is open for writing; readers must receive a read-only fd")]
    Writable,
    #[error("cannot map arena: {0}")]
    Mmap(std::io::Error),
    #[error("cannot inspect arena fd: {0}")]
    Stat(std::io::Error),
}

/// An arena being filled by its owner; becomes shareable only once sealed.
#[derive(Debug)]
pub struct ArenaWriter {
    file: File,
    size: u64,
}

impl ArenaWriter {
    /// Creates an anonymous, sealable, close-on-exec memfd of `size` bytes (zero-filled).
    pub fn create(name: &str, size: u64) -> Result<Self, ArenaError> {
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create(name)
            .map_err(|source| ArenaError::Create { name: name.into(), source })?;
        let file = memfd.into_file();
        file.set_len(size).map_err(|source| ArenaError::Resize { size, source })?;
        Ok(ArenaWriter { file, size })
    }

    /// Copies `bytes` into the arena at `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), ArenaError> {
        let end = offset.checked_add(bytes.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(ArenaError::OutOfBounds { offset, len: bytes.len(), size: self.size });
        }
        self.file.write_all_at(bytes, offset).map_err(ArenaError::Write)
    }

    /// Seals the contents for good (`WRITE | SHRINK | GROW`, then `SEAL` so no seal can be
    /// removed or added) and returns the shareable arena.
    ///
    /// `F_SEAL_WRITE` is refused with `EBUSY` while the kernel sees an extra reference on any
    /// page of the file (its "pinned" check waits only a moment): not only a writable mapping,
    /// but also a page that reclaim, compaction or migration holds for a while on a busy host.
    /// Seen in CI: an owner that had just written 256 MiB exited 78. The owner never maps the
    /// arena writable, so a busy answer is such a transient reference; it is retried with
    /// backoff for up to [`SEAL_PATIENCE`] (a refusal adds no seal, so a retry starts clean).
    pub fn seal(self) -> Result<SealedArena, ArenaError> {
        self.seal_within(SEAL_PATIENCE)
    }

    fn seal_within(self, patience: Duration) -> Result<SealedArena, ArenaError> {
        let seals = REQUIRED_SEALS.union(SealFlags::SEAL);
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut tries = 0;
        loop {
            tries += 1;
            match rustix::fs::fcntl_add_seals(&self.file, seals) {
                Ok(()) => return Ok(SealedArena { fd: self.file.into(), size: self.size }),
                Err(rustix::io::Errno::BUSY) => {
                    let waited = started.elapsed();
                    if waited >= patience {
                        return Err(ArenaError::SealBusy { tries, waited });
                    }
                    std::thread::sleep(pause.min(patience - waited));
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(ArenaError::Seal(e.into())),
            }
        }
    }
}

/// How long [`ArenaWriter::seal`] retries a seal the kernel answers with `EBUSY`.
pub const SEAL_PATIENCE: Duration = Duration::from_secs(5);

/// A sealed arena: immutable bytes behind a file descriptor.
#[derive(Debug)]
pub struct SealedArena {
    fd: OwnedFd,
    size: u64,
}

impl SealedArena {
    /// Adopts an fd received from another process after checking it is a sealed memfd of `size`.
    pub fn adopt(fd: OwnedFd, size: u64) -> Result<Self, MapError> {
        check_sealed(fd.as_fd(), size)?;
        Ok(SealedArena { fd, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A new `O_RDONLY` open of the same memfd, the only kind of fd handed to readers.
    pub fn read_only_fd(&self) -> Result<OwnedFd, ArenaError> {
        let path = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        rustix::fs::open(path.as_str(), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| ArenaError::Reopen(e.into()))
    }
}

fn check_sealed(fd: BorrowedFd<'_>, expected: u64) -> Result<(), MapError> {
    let seals = rustix::fs::fcntl_get_seals(fd).ok();
    if !seals.is_some_and(|s| s.contains(REQUIRED_SEALS)) {
        return Err(MapError::NotSealed { found: seals });
    }
    let actual = rustix::fs::fstat(fd).map_err(|e| MapError::Stat(e.into()))?.st_size as u64;
    if actual != expected {
        return Err(MapError::SizeMismatch { expected, actual });
    }
    Ok(())
}

/// Read-only bytes of an arena: a shared mapping of a sealed memfd, or a private copy
/// (the `sharing = none` baseline). Either way page-aligned, so typed views can cast it.
#[derive(Debug)]
pub struct ArenaMap {
    map: Mmap,
}

impl ArenaMap {
    /// Maps a read-only fd of a sealed memfd of `size` bytes, shared with every other reader.
    pub fn map(fd: OwnedFd, size: u64) -> Result<Self, MapError> {
        check_sealed(fd.as_fd(), size)?;
        let mode = rustix::fs::fcntl_getfl(&fd).map_err(|e| MapError::Stat(e.into()))?;
        if mode.intersects(OFlags::WRONLY | OFlags::RDWR) {
            return Err(MapError::Writable);
        }
        let len = usize::try_from(size).map_err(|_| MapError::SizeMismatch { expected: size, actual: 0 })?;
        let file = File::from(fd);
        // SAFETY: memmap2 requires that the mapped file is not modified or truncated while
        // mapped (else the slice would change under `&[u8]` or fault with SIGBUS). The memfd
        // carries F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW (checked above, and F_SEAL_SEAL
        // keeps them), so no process can write or resize it, and its size equals `len`.
        let map = unsafe { MmapOptions::new().len(len).map(&file) }.map_err(MapError::Mmap)?;
        Ok(ArenaMap { map })
    }

    /// A private, read-only anonymous copy filled by `fill` (one copy per process).
    pub fn private(size: u64, fill: impl FnOnce(&mut [u8])) -> Result<Self, MapError> {
        let len = usize::try_from(size).map_err(|_| MapError::SizeMismatch { expected: size, actual: 0 })?;
        let mut map = MmapMut::map_anon(len).map_err(MapError::Mmap)?;
        fill(&mut map);
        Ok(ArenaMap { map: map.make_read_only().map_err(MapError::Mmap)? })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// xxh3-64 of an arena's bytes, fed in increasing offsets as the arena is filled; the gaps
/// between tensors (zeros in a fresh memfd) count as zeros.
#[derive(Default)]
pub struct ArenaChecksum {
    hasher: xxhash_rust::xxh3::Xxh3,
    position: u64,
}

impl ArenaChecksum {
    /// Adds `bytes` found at `offset` (offsets must not go backwards).
    pub fn update_at(&mut self, offset: u64, bytes: &[u8]) {
        assert!(offset >= self.position, "arena checksum fed out of order");
        self.zeros_until(offset);
        self.hasher.update(bytes);
        self.position = offset + bytes.len() as u64;
    }

    /// The checksum of an arena of `size` bytes (the rest is zeros).
    pub fn finish(mut self, size: u64) -> u64 {
        self.zeros_until(size);
        self.hasher.digest()
    }

    fn zeros_until(&mut self, end: u64) {
        const ZEROS: [u8; 4096] = [0; 4096];
        while self.position < end {
            let n = (end - self.position).min(ZEROS.len() as u64);
            self.hasher.update(&ZEROS[..n as usize]);
            self.position += n;
        }
    }
}

/// The checksum of a whole mapped arena (what [`ArenaChecksum`] computes while filling it).
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn sealed(contents: &[u8]) -> SealedArena {
        let writer = ArenaWriter::create("test", 8192).unwrap();
        writer.write_at(100, contents).unwrap();
        writer.seal().unwrap()
    }

    #[test]
    fn readers_see_what_the_owner_wrote() {
        let arena = sealed(b"hello");
        let map = ArenaMap::map(arena.read_only_fd().unwrap(), 8192).unwrap();
        assert_eq!(&map.bytes()[100..105], b"hello");
        assert!(map.bytes()[..100].iter().all(|&b| b == 0));
    }

    #[test]
    fn writes_past_the_end_are_refused() {
        let writer = ArenaWriter::create("test", 4096).unwrap();
        assert!(matches!(writer.write_at(4090, &[0; 8]), Err(ArenaError::OutOfBounds { .. })));
        assert!(matches!(writer.write_at(u64::MAX, &[0; 8]), Err(ArenaError::OutOfBounds { .. })));
    }

    #[test]
    fn sealed_arena_refuses_every_write_path() {
        let arena = sealed(b"x");
        let rw = File::from(arena.fd().try_clone_to_owned().unwrap());
        assert!(rw.write_at(b"y", 0).is_err(), "write(2) on a write-sealed memfd");
        assert!(rw.set_len(1).is_err(), "shrink");
        assert!(rw.set_len(1 << 20).is_err(), "grow");
        // SAFETY: the mapping is expected to fail; if it did not, it is dropped unused.
        let writable = unsafe { MmapOptions::new().len(8192).map_mut(&rw) };
        assert!(writable.is_err(), "a writable shared mapping of a sealed memfd");
        let ro = File::from(arena.read_only_fd().unwrap());
        assert!(ro.write_at(b"y", 0).is_err(), "write(2) on the read-only fd");
    }

    #[test]
    fn mapping_cannot_be_made_writable() {
        let arena = sealed(b"x");
        let map = ArenaMap::map(arena.read_only_fd().unwrap(), 8192).unwrap();
        let ptr = map.bytes().as_ptr() as *mut std::ffi::c_void;
        // SAFETY: asks the kernel to add PROT_WRITE to our own mapping; the kernel must refuse
        // (O_RDONLY file, sealed memfd). Nothing is written through `ptr` here.
        let result = unsafe {
            rustix::mm::mprotect(ptr, 8192, rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE)
        };
        assert_eq!(result, Err(rustix::io::Errno::ACCESS));
    }

    #[test]
    fn unsealed_writable_or_wrong_sized_fds_are_refused() {
        let unsealed = ArenaWriter::create("test", 4096).unwrap();
        let fd: OwnedFd = unsealed.file.try_clone().unwrap().into();
        assert!(matches!(ArenaMap::map(fd, 4096), Err(MapError::NotSealed { .. })));
        let plain: OwnedFd = tempfile::tempfile().unwrap().into();
        assert!(matches!(ArenaMap::map(plain, 4096), Err(MapError::NotSealed { found: None })));
        let arena = sealed(b"x");
        assert!(matches!(ArenaMap::map(arena.read_only_fd().unwrap(), 4096), Err(MapError::SizeMismatch { .. })));
        assert!(matches!(ArenaMap::map(arena.fd().try_clone_to_owned().unwrap(), 8192), Err(MapError::Writable)));
    }

    #[test]
    fn streaming_checksum_equals_checksum_of_the_whole() {
        let writer = ArenaWriter::create("test", 3 * 4096).unwrap();
        let mut streaming = ArenaChecksum::default();
        for (offset, bytes) in [(256u64, &b"first"[..]), (5000, b"second"), (8192, b"third")] {
            streaming.update_at(offset, bytes);
            writer.write_at(offset, bytes).unwrap();
        }
        let arena = writer.seal().unwrap();
        let map = ArenaMap::map(arena.read_only_fd().unwrap(), 3 * 4096).unwrap();
        assert_eq!(streaming.finish(3 * 4096), checksum(map.bytes()));
    }

    #[test]
    fn private_copy_is_read_only_too() {
        let map = ArenaMap::private(4096, |b| b[0] = 7).unwrap();
        assert_eq!(map.bytes()[0], 7);
    }

    const CHILD_ENV: &str = "FORKLESS_TEST_WRITE_THROUGH_VIEW";

    /// Runs only inside the child started by `writing_through_a_view_faults`.
    #[test]
    #[ignore = "helper: run by writing_through_a_view_faults in a child process"]
    fn child_writes_through_view() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let arena = sealed(b"x");
        let map = ArenaMap::map(arena.read_only_fd().unwrap(), 8192).unwrap();
        let ptr = map.bytes().as_ptr() as *mut u8;
        // SAFETY: deliberately unsound write into a PROT_READ page: the point of the test is
        // that the kernel kills this (child) process with SIGSEGV before the store lands.
        unsafe { ptr.add(100).write_volatile(b'y') };
        std::process::exit(0);
    }

    #[test]
    fn writing_through_a_view_faults() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "host::tests::child_writes_through_view", "--ignored", "--nocapture"])
            .env(CHILD_ENV, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc_sigsegv()), "child must die of SIGSEGV, got {status:?}");
    }

    /// Maps the writer's memfd writable: the one thing that makes `F_SEAL_WRITE` answer
    /// `EBUSY` on demand, standing in for the kernel's transient page references.
    fn writable_mapping(writer: &ArenaWriter) -> MmapMut {
        // SAFETY: test-only mapping of a memfd this test owns; nothing truncates it while
        // mapped, and the bytes are never read through a shared reference during a write.
        unsafe { MmapOptions::new().len(4096).map_mut(&writer.file) }.unwrap()
    }

    #[test]
    fn a_busy_seal_is_retried_until_the_kernel_lets_go() {
        let writer = ArenaWriter::create("test", 4096).unwrap();
        let mapping = writable_mapping(&writer);
        let refused = rustix::fs::fcntl_add_seals(&writer.file, SealFlags::WRITE);
        assert_eq!(refused, Err(rustix::io::Errno::BUSY), "a writable mapping must block F_SEAL_WRITE");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(mapping);
        });
        let arena = writer.seal_within(Duration::from_secs(60)).expect("the seal lands once the mapping is gone");
        release.join().unwrap();
        assert!(rustix::fs::fcntl_get_seals(arena.fd()).unwrap().contains(REQUIRED_SEALS | SealFlags::SEAL));
    }

    #[test]
    fn a_seal_that_stays_busy_gives_up_and_says_why() {
        let writer = ArenaWriter::create("test", 4096).unwrap();
        let _mapping = writable_mapping(&writer);
        match writer.seal_within(Duration::from_millis(20)) {
            Err(error @ ArenaError::SealBusy { tries, .. }) => {
                assert!(tries >= 2, "retried before giving up: {tries}");
                assert!(error.to_string().contains("EBUSY"), "{error}");
            }
            other => panic!("expected SealBusy, got {other:?}"),
        }
    }

    fn libc_sigsegv() -> i32 {
        rustix::process::Signal::SEGV.as_raw()
    }
}
