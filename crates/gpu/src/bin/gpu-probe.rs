//! `gpu-probe`: checks on a real GPU what forkless relies on, and prints a PASS/FAIL table.
//!
//! Run it with no arguments (`gpu-probe [--size-mib 256]`). The process you start is the
//! *orchestrator*: like the supervisor, it never loads CUDA. It exec's itself in other roles:
//!
//! - `export`: creates a VMM arena, fills it with a known pattern, exports its fd and sends it
//!   back over a Unix socket (SCM_RIGHTS), then waits to be killed;
//! - `import`: imports an inherited fd (read-only or read-write), checks the pattern, times
//!   import+map, and optionally tries to write into it;
//! - `ctx`: creates a context with a given stack limit and waits, so its memory can be measured.
//!
//! `gpu-probe kernels` (run on its own) compiles `kernels/linear.cu` with NVRTC and checks both
//! kernels against host computations; `gpu-probe nvml` prints GPU memory per process;
//! `gpu-probe gemm` times one pass of the linear layer (`Blas::linear`) per batch size, against
//! the HBM and FP32 limits (what a batch lane's pass can cost at best).
//!
//! Children get fds by inheritance (close-on-exec cleared for the one spawn) and learn their
//! numbers from environment variables. Nothing runs CUDA in a forked copy of another process.

// Part of the gpu crate, where `unsafe` is allowed (every block says why it holds).
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use forkless_gpu::{Access, Gpu, GpuError, ImportedArena, VmmArena, WriteMethod};
use rustix::io::FdFlags;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketFlags, SocketType,
};

const ENV_SOCK: &str = "FORKLESS_PROBE_SOCK";
const ENV_FD: &str = "FORKLESS_PROBE_FD";
const SEED: u64 = 0x5EED_F0F0_1234_ABCD;

type Report = BTreeMap<String, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().map(String::as_str).unwrap_or("check");
    let result = match role {
        "export" => role_export(&args[1..]),
        "import" => role_import(&args[1..]),
        "ctx" => role_ctx(&args[1..]),
        "nvml" => role_nvml(),
        "kernels" => role_kernels(),
        "gemm" => role_gemm(&args[1..]),
        "check" | "--size-mib" => orchestrate(&args),
        other => Err(format!("unknown role {other:?}: run `gpu-probe [--size-mib N]`")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gpu-probe {role}: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// Byte `i` of the test pattern: little-endian words of a multiplicative hash of the index.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut word = offset / 8;
    let skip = (offset % 8) as usize;
    while out.len() < len + skip {
        let v = (word ^ SEED).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
        out.extend_from_slice(&v.to_le_bytes());
        word += 1;
    }
    out.drain(..skip);
    out.truncate(len);
    out
}

fn arg_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn emit(key: &str, value: impl std::fmt::Display) {
    println!("{key}={value}");
}

fn gpu_err(e: GpuError) -> String {
    e.to_string()
}

/// Adopts the fd whose number is in environment variable `var` (inherited across exec).
fn inherited_fd(var: &str) -> Result<OwnedFd, String> {
    let raw: RawFd = std::env::var(var)
        .map_err(|_| format!("{var} is not set: this role is started by the orchestrator"))?
        .parse()
        .map_err(|e| format!("{var}: {e}"))?;
    if raw < 3 {
        return Err(format!("{var}={raw} is not an inherited fd"));
    }
    // SAFETY: the orchestrator passed this fd to us across exec and nothing else in this
    // process knows or owns it; `fcntl_getfd` below checks that it is open.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    rustix::io::fcntl_getfd(&fd).map_err(|e| format!("{var}={raw}: {e}"))?;
    rustix::io::fcntl_setfd(&fd, FdFlags::CLOEXEC).map_err(|e| e.to_string())?;
    Ok(fd)
}

fn parse_report(text: &str) -> Report {
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
}

// ---------------------------------------------------------------------------------------------
// Role: export

fn role_export(args: &[String]) -> Result<ExitCode, String> {
    let sock = inherited_fd(ENV_SOCK)?;
    let size: u64 = arg_value(args, "--size").ok_or("--size missing")?.parse().map_err(|e| format!("--size: {e}"))?;
    let mut report = Report::new();
    let t = Instant::now();
    let gpu = Gpu::open(0).map_err(gpu_err)?;
    report.insert("ctx_ms".into(), ms(t.elapsed()));
    let info = gpu.info().clone();
    report.insert("device".into(), info.name.clone());
    report.insert("driver_version".into(), info.driver_version.to_string());
    report.insert("cc".into(), format!("{}.{}", info.compute_capability.0, info.compute_capability.1));
    report.insert("total_mib".into(), (info.total_mem >> 20).to_string());
    report.insert("granularity".into(), gpu.granularity().map_err(gpu_err)?.to_string());
    report.insert(
        "nvrtc".into(),
        forkless_gpu::nvrtc_available().map(|()| "present".to_string()).unwrap_or_else(|e| e.to_string()),
    );
    report.insert(
        "cublas".into(),
        forkless_gpu::cublas_available().map(|()| "present".to_string()).unwrap_or_else(|e| e.to_string()),
    );

    let t = Instant::now();
    let arena = VmmArena::create(&gpu, size).map_err(gpu_err)?;
    report.insert("create_ms".into(), ms(t.elapsed()));
    report.insert("size".into(), arena.size().to_string());

    let data = pattern(0, arena.size() as usize);
    // Pageable path first (whole arena), then the staged path overwrites it with the same data.
    let t = Instant::now();
    arena.write_at_pageable(0, &data).map_err(gpu_err)?;
    report.insert("fill_pageable_gbs".into(), gbs(data.len(), t.elapsed()));
    arena.write_at(0, &data[..2 << 20]).map_err(gpu_err)?; // warm the staging buffers
    let t = Instant::now();
    arena.write_at(0, &data).map_err(gpu_err)?;
    report.insert("fill_staged_gbs".into(), gbs(data.len(), t.elapsed()));
    arena.release_staging();
    // Host memory bandwidth for comparison: one memcpy of the whole pattern into resident memory.
    let mut copy = vec![1u8; data.len()];
    let t = Instant::now();
    copy.copy_from_slice(&data);
    report.insert("host_memcpy_gbs".into(), gbs(data.len(), t.elapsed()));
    drop(copy);
    let back = arena.read_at(0, data.len()).map_err(gpu_err)?;
    report.insert("owner_readback".into(), (back == data).to_string());
    drop(back);
    drop(data);

    let t = Instant::now();
    let fd = arena.export_fd().map_err(gpu_err)?;
    report.insert("export_us".into(), us(t.elapsed()));
    // What the fd is, as the supervisor's escrow sees it (it never touches CUDA).
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map(|p| p.display().to_string());
    let kind = rustix::fs::fstat(&fd).map(|st| format!("{:?}", rustix::fs::FileType::from_raw_mode(st.st_mode)));
    let sealable = rustix::fs::fcntl_get_seals(&fd).is_ok();
    report.insert("export_fd".into(), format!("{link:?} {kind:?} sealable={sealable}"));
    let (free, total) = gpu.mem_info().map_err(gpu_err)?;
    report.insert("owner_used_mib".into(), ((total - free) >> 20).to_string());

    let payload: String = report.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    send_fd(&sock, payload.as_bytes(), &fd)?;
    drop(fd);
    // Keep the arena and the context until the orchestrator kills us (SIGKILL) or closes stdin.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(arena);
    Ok(ExitCode::SUCCESS)
}

fn send_fd(sock: &OwnedFd, payload: &[u8], fd: &OwnedFd) -> Result<(), String> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd.as_fd()];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err("control buffer too small for one fd".into());
    }
    rustix::net::sendmsg(sock, &[IoSlice::new(payload)], &mut control, SendFlags::empty())
        .map_err(|e| format!("sendmsg: {e}"))?;
    Ok(())
}

