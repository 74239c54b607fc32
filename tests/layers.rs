//! The library's layers go one direction. The map (module -> layer -> what
//! it may import) is the table between the `<!-- layers:begin/end -->`
//! markers of docs/design.md; this test reads it and the sources:
//!
//! - every module of `src/` (a file `src/x.rs` or a folder `src/x/`) is in
//!   the map, and every module of the map exists;
//! - the map itself points only down or sideways (a module may import
//!   modules of its own layer or below, never above), and has no cycle;
//! - every `crate::x` a module's code names (in `use` lists too, and
//!   items re-exported at the crate root, such as `crate::Status`) is allowed
//!   by the map: an upward import fails here, naming the file and the line;
//! - the imports actually made form no cycle;
//! - every `unsafe` block or impl of `src/` has a `// SAFETY:` comment.
//!
//! Needs neither etcd nor the library.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// module -> (layer, modules it may import).
type Map = BTreeMap<String, (u32, BTreeSet<String>)>;

fn names(cell: &str) -> BTreeSet<String> {
    cell.split(',')
        .map(|s| s.trim().trim_matches('`').to_owned())
        .filter(|s| !s.is_empty() && s != "-")
        .collect()
}

/// The table `| layer | module | may import |` of docs/design.md.
fn declared_map(design: &str) -> Map {
    let start = design
        .find("<!-- layers:begin -->")
        .expect("docs/design.md has <!-- layers:begin -->");
    let end = design
        .find("<!-- layers:end -->")
        .expect("docs/design.md has <!-- layers:end -->");
    let mut map = Map::new();
    for row in design[start..end].lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let Ok(layer) = cells[0].parse::<u32>() else {
            continue; // the header and the separator
        };
        for module in names(cells[1]) {
            let previous = map.insert(module.clone(), (layer, names(cells[2])));
            assert!(previous.is_none(), "{module} is in the layer map twice");
        }
    }
    map
}

/// Modules of `src/` (not the command in `src/bin/`) -> their files.
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(repo().join("src")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "bin" {
            continue;
        }
        let mut fs = Vec::new();
        if p.is_dir() {
            files(&p, &mut fs);
        } else {
            fs.push(p);
        }
        out.insert(name, fs);
    }
    out
}

/// Crate-root names re-exported from a module (`pub use client::{Client,
/// Found}` in lib.rs): `Client` -> `client`.
fn root_reexports(lib_rs: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in lib_rs.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("pub use ") else {
            continue;
        };
        let rest = rest.trim_end_matches(';');
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
            let item = item.trim();
            let name = item.rsplit(" as ").next().unwrap().trim();
            if !name.is_empty() {
                out.insert(name.to_owned(), module.to_owned());
            }
        }
    }
    out
}

/// The code of a line, without its `//` comment (not inside a string).
fn code(line: &str) -> &str {
    let mut in_str = false;
    let bytes = line.as_bytes();
    for i in 0..bytes.len() {
        match bytes[i] {
            b'"' if i == 0 || bytes[i - 1] != b'\\' => in_str = !in_str,
            b'/' if !in_str && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// The modules a source file names through `crate::` (or `$crate::` in a
/// macro), with the line of each: `crate::a::b`, `crate::{a, b::c}`, and
/// root re-exports (`crate::Status` -> `error`).
fn crate_refs(source: &str, reexports: &BTreeMap<String, String>) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let line = code(line);
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let before = &rest[..at];
            rest = &rest[at + "crate::".len()..];
            // `somecrate::` is another crate; `$crate::` is this one.
            if before
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            let heads: Vec<String> = if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or_default();
                group
                    .split(',')
                    .map(|item| item.trim().split("::").next().unwrap().trim().to_owned())
                    .filter(|h| !h.is_empty())
                    .collect()
            } else {
                let head: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                vec![head]
            };
            for head in heads {
                let module = reexports.get(&head).cloned().unwrap_or(head);
                out.push((n + 1, module));
            }
        }
    }
    out
}

