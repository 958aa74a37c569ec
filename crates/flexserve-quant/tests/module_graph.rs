//! The kernel crate's modules import one another without loops: shared
//! helpers live in modules that import no kernel family, and no two families
//! import each other (directly or around a longer cycle). A module may use
//! its ancestors' items (they are its namespace) and the crate root's.
//!
//! The check reads the sources: every `crate::`, `super::` and `self::` path
//! (in `use` items and inline), resolved to the deepest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`legacy::tile_avx512::direct`; "" for the crate root) of
/// each source file under `src`, with its text.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src").with_extension("");
            let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            found.insert(parts.join("::"), text);
        }
    }
    found
}

/// The text without comments and string or character literals (so that a
/// path in a doc comment or a message is not taken for an import).
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1).copied()) {
            (b'/', Some(b'/')) => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            (b'/', Some(b'*')) => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            (b'"', _) => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push(' ');
            }
            // A character literal ('x', '\n'), not a lifetime ('a).
            (b'\'', _) if bytes.get(i + 2) == Some(&b'\'') || bytes.get(i + 1) == Some(&b'\\') => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'\'' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push(' ');
            }
            (c, _) => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path that starts with `crate::`, `super::` or `self::` in `code`,
/// as segment lists, with `{...}` groups expanded one level per segment.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts = ["crate::", "super::", "self::"].iter().find(|s| code_at(&chars, i, s));
        let preceded = i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == ':');
        match starts {
            Some(_) if !preceded => {
                let (mut expanded, end) = path_at(&chars, i);
                found.append(&mut expanded);
                i = end.max(i + 1);
            }
            _ => i += 1,
        }
    }
    found
}

fn code_at(chars: &[char], i: usize, s: &str) -> bool {
    s.chars().enumerate().all(|(k, c)| chars.get(i + k) == Some(&c))
}

