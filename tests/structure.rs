//! The structure stays simple (issue 10): no module of a crate depends on another that depends
//! back on it, and `unsafe` appears only where the workspace lints allow it. Read from the
//! sources, so a new cycle or a stray `unsafe` fails here with the modules named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The modules (top-level files of `src/`) each module names through `crate::…` in code (doc
/// comments and test modules left out: a doc link is not a dependency).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut deps = BTreeSet::new();
        for line in code.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    let group = group.split('}').next().unwrap_or_default();
                    deps.extend(group.split(',').map(|item| item.trim().split("::").next().unwrap_or("").to_string()));
                } else {
                    deps.insert(rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect());
                }
            }
        }
        deps.retain(|d: &String| !d.is_empty() && *d != name);
        graph.insert(name, deps);
    }
    graph
}

/// Pairs (a, b) where a names b and b reaches a again.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<(String, String)> {
    let reaches = |from: &str, to: &str| {
        let (mut seen, mut stack) = (BTreeSet::new(), vec![from.to_string()]);
        while let Some(m) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        false
    };
    let mut found = Vec::new();
    for (a, deps) in graph {
        for b in deps.iter().filter(|b| graph.contains_key(*b)) {
            if reaches(b, a) {
                found.push((a.clone(), b.clone()));
            }
        }
    }
    found
}

fn crate_sources() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path().join("src"))
        .filter(|p| p.is_dir())
        .collect();
    dirs.push(root.join("python/src"));
    dirs.sort();
    dirs
}

#[test]
fn no_module_depends_on_a_module_that_depends_back_on_it() {
    let mut all = Vec::new();
    for src in crate_sources() {
        for (a, b) in cycles(&module_graph(&src)) {
            all.push(format!("{}: {a} <-> {b}", src.display()));
        }
    }
    assert!(all.is_empty(), "module cycles:\n{}", all.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
        ("d".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    let found = cycles(&graph);
    assert!(found.contains(&("a".into(), "b".into())) && found.contains(&("c".into(), "a".into())), "{found:?}");
    assert!(!found.iter().any(|(a, _)| a == "d"), "d is outside the cycle: {found:?}");
}

#[test]
fn unsafe_is_allowed_only_in_bus_gpu_and_the_python_ffi_edge() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("unsafe_code = \"deny\"") && manifest.contains("undocumented_unsafe_blocks = \"deny\""));
    let mut allowed = Vec::new();
    let mut stack = vec![root.join("crates"), root.join("src"), root.join("examples"), root.join("python/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.ends_with("target") {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && std::fs::read_to_string(&path).unwrap().contains("allow(unsafe_code)")
            {
                allowed.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let stray: Vec<&String> = allowed
        .iter()
        .filter(|p| !(p.starts_with("crates/bus/") || p.starts_with("crates/gpu/") || *p == "python/src/lib.rs"))
        .collect();
    assert!(stray.is_empty(), "unsafe allowed outside bus, gpu and python's dlpack: {stray:?}");
    for member in ["bus", "chaos", "gpu", "owner", "weights", "worker", "supervisor"] {
        let toml = std::fs::read_to_string(root.join("crates").join(member).join("Cargo.toml")).unwrap();
        assert!(toml.contains("[lints]\nworkspace = true"), "crates/{member} does not take the workspace lints");
    }
}