/// What breaks the rules: upward or unlisted imports (file, line, module,
/// import), given the map, the modules' files and the root re-exports.
fn violations(
    map: &Map,
    sources: &BTreeMap<String, Vec<(String, String)>>,
    reexports: &BTreeMap<String, String>,
) -> (Vec<String>, BTreeMap<String, BTreeSet<String>>) {
    let mut bad = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, files) in sources {
        let Some((layer, allowed)) = map.get(module) else {
            continue;
        };
        for (path, text) in files {
            for (line, target) in crate_refs(text, reexports) {
                if &target == module {
                    continue;
                }
                graph
                    .entry(module.clone())
                    .or_default()
                    .insert(target.clone());
                if !allowed.contains(&target) {
                    let above = match map.get(&target) {
                        Some((l, _)) if l > layer => {
                            format!(" (layer {l}, above {module}'s layer {layer})")
                        }
                        Some(_) => " (not in its list)".to_owned(),
                        None => " (not in the map)".to_owned(),
                    };
                    bad.push(format!(
                        "{path}:{line}: {module} imports crate::{target}{above}; the map in \
                         docs/design.md lets {module} import only: {}",
                        allowed.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
    }
    (bad, graph)
}

/// A cycle of `graph`, if any (as a path a -> ... -> a).
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let from = path.iter().position(|p| p == n).unwrap();
                let mut c = path[from..].to_vec();
                c.push(n.to_owned());
                return Some(c);
            }
            _ => {}
        }
        state.insert(n.to_owned(), 1);
        path.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn read_sources() -> BTreeMap<String, Vec<(String, String)>> {
    modules()
        .into_iter()
        .map(|(m, files)| {
            let texts = files
                .iter()
                .map(|p| {
                    let shown = p.strip_prefix(repo()).unwrap().display().to_string();
                    (shown, std::fs::read_to_string(p).unwrap())
                })
                .collect();
            (m, texts)
        })
        .collect()
}

#[test]
fn modules_import_only_the_layers_below_them_and_form_no_cycle() {
    let design = std::fs::read_to_string(repo().join("docs/design.md")).unwrap();
    let map = declared_map(&design);
    let lib_rs = std::fs::read_to_string(repo().join("src/lib.rs")).unwrap();
    let reexports = root_reexports(&lib_rs);
    let sources = read_sources();

    // The map and the tree name the same modules.
    let in_map: BTreeSet<&String> = map.keys().collect();
    let in_tree: BTreeSet<&String> = sources.keys().collect();
    assert_eq!(in_map, in_tree, "the layer map of docs/design.md vs src/");

    // The map points down or sideways, never up, and has no cycle.
    for (module, (layer, allowed)) in &map {
        for a in allowed {
            let Some((l, _)) = map.get(a) else {
                panic!("{module} may import {a}, which is not in the map");
            };
            assert!(
                l <= layer,
                "the map lets {module} (layer {layer}) import {a} (layer {l}), a layer above"
            );
        }
    }
    let allowed: BTreeMap<String, BTreeSet<String>> = map
        .iter()
        .map(|(m, (_, a))| (m.clone(), a.clone()))
        .collect();
    assert_eq!(cycle(&allowed), None, "a cycle in the layer map");

    let (bad, graph) = violations(&map, &sources, &reexports);
    assert!(
        bad.is_empty(),
        "imports against the layers:\n{}",
        bad.join("\n")
    );
    assert_eq!(cycle(&graph), None, "an import cycle");
    // The check sees the imports: the top imports something.
    assert!(graph.get("ffi").is_some_and(|g| g.contains("client")));
}

#[test]
fn the_check_fails_on_an_upward_import_or_a_cycle() {
    let design = std::fs::read_to_string(repo().join("docs/design.md")).unwrap();
    let map = declared_map(&design);
    let reexports = root_reexports(&std::fs::read_to_string(repo().join("src/lib.rs")).unwrap());
    let planted = |module: &str, text: &str| {
        let mut sources = BTreeMap::new();
        sources.insert(
            module.to_owned(),
            vec![("src/planted.rs".to_owned(), text.to_owned())],
        );
        violations(&map, &sources, &reexports).0
    };
    // An upward import, in each form the parser knows.
    for text in [
        "use crate::client::Client;",
        "use crate::{error::Error, ffi};",
        "fn f() -> crate::Client { todo!() }",
        "    let x = $crate::cache::Cache::new();",
    ] {
        let bad = planted("keys", text);
        assert_eq!(bad.len(), 1, "{text}: {bad:?}");
        assert!(bad[0].starts_with("src/planted.rs:1: keys imports crate::"));
        assert!(bad[0].contains("above keys's layer"), "{}", bad[0]);
    }
    // Not imports: comments, other crates, the module itself.
    for text in [
        "// see crate::client",
        "/// [`crate::ffi`]",
        "use etcd_client::Client;",
        "use crate::keys::rank_key;",
    ] {
        assert_eq!(planted("keys", text), Vec::<String>::new(), "{text}");
    }
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(cycle(&g), Some(vec!["a".into(), "b".into(), "a".into()]));
}

#[test]
fn every_unsafe_block_says_why_it_is_sound() {
    let mut missing = Vec::new();
    for (_, files) in read_sources() {
        for (path, text) in files {
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let c = code(line);
                if !(c.contains("unsafe {") || c.contains("unsafe impl")) {
                    continue;
                }
                // The comment on the line, or in the three lines above.
                let said = lines[i.saturating_sub(3)..=i]
                    .iter()
                    .any(|l| l.contains("// SAFETY:"));
                if !said {
                    missing.push(format!("{path}:{}: {}", i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "unsafe without a `// SAFETY:` comment:\n{}",
        missing.join("\n")
    );
}