/// The path starting at `i` (segments, and groups expanded), and where it ends.
fn path_at(chars: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    loop {
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        if chars.get(i) == Some(&'{') {
            // A group: each member continues the prefix.
            let mut all = Vec::new();
            i += 1;
            loop {
                while chars.get(i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                    i += 1;
                }
                match chars.get(i) {
                    None => return (all, i),
                    Some('}') => return (all, i + 1),
                    _ => {}
                }
                let (members, end) = path_at(chars, i);
                for m in members {
                    let mut p = prefix.clone();
                    p.extend(m);
                    all.push(p);
                }
                if end == i {
                    i += 1;
                } else {
                    i = end;
                }
            }
        }
        let start = i;
        while chars.get(i).is_some_and(|&c| is_ident(c)) {
            i += 1;
        }
        if i == start {
            return (vec![prefix], i);
        }
        prefix.push(chars[start..i].iter().collect());
        if code_at(chars, i, "::") {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// The deepest module that `path`, written in module `from`, names.
fn resolve(from: &str, path: &[String], known: &BTreeSet<String>) -> Option<String> {
    let mut base: Vec<String> = if from.is_empty() { Vec::new() } else { from.split("::").map(String::from).collect() };
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => base.clear(),
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
            return deepest(base, rest, known);
        }
        Some("self") => {}
        _ => return None,
    }
    deepest(base, &rest[1..], known)
}

fn deepest(mut base: Vec<String>, rest: &[String], known: &BTreeSet<String>) -> Option<String> {
    for segment in rest {
        base.push(segment.clone());
        if !known.contains(&base.join("::")) {
            base.pop();
            break;
        }
    }
    Some(base.join("::"))
}

fn is_ancestor(ancestor: &str, of: &str) -> bool {
    ancestor.is_empty() || of.starts_with(&format!("{ancestor}::"))
}

/// A cycle in `edges`, as the modules around it, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match marks.get(next) {
                Some(Mark::Open) => {
                    let from = stack.iter().position(|m| m == next).expect("open nodes are on the stack");
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(cycle) = visit(next, edges, marks, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in edges.keys() {
        if !marks.contains_key(node) {
            if let Some(cycle) = visit(node, edges, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// The groups of modules that import one another around loops (strongly
/// connected components of more than one module), each sorted.
fn loops(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Modules reachable both ways lie in one group.
    let nodes: BTreeSet<&String> = edges.keys().chain(edges.values().flatten()).collect();
    let reach = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for next in edges.get(&n).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> = nodes.iter().map(|&n| (n, reach(n))).collect();
    let mut groups: BTreeSet<Vec<String>> = BTreeSet::new();
    for &n in &nodes {
        let group: Vec<String> = nodes
            .iter()
            .filter(|&&m| reachable[n].contains(m) && reachable[m].contains(n))
            .map(|m| m.to_string())
            .collect();
        if group.len() > 1 {
            groups.insert(group);
        }
    }
    groups.into_iter().collect()
}

/// The import edges between the modules of `sources` (module -> text),
/// leaving out uses of the crate root and of a module's own ancestors.
fn import_edges(sources: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let known: BTreeSet<String> = sources.keys().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in sources {
        for path in paths(&code_only(text)) {
            let Some(target) = resolve(module, &path, &known) else { continue };
            if target == *module || is_ancestor(&target, module) {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    edges
}

#[test]
fn the_kernel_modules_import_without_loops() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let sources = modules(&src);
    assert!(sources.len() > 20, "found only {} modules under {}", sources.len(), src.display());
    let edges = import_edges(&sources);
    // The reader sees real imports (guards against a parser that finds none).
    assert!(
        edges.get("legacy::tile_avx2").is_some_and(|t| t.contains("legacy::gemv_avx2") && t.contains("simd::avx2")),
        "legacy::tile_avx2's imports were not found: {:?}",
        edges.get("legacy::tile_avx2")
    );
    if let Some(cycle) = find_cycle(&edges) {
        panic!("modules of flexserve-quant import each other in a loop: {}", cycle.join(" -> "));
    }
}

/// The same rule for every crate of the workspace (this test runs from the
/// kernel crate, where the rule began; it reads the sibling crates'
/// sources).
#[test]
fn no_crate_of_the_workspace_has_an_import_loop() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the crates folder").to_path_buf();
    let (mut checked, mut found) = (0, Vec::new());
    for entry in std::fs::read_dir(&crates).expect("the crates folder") {
        let folder = entry.expect("directory entry").path();
        let src = folder.join("src");
        if !src.is_dir() {
            continue;
        }
        checked += 1;
        let name = folder.file_name().expect("a crate folder").to_string_lossy().into_owned();
        for group in loops(&import_edges(&modules(&src))) {
            found.push(format!("{name}: {}", group.join(", ")));
        }
    }
    assert!(checked > 5, "found only {checked} crates under {}", crates.display());
    assert!(found.is_empty(), "modules import each other in a loop:\n{}", found.join("\n"));
}

#[test]
fn the_shared_simd_helpers_import_no_kernel_family() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = import_edges(&modules(&src));
    for (module, targets) in &edges {
        if module.starts_with("simd") {
            let families: Vec<&String> = targets
                .iter()
                .filter(|t| ["legacy", "kquants", "float", "repack"].iter().any(|f| t.starts_with(f)))
                .collect();
            assert!(families.is_empty(), "{module} (shared SIMD helpers) imports kernel families: {families:?}");
        }
    }
}

#[test]
fn the_checker_finds_a_planted_loop() {
    let sources: BTreeMap<String, String> = [
        ("".to_string(), "mod a; mod b; mod c;".to_string()),
        ("a".to_string(), "use crate::b::{x, y::z};\n// use crate::c::q; (a comment)".to_string()),
        ("b".to_string(), "fn f() { let s = \"crate::a::nothing\"; super::c::g(); }".to_string()),
        ("c".to_string(), "pub(crate) use crate::a::Thing;".to_string()),
    ]
    .into_iter()
    .collect();
    let edges = import_edges(&sources);
    assert_eq!(edges["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(edges["b"], BTreeSet::from(["c".to_string()]));
    assert_eq!(find_cycle(&edges), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
}
