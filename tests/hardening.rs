//! Bounded inputs (issue 10, items 5, 8, 9, 13, 14): absurd config numbers, a weights path
//! that is a FIFO, a hung NVML, floods of control and bus connections, and a closed stdout.
//! Each test reproduces what an operator (or a stray program) did to the released supervisor.

use std::ffi::OsStr;
use std::process::Command;

use crate::util::*;

/// Item 8: numbers that used to pass validation and then panic a supervisor thread (or be
/// handed to listen(2) as they were) are refused at start, naming the key and its line.
#[test]
fn absurd_config_numbers_are_refused_with_key_and_line() {
    let dir = TestDir::new();
    dir.write_model();
    let cases = [
        ("supervisor", "graceful_timeout_s = 1e300", "supervisor.graceful_timeout_s"),
        ("workers", "start_timeout_s = 1e300", "workers.start_timeout_s"),
        ("workers", "timeout_s = nan", "workers.timeout_s"),
        ("restart", "within_s = inf", "restart.within_s"),
        ("restart", "reset_after_s = -1", "restart.reset_after_s"),
        ("workers", "backlog = -1", "workers.backlog"),
        ("workers", "backlog = 0", "workers.backlog"),
        ("workers", "max_requests = 18446744073709551615", "workers.max_requests"),
    ];
    for (table, line, key) in cases {
        let mut extra = ConfigExtra::default();
        match table {
            "workers" => extra.workers_table = line,
            "restart" => extra.restart = line,
            _ => {}
        }
        let config = dir.write_config_with(&extra);
        let text = std::fs::read_to_string(&config).unwrap();
        let text = match table {
            "supervisor" => text.replace("graceful_timeout_s = 5", line),
            _ => text,
        };
        std::fs::write(&config, &text).unwrap();
        let line_number = text.lines().position(|l| l == line).unwrap() + 1;
        let mut sup = Supervisor::start(&config);
        let status = exits_before(&mut sup, "listening on");
        let log = sup.log_text();
        assert!(!status.success(), "{line}: {log}");
        assert!(log.contains(key) && log.contains(&format!("line {line_number}")), "{line}: {log}");
        assert!(!log.contains("panicked"), "{line}: {log}");
    }
}

/// Item 9: a weights path that is a FIFO is refused at start, naming the file and the key,
/// instead of blocking every owner in open() until its start timeout; and a hot swap to a
/// FIFO fails at once, naming the file, while the live generation keeps serving.
#[test]
fn a_fifo_as_weights_is_refused_not_waited_on() {
    let dir = TestDir::new();
    let fifo = dir.model_path();
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let config = dir.write_config(1, "");
    let mut sup = Supervisor::start(&config);
    let status = exits_before(&mut sup, "started owner");
    let log = sup.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("weights.safetensors") && log.contains("[model] path") && log.contains("FIFO"), "{log}");

    std::fs::remove_file(&fifo).unwrap();
    dir.write_model();
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let other = dir.path().join("other.safetensors");
    assert!(Command::new("mkfifo").arg(&other).status().unwrap().success());
    let (code, _, stderr) = control_guarded(&config, &["reload-model", other.to_str().unwrap()]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("other.safetensors") && stderr.contains("not a regular file"), "{stderr}");
    assert_eq!(infer_seed(&addr, 3)["generation"], 1, "the live generation keeps serving");
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log_text());
}

/// Item 14: `supervisor status` into a pipe nobody reads (`| head -0`) ends quietly with
/// status 0 (as ripgrep does) instead of panicking with status 101.
#[test]
fn status_into_a_closed_pipe_exits_quietly() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(1, "");
    let mut sup = Supervisor::start(&config);
    sup.wait_ready();
    for json in [false, true] {
        // A pipe without readers, as `| head -0` leaves it.
        let (read_end, write_end) = rustix::pipe::pipe().unwrap();
        drop(read_end);
        let mut args: Vec<&OsStr> = vec!["status".as_ref(), "-c".as_ref(), config.as_os_str()];
        if json {
            args.push("--json".as_ref());
        }
        let output = Command::new(supervisor_exe()).args(args).stdout(write_end).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "json {json}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Raises this test process's descriptor limit, so it can hold many connections open.
pub fn raise_own_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum }).unwrap();
}

