//! Restarts and stops: a dead worker is replaced; TERM stops everything; children never
//! outlive the supervisor.

use crate::util::*;

#[test]
fn killed_worker_is_replaced_and_serves() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&dir.write_config(2, ""));
    let addr = sup.wait_ready();
    let victim = sup.children("worker")[0];
    let index: u64 = env_of(victim, "FORKLESS_INDEX").unwrap().parse().unwrap();
    send_signal(victim, libc::SIGKILL);
    sup.wait_for("ready", |line| line["index"] == index && line["pid"].as_u64() != Some(victim as u64));
    assert!(!sup.children("worker").contains(&victim));
    assert_eq!(sup.children("worker").len(), 2);
    assert_eq!(infer_seed(&addr, 9)["y_sum"].as_f64().unwrap(), expected_answer(9).0);
}

#[test]
fn sigterm_stops_everything_and_exits_zero() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&dir.write_config(3, ""));
    sup.wait_ready();
    let children = children_of(sup.pid());
    assert_eq!(children.len(), 4, "owner + 3 workers");
    let runtime_dir = sup.bus.clone().unwrap().parent().unwrap().to_path_buf();
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log_text());
    for pid in children {
        assert!(!alive(pid), "child {pid} outlived the supervisor");
    }
    assert!(!runtime_dir.exists(), "runtime dir {} was left behind", runtime_dir.display());
}

#[test]
fn children_die_with_a_killed_supervisor() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&dir.write_config(2, ""));
    sup.wait_ready();
    let children = children_of(sup.pid());
    assert_eq!(children.len(), 3);
    sup.signal(libc::SIGKILL);
    sup.wait_exit();
    for pid in children {
        eventually(&format!("child {pid} to die with the supervisor"), || !alive(pid));
    }
}
