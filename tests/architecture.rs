//! The structure the README's development section promises: engine modules without import cycles,
//! no source file over 500 lines, and no UI dependency in the engine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `src/a/b.rs` and `src/a/b/mod.rs` → `a::b`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// Every `crate::…` path a file names (in `use` groups too), comments dropped.
fn crate_paths(text: &str) -> Vec<String> {
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(pos) = code[i..].find("crate::") {
        let start = i + pos + "crate::".len();
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':') {
            end += 1;
        }
        let prefix = code[start..end].trim_end_matches(':').to_string();
        if end < bytes.len() && bytes[end] == b'{' {
            // `crate::a::{b, c::d}`: one path per item (one level of braces is all the code uses).
            let close = code[end..].find('}').map_or(bytes.len(), |c| end + c);
            for item in code[end + 1..close].split(',') {
                let item = item.trim().split(" as ").next().unwrap_or("").trim();
                if !item.is_empty() {
                    out.push(format!("{prefix}::{item}"));
                }
            }
            i = close;
        } else {
            out.push(prefix);
            i = end;
        }
    }
    out
}

#[test]
fn engine_modules_have_no_import_cycles() {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<String, PathBuf> =
        files.iter().map(|f| (module_of(&src, f), f.clone())).filter(|(m, _)| m != "lib").collect();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|m| modules.contains_key(m))
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, f) in &modules {
        let text = std::fs::read_to_string(f).unwrap();
        let targets = crate_paths(&text).iter().filter_map(|p| resolve(p)).filter(|t| t != m).collect();
        edges.insert(m.clone(), targets);
    }
    assert!(edges.len() > 30, "found only {} modules", edges.len());
    // A cycle exists iff some module reaches itself.
    let mut cycles = Vec::new();
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&String> = edges[start].iter().collect();
        while let Some(n) = stack.pop() {
            if n == start {
                cycles.push(start.clone());
                break;
            }
            if seen.insert(n.clone()) {
                stack.extend(edges[n].iter());
            }
        }
    }
    assert!(cycles.is_empty(), "modules on an import cycle: {cycles:?}");
}

#[test]
fn the_cycle_finder_sees_a_cycle() {
    // The parser the test above relies on: grouped and plain paths.
    let paths = crate_paths("use crate::data::{Mixer, tokenize::TokenizeOptions};\nlet x = crate::rng::shuffle(v); // crate::no");
    assert_eq!(paths, vec!["data::Mixer", "data::tokenize::TokenizeOptions", "rng::shuffle"]);
}

#[test]
fn no_source_file_over_500_lines() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("app/src"), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 500).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these: {long:?}");
}

#[test]
fn the_engine_has_no_ui_dependency() {
    let toml = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let deps = toml.split("[dependencies]").nth(1).unwrap().split("\n[").next().unwrap();
    for ui in ["eframe", "egui", "rfd", "winit", "indicatif"] {
        assert!(!deps.lines().any(|l| l.trim_start().starts_with(ui)), "the engine depends on {ui}");
    }
}