fn recv_fd(sock: &OwnedFd) -> Result<(String, OwnedFd), String> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut data = vec![0u8; 64 << 10];
    let got = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(&mut data)], &mut control, RecvFlags::CMSG_CLOEXEC)
        .map_err(|e| format!("recvmsg: {e}"))?;
    let mut received = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            for fd in fds {
                received.get_or_insert(fd);
            }
        }
    }
    let text = String::from_utf8_lossy(&data[..got.bytes]).into_owned();
    let fd = received.ok_or("the exporter died or sent no fd (see its stderr above)")?;
    Ok((text, fd))
}

// ---------------------------------------------------------------------------------------------
// Role: import

fn role_import(args: &[String]) -> Result<ExitCode, String> {
    let fd = inherited_fd(ENV_FD)?;
    let size: u64 = arg_value(args, "--size").ok_or("--size missing")?.parse().map_err(|e| format!("--size: {e}"))?;
    let access = match arg_value(args, "--access") {
        Some("rw") => Access::ReadWrite,
        _ => Access::ReadOnly,
    };
    let repeat: usize = arg_value(args, "--repeat").unwrap_or("0").parse().map_err(|e| format!("--repeat: {e}"))?;
    let write = arg_value(args, "--write").unwrap_or("none");

    let t = Instant::now();
    let gpu = Gpu::open(0).map_err(gpu_err)?;
    emit("ctx_ms", ms(t.elapsed()));

    // Extra imports from duplicates of the fd, to time import+map on a warm context.
    let mut times = Vec::new();
    for _ in 0..repeat {
        let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 3).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let view = ImportedArena::import(&gpu, dup, size, access).map_err(gpu_err)?;
        times.push(t.elapsed());
        drop(view);
    }
    let t = Instant::now();
    let view = ImportedArena::import(&gpu, fd, size, access).map_err(gpu_err)?;
    let first = t.elapsed();
    emit("import_us", us(first));
    if !times.is_empty() {
        times.sort();
        emit("import_us_min", us(times[0]));
        emit("import_us_median", us(times[times.len() / 2]));
        emit("import_us_max", us(times[times.len() - 1]));
        emit("import_repeats", times.len());
    }

    // D2H into resident (pre-touched) memory, so page faults do not count.
    let mut back = vec![1u8; size as usize];
    let t = Instant::now();
    view.read_into(0, &mut back).map_err(gpu_err)?;
    emit("read_gbs", gbs(back.len(), t.elapsed()));
    let expected = pattern(0, size as usize);
    let mismatch = back.iter().zip(&expected).position(|(a, b)| a != b);
    emit(
        "pattern",
        match mismatch {
            None => "ok".to_string(),
            Some(i) => format!("MISMATCH at byte {i}"),
        },
    );
    drop(back);

    match write {
        "none" => {}
        "writeback" => {
            // Read-write import: write the same bytes back (the pattern stays as it was).
            let r = view.write_at(4096, &expected[4096..8192]);
            emit("write", outcome(&r));
        }
        method => {
            let method = if method == "memset" { WriteMethod::Memset } else { WriteMethod::Memcpy };
            let junk = vec![0xA5u8; 4096];
            let r = view.attempt_write(4096, &junk, method);
            emit("write", outcome(&r));
            // Is the data still intact, and is the context still usable?
            match view.read_at(4096, 4096) {
                Ok(b) => emit("after_write", if b == expected[4096..8192] { "intact" } else { "CHANGED" }),
                Err(e) => emit("after_write", format!("read failed: {e}")),
            }
        }
    }
    std::io::stdout().flush().ok();
    Ok(ExitCode::SUCCESS)
}

