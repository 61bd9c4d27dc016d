//! The weights outlive their owner: the supervisor keeps the arena's fd in escrow, and a
//! restarted owner re-adopts it (checksums verified) without reading the weights file.

use crate::util::*;

fn restart_config(dir: &TestDir, workers: u32) -> std::path::PathBuf {
    let config = dir.write_config(workers, "");
    // Owner restarts quickly and without growing delays, however often it is killed.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("backoff_initial_ms = 50", "backoff_initial_ms = 10\nbackoff_max_ms = 20\nmax_restarts = 1000");
    std::fs::write(&config, text).unwrap();
    config
}

#[test]
fn owner_crash_is_repaired_from_escrow_without_the_weights_file() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&restart_config(&dir, 2));
    let addr = sup.wait_ready();
    std::fs::rename(dir.model_path(), dir.path().join("moved-away")).unwrap();

    let load = Load::start(&addr, 21);
    let owner = sup.children("owner")[0];
    send_signal(owner, libc::SIGKILL);
    let adopted = sup.wait_for("re-adopted", |_| true);
    assert_eq!(adopted["generation"], 1);
    assert!(adopted["recovered_ms"].is_f64(), "{adopted}");
    let new_owner = sup.children("owner");
    assert_eq!(new_owner.len(), 1);
    assert_ne!(new_owner[0], owner);

    // A worker killed now comes back attached, from escrow alone.
    let worker = sup.children("worker")[0];
    send_signal(worker, libc::SIGKILL);
    sup.wait_for("ready", |l| l["pid"].as_u64().is_some_and(|p| p != worker as u64));
    assert_eq!(infer_seed(&addr, 21)["generation"], 1);

    let report = load.stop();
    let expected = expected_answer(21).0;
    assert!(report.ok > 0);
    assert_eq!(report.answers.len(), 1, "one answer, one generation: {:?}", report.answers);
    let (y_sum, generation) = report.answers.iter().next().unwrap();
    assert_eq!((y_sum.parse::<f64>().unwrap(), *generation), (expected, 1));
    // Only the killed worker's in-flight requests may fail; the owner's death fails none.
    assert!(report.failures.len() <= 1, "failures: {:?}", report.failures);
    assert_eq!(arena_fds(sup.pid()).len(), 1, "the supervisor escrows exactly one arena");
}

#[test]
fn a_hundred_owner_kills_leak_nothing() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&restart_config(&dir, 2));
    let addr = sup.wait_ready();
    let fds_before = fd_count(sup.pid());
    let workers = sup.children("worker");
    for round in 0..100 {
        let owner = *sup.children("owner").first().unwrap_or_else(|| panic!("no owner in round {round}"));
        send_signal(owner, libc::SIGKILL);
        sup.wait_for("re-adopted", |_| true);
        eventually("the new owner to be listed", || sup.children("owner").first().is_some_and(|&p| p != owner));
    }
    assert_eq!(fd_count(sup.pid()), fds_before, "supervisor fds: {fds_before} before");
    assert_eq!(arena_fds(sup.pid()).len(), 1, "one arena in escrow");
    assert_eq!(sup.children("worker"), workers, "workers were never disturbed");
    assert_eq!(sup.children("owner").len(), 1);
    for &pid in &workers {
        assert_eq!(smaps(pid).iter().filter(|m| m.path.starts_with("/memfd:forkless-arena")).count(), 1);
    }
    assert_eq!(infer_seed(&addr, 4)["y_sum"].as_f64().unwrap(), expected_answer(4).0);
}
