//! One copy of the weights: every worker maps the same sealed memfd, read-only.

use crate::util::*;

const ARENA_NAME: &str = "/memfd:forkless-arena";

fn arena_mappings(pid: u32) -> Vec<Mapping> {
    smaps(pid).into_iter().filter(|m| m.path.starts_with(ARENA_NAME)).collect()
}

#[test]
fn workers_share_one_read_only_copy() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&dir.write_config(4, ""));
    sup.wait_ready();
    let workers = sup.children("worker");
    assert_eq!(workers.len(), 4, "children: {:?}", children_of(sup.pid()));

    let maps: Vec<Mapping> = workers.iter().flat_map(|&pid| arena_mappings(pid)).collect();
    assert_eq!(maps.len(), 4, "one arena mapping per worker: {maps:#?}");
    let arena_kb = maps[0].size_kb;
    assert!(arena_kb * 1024 >= (IN * OUT * 4) as u64);
    for m in &maps {
        assert_eq!(m.inode, maps[0].inode, "every worker maps the same memfd");
        assert_eq!(m.perms, "r--s", "shared and read-only");
        // Warm-up touched every page of the weights.
        assert!(m.rss_kb * 100 >= arena_kb * 95, "{m:?}");
    }
    let rss: u64 = maps.iter().map(|m| m.rss_kb).sum();
    let pss: u64 = maps.iter().map(|m| m.pss_kb).sum();
    assert!(rss >= 4 * arena_kb * 95 / 100, "summed Rss {rss} kB ~ 4 arenas of {arena_kb} kB");
    assert!(pss <= arena_kb * 102 / 100, "summed Pss {pss} kB ~ one arena of {arena_kb} kB");

    // Neither the owner nor the supervisor maps the weights.
    for pid in sup.children("owner").into_iter().chain([sup.pid()]) {
        assert!(arena_mappings(pid).is_empty(), "pid {pid} maps the arena");
    }
}

#[test]
fn sharing_none_gives_each_worker_its_own_copy() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&dir.write_config(2, "sharing = \"none\""));
    let addr = sup.wait_ready();
    assert!(sup.children("owner").is_empty(), "no owner without sharing");
    let (y_sum, _) = expected_answer(5);
    assert_eq!(infer_seed(&addr, 5)["y_sum"].as_f64().unwrap(), y_sum);
    for pid in sup.children("worker") {
        assert!(arena_mappings(pid).is_empty());
        let private_kb: u64 = smaps(pid)
            .iter()
            .filter(|m| m.path.is_empty() && m.size_kb * 1024 >= (IN * OUT * 4) as u64)
            .map(|m| m.pss_kb)
            .max()
            .unwrap_or(0);
        assert!(private_kb * 1024 >= (IN * OUT * 4) as u64 * 95 / 100, "pid {pid} holds a private copy");
    }
}