fn outcome(r: &Result<(), GpuError>) -> String {
    match r {
        Ok(()) => "accepted".into(),
        Err(e) => match e.cu_result() {
            Some(code) => format!("refused {code}"),
            None => format!("refused ({e})"),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Role: ctx

fn role_ctx(args: &[String]) -> Result<ExitCode, String> {
    let stack = arg_value(args, "--stack").unwrap_or("default");
    let t = Instant::now();
    let gpu = Gpu::open(0).map_err(gpu_err)?;
    let ctx_ms = ms(t.elapsed());
    if stack != "default" {
        let bytes: usize = stack.parse().map_err(|e| format!("--stack: {e}"))?;
        gpu.set_stack_limit(bytes).map_err(gpu_err)?;
    }
    let limit = gpu.stack_limit().map_err(gpu_err)?;
    let (free, total) = gpu.mem_info().map_err(gpu_err)?;
    println!("ready ctx_ms={ctx_ms} stack={limit} used_mib={}", (total - free) >> 20);
    std::io::stdout().flush().ok();
    // Hold the context until the orchestrator has measured and closes our stdin.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Role: gemm

/// `gpu-probe gemm [--inputs 10000] [--outputs 50000] [--workspace-kib N] [--reps 50]
/// [--outputs-major | --small]`: the
/// seed's layer (`y = W x`, fp32) once per batch size, timed over `reps` passes queued back to
/// back. The weights live in a VMM arena, as the workers see them.
fn role_gemm(args: &[String]) -> Result<ExitCode, String> {
    let number = |name: &str, default: usize| -> Result<usize, String> {
        arg_value(args, name).map_or(Ok(default), |v| v.parse().map_err(|e| format!("{name}: {e}")))
    };
    let (inputs, outputs, reps) = (number("--inputs", 10_000)?, number("--outputs", 50_000)?, number("--reps", 50)?);
    let workspace =
        arg_value(args, "--workspace-kib").map(str::parse::<usize>).transpose().map_err(|e| e.to_string())?;
    let drv = |e: forkless_gpu::cudarc::driver::DriverError| format!("{e:?}");
    let gpu = Gpu::open(0).map_err(gpu_err)?;
    let stream = gpu.context().default_stream();
    let blas = match workspace {
        Some(kib) => forkless_gpu::Blas::with_workspace(stream.clone(), kib << 10),
        None => forkless_gpu::Blas::new(stream.clone()),
    }
    .map_err(gpu_err)?;
    let bytes = (inputs * outputs * 4) as u64;
    let granularity = gpu.granularity().map_err(gpu_err)?;
    let arena =
        VmmArena::create(&gpu, forkless_gpu::round_up(bytes, granularity).ok_or("size overflows")?).map_err(gpu_err)?;
    arena.fill(0, 0x3c, bytes as usize).map_err(gpu_err)?;
    let w = arena.view::<f32>(0, inputs * outputs).map_err(gpu_err)?;
    let batches = [1usize, 8, 16, 32, 48, 64, 96, 128, 256];
    let largest = batches[batches.len() - 1];
    let x = stream.alloc_zeros::<f32>(largest * inputs).map_err(drv)?;
    let mut y = stream.alloc_zeros::<f32>(largest * outputs).map_err(drv)?;
    println!(
        "gemm on {}: W [{outputs} x {inputs}] fp32 ({:.0} MiB), cuBLAS workspace {}, {reps} passes per batch size",
        gpu.info().name,
        bytes as f64 / (1 << 20) as f64,
        workspace.map_or("default".to_string(), |kib| format!("{kib} KiB"))
    );
    println!("| batch | us per pass | passes/s | requests/s | weights GB/s | TFLOPS |");
    println!("|---|---|---|---|---|---|");
    let outputs_major = args.iter().any(|a| a == "--outputs-major");
    let small = args.iter().any(|a| a == "--small");
    let kernels = if small { Some(forkless_gpu::Kernels::compile(&gpu).map_err(|e| e.to_string())?) } else { None };
    let linear = |batch: usize, y: &mut forkless_gpu::cudarc::driver::CudaSlice<f32>| {
        if let Some(k) = &kernels {
            return match k.linear_small(&stream, w, outputs, inputs, &x, y, batch) {
                Ok(true) => Ok(()),
                Ok(false) => Err("declined".to_string()),
                Err(e) => Err(e.to_string()),
            };
        }
        if outputs_major {
            blas.linear_outputs_major(w, outputs, inputs, &x, y, batch)
        } else {
            blas.linear(w, outputs, inputs, &x, y, batch)
        }
        .map_err(gpu_err)
    };
    if outputs_major {
        println!("(operands swapped: y outputs-major)");
    }
    if small {
        println!("(forkless's linear_small kernel, batches up to {})", forkless_gpu::kernels::SMALL_MAX_BATCH);
    }
    for batch in batches.into_iter().filter(|&b| !small || b <= forkless_gpu::kernels::SMALL_MAX_BATCH) {
        linear(batch, &mut y)?;
        stream.synchronize().map_err(drv)?;
        let started = Instant::now();
        for _ in 0..reps {
            linear(batch, &mut y)?;
        }
        stream.synchronize().map_err(drv)?;
        let pass = started.elapsed().as_secs_f64() / reps as f64;
        println!(
            "| {batch} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |",
            pass * 1e6,
            1.0 / pass,
            batch as f64 / pass,
            bytes as f64 / pass / 1e9,
            2.0 * (inputs * outputs * batch) as f64 / pass / 1e12
        );
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Orchestrator (no CUDA in this process)

struct Row {
    name: &'static str,
    pass: Option<bool>,
    detail: String,
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn gbs(bytes: usize, d: Duration) -> String {
    format!("{:.1}", bytes as f64 / d.as_secs_f64() / 1e9)
}

fn me() -> Result<std::path::PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))
}

/// Spawns `cmd` with `fd` inherited under its own number, named in environment `var`.
fn spawn_with_fd(cmd: &mut Command, var: &str, fd: &OwnedFd) -> Result<Child, String> {
    cmd.env(var, fd.as_raw_fd().to_string());
    rustix::io::fcntl_setfd(fd, FdFlags::empty()).map_err(|e| e.to_string())?;
    let child = cmd.spawn().map_err(|e| format!("spawn: {e}"));
    rustix::io::fcntl_setfd(fd, FdFlags::CLOEXEC).map_err(|e| e.to_string())?;
    child
}

fn run_import(fd: &OwnedFd, size: u64, extra: &[&str]) -> Result<Report, String> {
    let mut cmd = Command::new(me()?);
    cmd.arg("import")
        .args(["--size", &size.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let child = spawn_with_fd(&mut cmd, ENV_FD, fd)?;
    let out = child.wait_with_output().map_err(|e| format!("wait: {e}"))?;
    let mut report = parse_report(&String::from_utf8_lossy(&out.stdout));
    report.insert("exit".into(), format!("{}", out.status));
    Ok(report)
}

fn nvidia_smi(args: &[&str]) -> Option<String> {
    let out = Command::new("nvidia-smi").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// GPU 0's used memory in MiB according to nvidia-smi.
fn gpu_used_mib() -> Option<i64> {
    nvidia_smi(&["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"])?.trim().parse().ok()
}

/// The used memory nvidia-smi lists for process `pid`, if listed.
fn app_used_mib(pid: u32) -> Option<i64> {
    let text = nvidia_smi(&["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])?;
    text.lines().find_map(|l| {
        let (p, m) = l.split_once(',')?;
        (p.trim().parse::<u32>().ok()? == pid).then(|| m.trim().parse().ok()).flatten()
    })
}

fn libcuda_loaded_here() -> bool {
    std::fs::read_to_string("/proc/self/maps").map(|m| m.contains("libcuda")).unwrap_or(false)
}

fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

fn fmt_mib(v: Option<i64>) -> String {
    v.map(|v| format!("{v} MiB")).unwrap_or_else(|| "n/a".into())
}

fn delta(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    Some(b? - a?)
}

fn measure_ctx(stack: &str) -> Result<String, String> {
    let before = gpu_used_mib();
    let mut child = Command::new(me()?)
        .args(["ctx", "--stack", stack])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let mut line = String::new();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    BufReader::new(stdout).read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("ready") {
        let _ = child.wait();
        return Err("context child failed (see its stderr)".into());
    }
    settle();
    let during = gpu_used_mib();
    let app = app_used_mib(child.id());
    drop(child.stdin.take());
    let _ = child.wait();
    let fields = parse_report(&line.replace(' ', "\n"));
    Ok(format!(
        "limit {} B: nvidia-smi GPU used +{} , per-process {}; ctx create {} ms",
        fields.get("stack").map(String::as_str).unwrap_or("?"),
        fmt_mib(delta(before, during)),
        fmt_mib(app),
        fields.get("ctx_ms").map(String::as_str).unwrap_or("?"),
    ))
}

fn orchestrate(args: &[String]) -> Result<ExitCode, String> {
    let size_mib: u64 =
        arg_value(args, "--size-mib").unwrap_or("256").parse().map_err(|e| format!("--size-mib: {e}"))?;
    let size_req = size_mib << 20;
    let mut rows: Vec<Row> = Vec::new();

    // 5. Context memory per process (first, on a quiet GPU).
    let idle = gpu_used_mib();
    for (stack, name) in [
        ("default", "5a context memory, default stack"),
        ("256", "5b context memory, stack 256 B"),
        ("64", "5c context memory, stack 64 B"),
    ] {
        let r = measure_ctx(stack);
        rows.push(Row { name, pass: Some(r.is_ok()), detail: r.unwrap_or_else(|e| e) });
    }

    // 1. Exporter: create, fill, export, send the fd back.
    let (mine, theirs) = rustix::net::socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| format!("socketpair: {e}"))?;
    let mut cmd = Command::new(me()?);
    cmd.args(["export", "--size", &size_req.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let mut exporter = spawn_with_fd(&mut cmd, ENV_SOCK, &theirs)?;
    drop(theirs);
    let (text, fd) = match recv_fd(&mine) {
        Ok(v) => v,
        Err(e) => {
            let _ = exporter.kill();
            let _ = exporter.wait();
            rows.push(Row { name: "1  create+fill+export", pass: Some(false), detail: e });
            print_table(&rows, &Report::new());
            return Ok(ExitCode::FAILURE);
        }
    };
    let ex = parse_report(&text);
    let size: u64 = ex.get("size").and_then(|s| s.parse().ok()).unwrap_or(0);
    let get = |r: &Report, k: &str| r.get(k).cloned().unwrap_or_else(|| "?".into());
    rows.push(Row {
        name: "1  create+fill+export",
        pass: Some(size >= size_req && get(&ex, "owner_readback") == "true"),
        detail: format!(
            "{} MiB (granularity {} B): cuMemCreate+map {} ms, fill {} GB/s pageable / {} GB/s pinned-staged (host memcpy {} GB/s), export {} us, owner ctx {} ms",
            size >> 20,
            get(&ex, "granularity"),
            get(&ex, "create_ms"),
            get(&ex, "fill_pageable_gbs"),
            get(&ex, "fill_staged_gbs"),
            get(&ex, "host_memcpy_gbs"),
            get(&ex, "export_us"),
            get(&ex, "ctx_ms"),
        ),
    });

    // 2 + 6. Read-only import in a second process; timing of import+map.
    let r = run_import(&fd, size, &["--access", "ro", "--repeat", "20"])?;
    rows.push(Row {
        name: "2  RO import reads pattern",
        pass: Some(get(&r, "pattern") == "ok"),
        detail: format!(
            "pattern {} ({} MiB, D2H {} GB/s), importer ctx {} ms, {}",
            get(&r, "pattern"),
            size >> 20,
            get(&r, "read_gbs"),
            get(&r, "ctx_ms"),
            get(&r, "exit")
        ),
    });
    rows.push(Row {
        name: "6  import+map time",
        pass: Some(r.contains_key("import_us_median")),
        detail: format!(
            "first {} us (incl. first-use), then over {} repeats: min {} / median {} / max {} us",
            get(&r, "import_us"),
            get(&r, "import_repeats"),
            get(&r, "import_us_min"),
            get(&r, "import_us_median"),
            get(&r, "import_us_max"),
        ),
    });

    // 3. Writes into the read-only mapping, each in a throwaway process.
    for (method, name) in [("memcpy", "3a RO write (cuMemcpyHtoD)"), ("memset", "3b RO write (cuMemsetD8)")] {
        let r = run_import(&fd, size, &["--access", "ro", "--write", method])?;
        let w = get(&r, "write");
        rows.push(Row {
            name,
            pass: Some(w.starts_with("refused") && get(&r, "after_write") != "CHANGED"),
            detail: format!("{w}; data afterwards: {}", get(&r, "after_write")),
        });
    }
    let r = run_import(&fd, size, &["--access", "rw", "--write", "writeback"])?;
    rows.push(Row {
        name: "3c RW import can write",
        pass: Some(get(&r, "write") == "accepted" && get(&r, "pattern") == "ok"),
        detail: format!("write {}, pattern {}", get(&r, "write"), get(&r, "pattern")),
    });

    // 4. Kill the exporter; this process (no CUDA) holds only the fd; a new process imports.
    let used_before_kill = gpu_used_mib();
    exporter.kill().map_err(|e| format!("kill exporter: {e}"))?; // SIGKILL
    let status = exporter.wait().map_err(|e| e.to_string())?;
    settle();
    let used_fd_only = gpu_used_mib();
    let no_cuda_here = !libcuda_loaded_here();
    let r = run_import(&fd, size, &["--access", "ro"])?;
    rows.push(Row {
        name: "4  exporter SIGKILLed, fd-only holder, new import",
        pass: Some(get(&r, "pattern") == "ok" && no_cuda_here),
        detail: format!(
            "exporter {status}; holder has libcuda loaded: {}; GPU used {} -> {} (fd only); new importer: pattern {}, import {} us",
            !no_cuda_here,
            fmt_mib(used_before_kill),
            fmt_mib(used_fd_only),
            get(&r, "pattern"),
            get(&r, "import_us"),
        ),
    });

    // 4b. Closing the last fd frees the memory.
    drop(fd);
    settle();
    let used_after_close = gpu_used_mib();
    let freed = delta(used_after_close, used_fd_only);
    rows.push(Row {
        name: "4b last fd closed -> memory freed",
        pass: freed.map(|f| f >= (size >> 20) as i64 - 2),
        detail: format!(
            "GPU used {} -> {} (freed {}; arena {} MiB; idle at start {})",
            fmt_mib(used_fd_only),
            fmt_mib(used_after_close),
            fmt_mib(freed),
            size >> 20,
            fmt_mib(idle),
        ),
    });

    print_table(&rows, &ex);
    let failed = rows.iter().any(|r| r.pass == Some(false));
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn print_table(rows: &[Row], ex: &Report) {
    let get = |k: &str| ex.get(k).cloned().unwrap_or_else(|| "?".into());
    println!();
    println!(
        "gpu-probe: {} (cc {}, {} MiB), driver CUDA {}, NVRTC: {}, cuBLAS: {}",
        get("device"),
        get("cc"),
        get("total_mib"),
        get("driver_version"),
        get("nvrtc"),
        get("cublas"),
    );
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(10);
    println!("{:<width$} | result | detail", "check");
    println!("{}-+--------+-------", "-".repeat(width));
    for r in rows {
        let verdict = match r.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "info",
        };
        println!("{:<width$} | {verdict:<6} | {}", r.name, r.detail);
    }
    let failed = rows.iter().filter(|r| r.pass == Some(false)).count();
    println!("{}", if failed == 0 { "ALL PASS".to_string() } else { format!("{failed} FAILED") });
}

/// `gpu-probe nvml`: GPU memory per process and unattributed, as the supervisor reads it.
fn role_nvml() -> Result<ExitCode, String> {
    let memory = forkless_gpu::nvml::snapshot().ok_or("NVML (libnvidia-ml.so.1) is not available")?;
    let mib = |b: u64| b as f64 / 1048576.0;
    println!("nvml: used {:.0} MiB, unattributed {:.0} MiB", mib(memory.used), mib(memory.unattributed));
    let mut pids: Vec<_> = memory.per_process.iter().collect();
    pids.sort();
    for (pid, bytes) in pids {
        println!("nvml: pid {pid} uses {:.0} MiB", mib(*bytes));
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Role: kernels

/// Host SplitMix64 (a copy of `examples/linear/seeded.rs`), the reference for `seeded_inputs`.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32) / (1u32 << 23) as f32 - 1.0
    }
}

fn host_inputs(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| rng.uniform()).collect()
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
    }
}

/// `gpu-probe kernels`: NVRTC-compiles `kernels/linear.cu` and checks both kernels on the GPU.
fn role_kernels() -> Result<ExitCode, String> {
    use forkless_gpu::kernels::{self, Kernels};
    let err = |e: forkless_gpu::KernelError| e.to_string();
    let drv = |e: forkless_gpu::cudarc::driver::DriverError| format!("{e:?}");
    let gpu = Gpu::open(0).map_err(gpu_err)?;
    let nvrtc = kernels::nvrtc_version().map_err(err)?;
    let k = Kernels::compile(&gpu).map_err(err)?;
    println!(
        "kernels: {} (cc {}.{}), NVRTC {}.{}, arch {}, loaded from {}, compile+load {:.1} ms",
        gpu.info().name,
        gpu.info().compute_capability.0,
        gpu.info().compute_capability.1,
        nvrtc.0,
        nvrtc.1,
        k.arch(),
        k.loaded_from(),
        k.compile_time().as_secs_f64() * 1e3,
    );
    let stream = gpu.context().default_stream();
    let mut failed = 0;

    // seeded_inputs: every value bit for bit against the host.
    let seeds: Vec<u64> = vec![0, 1, 7, 12345];
    let n = 2048;
    let d_seeds = stream.clone_htod(&seeds).map_err(drv)?;
    let mut d_x = stream.alloc_zeros::<f32>(seeds.len() * n).map_err(drv)?;
    let t = Instant::now();
    k.seeded_inputs(&stream, &mut d_x, &d_seeds, seeds.len(), n).map_err(err)?;
    stream.synchronize().map_err(drv)?;
    let launch = t.elapsed();
    let x = stream.clone_dtoh(&d_x).map_err(drv)?;
    let expected: Vec<f32> = seeds.iter().flat_map(|&s| host_inputs(s, n)).collect();
    let mismatches = x.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let first_bad = x.iter().zip(&expected).position(|(a, b)| a.to_bits() != b.to_bits());
    let pass = mismatches == 0 && x.len() == expected.len();
    failed += usize::from(!pass);
    println!(
        "{} seeded_inputs seeds {seeds:?} n {n}: {} values, {mismatches} differ bitwise{} (x[0]={}, launch+sync {:.0} us)",
        verdict(pass),
        x.len(),
        first_bad.map(|i| format!(", first at {i}: gpu {} host {}", x[i], expected[i])).unwrap_or_default(),
        x[0],
        launch.as_secs_f64() * 1e6,
    );

    // bias_add_rowsum: y exactly (one f32 add), y_sum against a host f64 sum (1e-6 relative),
    // the head exactly. The bias is read through a view of a VMM arena, as workers read weights.
    for (batch, out, head) in [(37usize, 1000usize, 8usize), (3, 5, 5), (8, 4096, 0)] {
        let y0 = host_inputs(1000 + batch as u64, batch * out);
        let bias: Vec<f32> = host_inputs(2000 + out as u64, out).iter().map(|v| v / 10.0).collect();
        let arena = VmmArena::create(&gpu, (out * 4) as u64).map_err(gpu_err)?;
        arena.write_at(0, &f32_bytes(&bias)).map_err(gpu_err)?;
        let d_bias = arena.view::<f32>(0, out).map_err(gpu_err)?;
        let mut d_y = stream.clone_htod(&y0).map_err(drv)?;
        let mut d_sum = stream.clone_htod(&vec![f64::NAN; batch]).map_err(drv)?; // overwritten, not added to
        let mut d_head = stream.alloc_zeros::<f32>((batch * head).max(1)).map_err(drv)?;
        k.bias_add_rowsum(&stream, &mut d_y, d_bias, &mut d_sum, &mut d_head, batch, head).map_err(err)?;
        stream.synchronize().map_err(drv)?;
        let y = stream.clone_dtoh(&d_y).map_err(drv)?;
        let sums = stream.clone_dtoh(&d_sum).map_err(drv)?;
        let heads = stream.clone_dtoh(&d_head).map_err(drv)?;
        let want_y: Vec<f32> = y0.chunks(out).flat_map(|row| row.iter().zip(&bias).map(|(a, b)| a + b)).collect();
        let want_sum: Vec<f64> = want_y.chunks(out).map(|row| row.iter().map(|&v| f64::from(v)).sum()).collect();
        let want_head: Vec<f32> = want_y.chunks(out).flat_map(|row| row[..head].to_vec()).collect();
        let y_bad = y.iter().zip(&want_y).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let head_bad = want_head.iter().zip(&heads).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let worst = sums
            .iter()
            .zip(&want_sum)
            .map(|(g, h)| if g.is_finite() { (g - h).abs() / h.abs().max(1e-12) } else { f64::INFINITY })
            .fold(0f64, f64::max);
        let pass = y_bad == 0 && head_bad == 0 && worst <= 1e-6;
        failed += usize::from(!pass);
        println!(
            "{} bias_add_rowsum batch {batch} out {out} head {head}: y {y_bad} and head {head_bad} differ bitwise; y_sum worst relative error {worst:.2e} (y_sum[0] gpu {} host {})",
            verdict(pass),
            sums[0],
            want_sum[0],
        );
    }

    failed += check_arena_checksum(&gpu, &k)?;
    failed += check_blas(&gpu)?;
    failed += check_linear_small(&gpu, &k)?;
    failed += check_kernel_cache(&gpu)?;
    println!("{}", if failed == 0 { "ALL PASS".to_string() } else { format!("{failed} FAILED") });
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `arena_checksum` on the GPU against the host definition, on a patterned arena; then the
/// speed on 1 GiB (what a re-adopting owner pays on the seed's 1.9 GiB model).
fn check_arena_checksum(gpu: &Gpu, k: &forkless_gpu::Kernels) -> Result<usize, String> {
    let err = |e: forkless_gpu::KernelError| e.to_string();
    let stream = gpu.context().default_stream();
    let mut failed = 0;
    for size in [4096u64, 3 << 20, 64 << 20] {
        let arena = VmmArena::create(gpu, size).map_err(gpu_err)?;
        let bytes = pattern(size, arena.size() as usize);
        arena.write_at(0, &bytes).map_err(gpu_err)?;
        let words = arena.view::<u64>(0, arena.size() as usize / 8).map_err(gpu_err)?;
        let t = Instant::now();
        let on_gpu = k.arena_checksum(&stream, words).map_err(err)?;
        let took = t.elapsed();
        let on_host = forkless_gpu::checksum::arena_checksum(&bytes);
        let pass = on_gpu == on_host;
        failed += usize::from(!pass);
        println!(
            "{} arena_checksum {} bytes: gpu {on_gpu:#018x} host {on_host:#018x} ({:.2} ms)",
            verdict(pass),
            arena.size(),
            took.as_secs_f64() * 1e3
        );
    }
    let big = VmmArena::create(gpu, 1 << 30).map_err(gpu_err)?;
    big.fill(0, 0x5a, big.size() as usize).map_err(gpu_err)?;
    let words = big.view::<u64>(0, big.size() as usize / 8).map_err(gpu_err)?;
    k.arena_checksum(&stream, words).map_err(err)?; // warm
    let t = Instant::now();
    k.arena_checksum(&stream, words).map_err(err)?;
    let took = t.elapsed().as_secs_f64();
    println!("     arena_checksum 1 GiB: {:.2} ms ({:.0} GB/s)", took * 1e3, (1u64 << 30) as f64 / took / 1e9);
    Ok(failed)
}

/// cuBLAS `linear` (W read through a view of a VMM arena) plus `bias_add_rowsum`, against a
/// host f64 computation of `y = W x + b`.
fn check_blas(gpu: &Gpu) -> Result<usize, String> {
    let err = |e: forkless_gpu::KernelError| e.to_string();
    let drv = |e: forkless_gpu::cudarc::driver::DriverError| format!("{e:?}");
    let (outputs, inputs, batch) = (300usize, 200usize, 5usize);
    let w: Vec<f32> = host_inputs(11, outputs * inputs).iter().map(|v| v / (inputs as f32).sqrt()).collect();
    let b: Vec<f32> = host_inputs(12, outputs).iter().map(|v| v / 10.0).collect();
    let x: Vec<f32> = (0..batch as u64).flat_map(|s| host_inputs(100 + s, inputs)).collect();
    let bias_at = forkless_gpu::round_up((w.len() * 4) as u64, 256).unwrap_or(0);
    let arena = VmmArena::create(gpu, bias_at + (b.len() * 4) as u64).map_err(gpu_err)?;
    arena.write_at(0, &f32_bytes(&w)).map_err(gpu_err)?;
    arena.write_at(bias_at, &f32_bytes(&b)).map_err(gpu_err)?;
    let stream = gpu.context().default_stream();
    let blas = forkless_gpu::Blas::new(stream.clone()).map_err(gpu_err)?;
    let kernels = forkless_gpu::Kernels::compile(gpu).map_err(err)?;
    let d_x = stream.clone_htod(&x).map_err(drv)?;
    let mut d_y = stream.alloc_zeros::<f32>(batch * outputs).map_err(drv)?;
    let mut d_sum = stream.alloc_zeros::<f64>(batch).map_err(drv)?;
    let mut d_head = stream.alloc_zeros::<f32>(batch * 8).map_err(drv)?;
    let w_view = arena.view::<f32>(0, w.len()).map_err(gpu_err)?;
    let b_view = arena.view::<f32>(bias_at, b.len()).map_err(gpu_err)?;
    blas.linear(w_view, outputs, inputs, &d_x, &mut d_y, batch).map_err(gpu_err)?;
    kernels.bias_add_rowsum(&stream, &mut d_y, b_view, &mut d_sum, &mut d_head, batch, 8).map_err(err)?;
    stream.synchronize().map_err(drv)?;
    let y = stream.clone_dtoh(&d_y).map_err(drv)?;
    let mut worst = 0f64;
    for (row, xs) in x.chunks(inputs).enumerate() {
        for o in 0..outputs {
            let want: f64 =
                w[o * inputs..][..inputs].iter().zip(xs).map(|(a, c)| f64::from(*a) * f64::from(*c)).sum::<f64>()
                    + f64::from(b[o]);
            worst = worst.max((f64::from(y[row * outputs + o]) - want).abs());
        }
    }
    let pass = worst < 1e-4;
    println!(
        "{} cublas linear {outputs}x{inputs} batch {batch} (weights via a view): worst abs error {worst:.2e}",
        verdict(pass)
    );
    Ok(usize::from(!pass))
}

/// `linear_small` against a host f64 product, for batch sizes across both kernels, rows that do
/// not fill a block and several shared-memory chunks; shapes it must decline are declined.
fn check_linear_small(gpu: &Gpu, k: &forkless_gpu::Kernels) -> Result<usize, String> {
    let err = |e: forkless_gpu::KernelError| e.to_string();
    let drv = |e: forkless_gpu::cudarc::driver::DriverError| format!("{e:?}");
    let stream = gpu.context().default_stream();
    let mut failed = 0;
    for (outputs, inputs, batch) in
        [(1000usize, 512usize, 1usize), (777, 2052, 8), (333, 1028, 13), (65, 4, 16), (50, 3000, 9)]
    {
        let w: Vec<f32> = host_inputs(21, outputs * inputs).iter().map(|v| v / (inputs as f32).sqrt()).collect();
        let x: Vec<f32> = (0..batch as u64).flat_map(|s| host_inputs(300 + s, inputs)).collect();
        let arena = VmmArena::create(gpu, (w.len() * 4) as u64).map_err(gpu_err)?;
        arena.write_at(0, &f32_bytes(&w)).map_err(gpu_err)?;
        let w_view = arena.view::<f32>(0, w.len()).map_err(gpu_err)?;
        let d_x = stream.clone_htod(&x).map_err(drv)?;
        let mut d_y = stream.clone_htod(&vec![f32::NAN; batch * outputs]).map_err(drv)?;
        let ran = k.linear_small(&stream, w_view, outputs, inputs, &d_x, &mut d_y, batch).map_err(err)?;
        stream.synchronize().map_err(drv)?;
        let y = stream.clone_dtoh(&d_y).map_err(drv)?;
        let mut worst = 0f64;
        for (row, xs) in x.chunks(inputs).enumerate() {
            for o in 0..outputs {
                let terms = w[o * inputs..][..inputs].iter().zip(xs).map(|(a, c)| f64::from(*a) * f64::from(*c));
                let (want, scale) = terms.fold((0f64, 0f64), |(s, m), t| (s + t, m + t.abs()));
                let got = f64::from(y[row * outputs + o]);
                let error = if got.is_finite() { (got - want).abs() / scale.max(1e-12) } else { f64::INFINITY };
                worst = worst.max(error);
            }
        }
        let pass = ran && worst < 1e-6;
        failed += usize::from(!pass);
        println!(
            "{} linear_small {outputs}x{inputs} batch {batch}: ran {ran}, worst error {worst:.2e} of the sum of |terms|",
            verdict(pass)
        );
    }
    let w_arena = VmmArena::create(gpu, 64 * 6 * 4).map_err(gpu_err)?;
    let x = stream.alloc_zeros::<f32>(17 * 8).map_err(drv)?;
    let mut y = stream.alloc_zeros::<f32>(17 * 64).map_err(drv)?;
    let odd = k.linear_small(&stream, w_arena.view::<f32>(0, 64 * 6).map_err(gpu_err)?, 64, 6, &x, &mut y, 2);
    let big = k.linear_small(&stream, w_arena.view::<f32>(0, 64 * 8).map_err(gpu_err)?, 64, 8, &x, &mut y, 17);
    let pass = matches!(odd, Ok(false)) && matches!(big, Ok(false));
    failed += usize::from(!pass);
    println!("{} linear_small declines inputs % 4 != 0 ({odd:?}) and batch 17 ({big:?})", verdict(pass));
    Ok(failed)
}

/// Loading twice with a cache folder: the second load reads the CUBIN the first one stored.
fn check_kernel_cache(gpu: &Gpu) -> Result<usize, String> {
    let err = |e: forkless_gpu::KernelError| e.to_string();
    let folder = std::env::temp_dir().join(format!("forkless-gpu-probe-cache-{}", std::process::id()));
    std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
    let first = forkless_gpu::Kernels::load(gpu, Some(&folder)).map_err(err)?;
    let second = forkless_gpu::Kernels::load(gpu, Some(&folder)).map_err(err)?;
    let _ = std::fs::remove_dir_all(&folder);
    let pass = first.loaded_from() == forkless_gpu::kernels::LoadedFrom::Compiled
        && second.loaded_from() == forkless_gpu::kernels::LoadedFrom::Cache;
    println!(
        "{} kernel cache: first load from {} in {:.1} ms, second from {} in {:.1} ms",
        verdict(pass),
        first.loaded_from(),
        first.compile_time().as_secs_f64() * 1e3,
        second.loaded_from(),
        second.compile_time().as_secs_f64() * 1e3
    );
    Ok(usize::from(!pass))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_splitmix_matches_the_reference_sequence() {
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        // Draw i is computable on its own, as the kernel does it.
        let gamma = 0x9E37_79B9_7F4A_7C15u64;
        let mut seq = SplitMix64(7);
        let draws: Vec<u64> = (0..5).map(|_| seq.next_u64()).collect();
        for (i, &d) in draws.iter().enumerate() {
            let mut one = SplitMix64(7u64.wrapping_add((i as u64).wrapping_mul(gamma)));
            assert_eq!(one.next_u64(), d);
        }
        assert!(host_inputs(3, 1000).iter().all(|v| (-1.0..1.0).contains(v)));
    }

    #[test]
    fn pattern_is_consistent_at_any_offset() {
        let whole = pattern(0, 100);
        for off in 0..40 {
            assert_eq!(pattern(off, 37), whole[off as usize..off as usize + 37]);
        }
        assert_ne!(pattern(0, 8), pattern(8, 8));
    }

    #[test]
    fn report_parsing() {
        let r = parse_report("a=1\nb = x y\nnoise\n");
        assert_eq!(r["a"], "1");
        assert_eq!(r["b"], "x y");
        assert_eq!(r.len(), 2);
    }
}