/// Item 5: a GPU driver whose NVML hangs (here: a fake `libnvidia-ml.so.1` whose
/// `nvmlInit_v2` never returns, first on `LD_LIBRARY_PATH`) stalled the supervisor's runtime:
/// `status` hung. Now memory is read off the runtime with a timeout; `status` answers and
/// says why memory is unknown, and the service keeps restarting workers.
#[test]
fn a_hung_nvml_does_not_stall_the_supervisor() {
    let dir = TestDir::new();
    dir.write_model();
    let lib = dir.path().join("nvml");
    std::fs::create_dir(&lib).unwrap();
    let source = lib.join("fake-nvml.c");
    std::fs::write(
        &source,
        "#include <unistd.h>\n\
         int nvmlInit_v2(void) { for (;;) pause(); return 0; }\n\
         int nvmlInit(void) { return nvmlInit_v2(); }\n\
         int nvmlInitWithFlags(unsigned int flags) { (void)flags; return nvmlInit_v2(); }\n\
         int nvmlShutdown(void) { return 0; }\n",
    )
    .unwrap();
    let built =
        Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(lib.join("libnvidia-ml.so.1")).arg(&source).status();
    if !built.is_ok_and(|s| s.success()) {
        eprintln!("note: no working `cc` here: the hung-NVML test is skipped");
        return;
    }
    let config = dir.write_config(1, "");
    let mut sup = Supervisor::start_with(&config, &["--backend", "host"], &[("LD_LIBRARY_PATH", lib.as_os_str())]);
    let addr = sup.wait_ready();
    for _ in 0..2 {
        let (code, stdout, stderr) = control_guarded(&config, &["status", "--json"]);
        assert_eq!(code, Some(0), "{stderr}");
        let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let reason = status["memory_unknown"].as_str().unwrap_or_default();
        assert!(reason.contains("memory unknown") && reason.contains("NVML"), "{stdout}");
        assert_eq!(status["processes"].as_array().unwrap().len(), 2, "{stdout}");
    }
    let (code, stdout, _) = control_guarded(&config, &["status"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("memory unknown"), "{stdout}");
    let (code, _, stderr) = control_guarded(&config, &["restart", "0"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(infer_seed(&addr, 5)["y_sum"].as_f64().unwrap(), expected_answer(5).0);
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log_text());
}

/// Item 13: 1,500 idle control connections used to hold 1,500 of the supervisor's descriptors
/// (with the default limit of 1,024: `status` hung and a restarting worker failed with
/// EMFILE), and each refused bus connection wrote a WARN line. Now idle connections are
/// capped (the oldest make room for new ones) and refusals are logged once a second.
#[test]
fn floods_of_connections_are_bounded() {
    raise_own_fd_limit();
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(1, "");
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let control_path =
        forkless_supervisor::control::socket_path(&forkless_supervisor::config::Config::load(&config).unwrap());
    let idle: Vec<std::os::unix::net::UnixStream> =
        (0..1500).filter_map(|_| std::os::unix::net::UnixStream::connect(&control_path).ok()).collect();
    assert!(idle.len() > 1100, "only {} connections were accepted", idle.len());
    let (code, stdout, stderr) = control_guarded(&config, &["status", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"workers_wanted\""), "{stdout}");
    assert!(fd_count(sup.pid()) < 400, "the supervisor holds {} descriptors", fd_count(sup.pid()));
    let (code, _, stderr) = control_guarded(&config, &["restart", "0"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(infer_seed(&addr, 8)["y_sum"].as_f64().unwrap(), expected_answer(8).0);
    drop(idle);

    let bus = sup.bus.clone().unwrap();
    let before = sup.log.lock().unwrap().len();
    for _ in 0..500 {
        let stream = std::os::unix::net::UnixStream::connect(&bus).unwrap();
        let _ = std::io::Read::read_to_end(&mut &stream, &mut Vec::new());
    }
    // One more refusal once a second has passed logs a line counting the ones left out.
    eventually("a refusal line counting the suppressed ones", || {
        drop(std::os::unix::net::UnixStream::connect(&bus));
        std::thread::sleep(std::time::Duration::from_millis(100));
        sup.log_text().contains("more like it")
    });
    let refusals = sup.log.lock().unwrap()[before..].iter().filter(|l| l.contains("bus connection")).count();
    assert!(refusals < 50, "{refusals} log lines for 500 refused bus connections");
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log_text());
}
