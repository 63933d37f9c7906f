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

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e` (any depth of braces).
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let item = tree.split(" as ").next().unwrap_or("").trim();
        return if item.is_empty() || item == "self" { Vec::new() } else { vec![item.to_string()] };
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    // Split the inner list on top-level commas.
    let (mut depth, mut start, mut items) = (0, 0, Vec::new());
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items.into_iter().flat_map(expand).map(|p| if prefix.is_empty() { p } else { format!("{prefix}::{p}") }).collect()
}

/// Every path a file names, as written: each `use` tree expanded, and `crate::…` paths in code.
/// Comments and string literals are dropped first.
fn named_paths(text: &str) -> Vec<String> {
    let mut code = String::with_capacity(text.len());
    let mut in_str = false;
    for line in text.lines() {
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if !in_str && c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' {
                in_str = !in_str;
                continue;
            }
            if !in_str {
                code.push(c);
            }
        }
        code.push('\n');
    }
    let mut out = Vec::new();
    for stmt in code.split(';') {
        let stmt = stmt.trim();
        let body = stmt
            .strip_prefix("pub use ")
            .or_else(|| stmt.strip_prefix("pub(crate) use "))
            .or_else(|| stmt.strip_prefix("use "));
        if let Some(tree) = body {
            out.extend(expand(tree));
        }
    }
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(pos) = code[i..].find("crate::") {
        let start = i + pos;
        let mut end = start + "crate::".len();
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':') {
            end += 1;
        }
        // `crate::a::{…}` is a use tree, read whole above.
        if bytes.get(end) != Some(&b'{') {
            out.push(code[start..end].trim_end_matches(':').to_string());
        }
        i = end;
    }
    out
}

/// A path named in module `m`, as a path from the crate root (`crate::`, `super::`, `self::` and
/// a child module's name resolved); `None` for other crates.
fn absolute(m: &str, path: &str, modules: &BTreeMap<String, PathBuf>) -> Option<String> {
    let parent = |m: &str| m.rsplit_once("::").map_or(String::new(), |(p, _)| p.to_string());
    let join = |a: &str, b: &str| if a.is_empty() { b.to_string() } else { format!("{a}::{b}") };
    if let Some(rest) = path.strip_prefix("crate::") {
        return Some(rest.to_string());
    }
    if let Some(rest) = path.strip_prefix("super::") {
        return Some(join(&parent(m), rest));
    }
    if let Some(rest) = path.strip_prefix("self::") {
        return Some(join(m, rest));
    }
    let first = path.split("::").next().unwrap_or("");
    modules.contains_key(&join(m, first)).then(|| join(m, path))
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
        let targets = named_paths(&text)
            .iter()
            .filter_map(|p| absolute(m, p, &modules))
            .filter_map(|p| resolve(&p))
            .filter(|t| t != m)
            .collect();
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
fn the_path_reader_sees_every_kind_of_import() {
    let text = "use crate::data::{Mixer, tokenize::{TokenizeOptions, tokenize}};\nuse super::step::StepInput;\n\
                pub use document::{DocStream, Document as Doc};\nlet u = \"https://x\"; let x = crate::rng::shuffle(v); // crate::no";
    let paths = named_paths(text);
    for want in [
        "crate::data::Mixer",
        "crate::data::tokenize::TokenizeOptions",
        "crate::data::tokenize::tokenize",
        "super::step::StepInput",
        "document::DocStream",
        "document::Document",
        "crate::rng::shuffle",
    ] {
        assert!(paths.iter().any(|p| p == want), "{want} missing from {paths:?}");
    }
    assert!(!paths.iter().any(|p| p.contains("no")), "{paths:?}");
    let modules: BTreeMap<String, PathBuf> = ["data", "data::document", "crosscoder::train", "crosscoder::train::step"]
        .map(|m| (m.to_string(), PathBuf::new()))
        .into();
    assert_eq!(absolute("data", "document::Doc", &modules).as_deref(), Some("data::document::Doc"));
    assert_eq!(
        absolute("crosscoder::train::dense", "super::step::X", &modules).as_deref(),
        Some("crosscoder::train::step::X")
    );
    assert_eq!(absolute("data", "serde::Deserialize", &modules), None);
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

#[test]
fn the_device_resident_step_uses_no_op_that_syncs_with_the_host_or_is_quadratic() {
    // burn 0.22's argsort/sort fall back to a host sort (a blocking read), argwhere reads the
    // count back, cumsum (and arange, built on it under fusion) is quadratic on cubecl, and a
    // scatter-add onto a vector runs on one thread: the resident route must not use them (the
    // readback counter cannot see burn's own reads).
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/crosscoder/train/resident.rs"))
        .unwrap();
    for op in [
        ".argsort(",
        ".sort(",
        ".sort_with_indices(",
        ".argwhere(",
        ".cumsum(",
        "::arange(",
        ".select_assign(",
        ".into_data(",
        ".topk",
    ] {
        assert!(!src.contains(op), "src/crosscoder/train/resident.rs uses `{op}`");
    }
}
