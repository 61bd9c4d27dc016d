//! Backend selection (`--backend auto|host|cuda`, `[model] backend`): on a machine without a
//! usable GPU (CI), `auto` and `host` serve from host memory, and `cuda` fails at once with a
//! message that says what to do, leaving no process behind. Where a GPU is usable, the
//! assertions that need its absence are skipped.

use std::ffi::OsStr;

use crate::util::*;

/// Marks every process a test's supervisor starts (they inherit its environment; not a
/// `FORKLESS_*` name, which the supervisor keeps from its children), so the test
/// can look for leftovers without mistaking another test's processes for its own.
const MARK: &str = "FLTEST_BACKEND_MARK";

/// Whether `supervisor probe-gpu` finds a usable GPU here: (usable, its one output line).
fn probe_gpu() -> (bool, String) {
    let (usable, stdout, stderr) = supervisor_command(&[OsStr::new("probe-gpu")]);
    (usable, format!("{stdout}{stderr}"))
}

/// Processes still alive that carry `mark` in their environment.
fn marked_processes(mark: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| alive(pid) && env_of(pid, MARK).as_deref() == Some(mark))
        .collect()
}

/// Starts `supervisor run ARGS CONFIG` and checks it refuses the cuda backend: a non-zero
/// exit, a message naming the backend and the way out, and no process left.
fn assert_cuda_refused(dir: &TestDir, config: &std::path::Path, args: &[&str]) {
    let mark = dir.path().display().to_string();
    let mut sup = Supervisor::start_with(config, args, &[(MARK, OsStr::new(&mark))]);
    let status = sup.wait_exit();
    let log = sup.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("backend cuda: no usable GPU on device 0"), "{log}");
    assert!(log.contains("--backend host"), "the message says what to do: {log}");
    assert!(!log.contains("started owner") && !log.contains("started worker"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(marked_processes(&mark), Vec::<u32>::new(), "processes left behind; log:\n{log}");
}

#[test]
fn cuda_flag_without_a_gpu_exits_with_what_to_do() {
    if probe_gpu().0 {
        return; // a usable GPU: --backend cuda is expected to work here
    }
    let dir = TestDir::new();
    dir.write_model();
    assert_cuda_refused(&dir, &dir.write_config(2, ""), &["--backend", "cuda"]);
}

#[test]
fn cuda_in_the_config_without_a_gpu_exits_with_what_to_do() {
    if probe_gpu().0 {
        return;
    }
    let dir = TestDir::new();
    dir.write_model();
    assert_cuda_refused(&dir, &dir.write_config(2, "backend = \"cuda\""), &[]);
}

#[test]
fn the_flag_overrides_the_config() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(1, "backend = \"cuda\"");
    let mut sup = Supervisor::start_with(&config, &["--backend", "host"], &[]);
    let addr = sup.wait_ready();
    assert_eq!(infer_seed(&addr, 4)["y_sum"].as_f64().unwrap(), expected_answer(4).0);
}

#[test]
fn host_backend_serves_and_children_are_told() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(2, "");
    let mut sup = Supervisor::start_with(&config, &["--backend", "host"], &[]);
    sup.wait_for("backend host", |_| true);
    let addr = sup.wait_ready();
    assert_eq!(infer_seed(&addr, 5)["y_sum"].as_f64().unwrap(), expected_answer(5).0);
    for pid in children_of(sup.pid()) {
        assert_eq!(env_of(pid, "FORKLESS_BACKEND").as_deref(), Some("host"), "pid {pid}");
        assert_eq!(env_of(pid, "FORKLESS_CUDA_DEVICE"), None, "pid {pid}");
        assert_eq!(env_of(pid, "FORKLESS_KERNEL_CACHE"), None, "pid {pid}");
    }
    let (ok, json, err) = control(&config, "status", &["--json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["backend"]["kind"], "host", "{json}");
    let (ok, table, err) = control(&config, "status", &[]);
    assert!(ok && table.lines().any(|l| l == "backend host"), "{table}{err}");
}

#[test]
fn auto_backend_serves_on_any_machine() {
    let (gpu, _) = probe_gpu();
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start_with(&dir.write_config(1, ""), &["--backend", "auto"], &[]);
    let addr = sup.wait_ready();
    let answer = infer_seed(&addr, 6);
    if gpu {
        return; // served from the GPU; its rounding is checked by the GPU tests
    }
    let log = sup.log_text();
    assert!(log.contains("no usable GPU") && log.contains("backend host"), "{log}");
    assert_eq!(answer["y_sum"].as_f64().unwrap(), expected_answer(6).0);
    for pid in sup.children("worker") {
        assert_eq!(env_of(pid, "FORKLESS_BACKEND").as_deref(), Some("host"));
    }
}

#[test]
fn a_reload_never_changes_the_running_backend() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(1, "backend = \"host\"");
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let text = std::fs::read_to_string(&config).unwrap().replace("backend = \"host\"", "backend = \"cuda\"");
    std::fs::write(&config, text).unwrap();
    sup.signal(libc::SIGHUP);
    let warning = sup.wait_for("[model] backend changed from host to cuda", |_| true);
    assert!(warning["message"].as_str().unwrap().contains("keeping backend host"), "{warning}");
    sup.wait_for("reload done", |_| true);
    for pid in sup.children("worker") {
        assert_eq!(env_of(pid, "FORKLESS_BACKEND").as_deref(), Some("host"));
    }
    assert_eq!(infer_seed(&addr, 8)["y_sum"].as_f64().unwrap(), expected_answer(8).0);
}

#[test]
fn probe_gpu_says_why_there_is_no_gpu() {
    let (usable, output) = probe_gpu();
    if usable {
        return;
    }
    let report: serde_json::Value = serde_json::from_str(output.trim()).unwrap_or_else(|e| panic!("{e}: {output}"));
    assert_eq!(report["usable"], false, "{output}");
    assert_eq!(report["device"], 0, "{output}");
    assert!(report["error"].as_str().is_some_and(|e| e.contains(": ")), "the error says what to do: {output}");
}
