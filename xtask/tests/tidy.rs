//! Conventions that hold for the whole workspace, checked instead of remembered: every source
//! file says what it is for and is on ARCHITECTURE.md's code map, no module import cycles, no
//! oversized modules, processes spawned in one place in xtask, no unused workspace dependency,
//! no markers of unfinished work. Each check names the file and the fix.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The largest a module may grow (lines before its `#[cfg(test)] mod tests`).
const MAX_LINES: usize = 700;

/// The only xtask modules that may build a `std::process::Command` themselves.
const SPAWN_ALLOWED: [&str; 1] = ["xtask/src/process.rs"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
        .to_path_buf()
}

/// A workspace member: its directory relative to the root (`runtime/contract`).
fn members() -> Vec<String> {
    let text = fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let manifest: toml::Value = toml::from_str(&text).unwrap();
    manifest["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

/// Every `.rs` file below `dir`, skipping build output and nested crates.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            if name == "target" || name.starts_with('.') || path.join("Cargo.toml").exists() {
                continue;
            }
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

struct Crate {
    /// `xtask/debian`
    dir: String,
    /// Files below `src/`, as paths relative to it (`lab/home.rs`).
    sources: Vec<String>,
    /// Every `.rs` file of the crate (src, tests, benches), relative to the root.
    all: Vec<String>,
}

fn crates() -> Vec<Crate> {
    let root = root();
    members()
        .into_iter()
        .map(|dir| {
            let mut files = Vec::new();
            rust_files(&root.join(&dir), &mut files);
            let src = root.join(&dir).join("src");
            let sources = files
                .iter()
                .filter_map(|f| f.strip_prefix(&src).ok())
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let all = files
                .iter()
                .map(|f| {
                    f.strip_prefix(&root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            Crate { dir, sources, all }
        })
        .collect()
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap()
}

/// The file without its unit tests (everything from a `#[cfg(test)]` that opens `mod tests`).
fn without_tests(text: &str) -> &str {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim() == "#[cfg(test)]"
            && text[offset + line.len()..]
                .trim_start()
                .starts_with("mod tests")
        {
            return &text[..offset];
        }
        offset += line.len();
    }
    text
}

fn is_test_file(rel_in_src: &str) -> bool {
    rel_in_src == "tests.rs" || rel_in_src.ends_with("/tests.rs")
}

fn fail(problems: Vec<String>, what: &str) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

#[test]
fn every_source_file_starts_with_a_module_doc_line() {
    let problems: Vec<String> = crates()
        .iter()
        .flat_map(|c| c.all.clone())
        .filter(|f| !read(f).starts_with("//!"))
        .map(|f| format!("{f}: add a `//!` first line saying what the module is for"))
        .collect();
    fail(problems, "files without a module doc");
}

/// Backticked words of one ARCHITECTURE.md section per crate directory: the section whose
/// `### ` heading names the directory as `` `dir/` ``.
fn code_map() -> BTreeMap<String, BTreeSet<String>> {
    let text = read("ARCHITECTURE.md");
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            current = heading
                .split('`')
                .skip(1)
                .step_by(2)
                .find(|w| w.ends_with('/'))
                .map(|w| w.trim_end_matches('/').to_string());
            continue;
        }
        if line.starts_with("## ") {
            current = None;
        }
        let Some(dir) = &current else { continue };
        let words = map.entry(dir.clone()).or_default();
        for span in line.split('`').skip(1).step_by(2) {
            for word in span.split([' ', ',']) {
                words.insert(word.to_string());
            }
        }
    }
    map
}

#[test]
fn every_source_file_is_on_the_code_map() {
    let map = code_map();
    let mut problems = Vec::new();
    for c in crates() {
        let Some(words) = map.get(&c.dir) else {
            problems.push(format!(
                "{}: ARCHITECTURE.md has no `### ` section whose heading names `{}/`",
                c.dir, c.dir
            ));
            continue;
        };
        for f in &c.sources {
            if f == "lib.rs" || f == "main.rs" || is_test_file(f) {
                continue;
            }
            // A directory module is named by its directory.
            let name = match f.strip_suffix("/mod.rs") {
                Some(dir) => format!("{dir}/"),
                None => f.clone(),
            };
            if !words.contains(&name) {
                problems.push(format!(
                    "{}/src/{f}: name `{name}` in ARCHITECTURE.md's section for `{}/`",
                    c.dir, c.dir
                ));
            }
        }
    }
    fail(
        problems,
        "source files missing from ARCHITECTURE.md's code map",
    );
}

#[test]
fn no_module_is_over_the_size_limit() {
    let mut problems = Vec::new();
    for c in crates() {
        for f in c.sources.iter().filter(|f| !is_test_file(f)) {
            let rel = format!("{}/src/{f}", c.dir);
            let lines = without_tests(&read(&rel)).lines().count();
            if lines > MAX_LINES {
                problems.push(format!(
                    "{rel}: {lines} lines (limit {MAX_LINES}): split it by job"
                ));
            }
        }
    }
    fail(problems, "oversized modules");
}

#[test]
fn xtask_spawns_processes_only_through_its_process_module() {
    let mut problems = Vec::new();
    for c in crates().iter().filter(|c| c.dir == "xtask") {
        for f in &c.sources {
            let rel = format!("xtask/src/{f}");
            if SPAWN_ALLOWED.contains(&rel.as_str()) {
                continue;
            }
            for (n, line) in read(&rel).lines().enumerate() {
                if line.contains("Command::new(") || line.contains("Command::from(") {
                    problems.push(format!(
                        "{rel}:{}: build the command with `xshell::cmd!` and spawn or capture it through `xtask::process`",
                        n + 1
                    ));
                }
            }
        }
    }
    fail(problems, "processes spawned outside xtask::process");
}

#[test]
fn every_workspace_dependency_is_used() {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let declared: BTreeSet<String> = manifest["workspace"]["dependencies"]
        .as_table()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut used = BTreeSet::new();
    for dir in members() {
        let m: toml::Value = toml::from_str(&read(&format!("{dir}/Cargo.toml"))).unwrap();
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            if let Some(deps) = m.get(section).and_then(|d| d.as_table()) {
                used.extend(deps.keys().cloned());
            }
        }
    }
    let problems: Vec<String> = declared
        .difference(&used)
        .map(|d| format!("{d}: no member uses it; delete it from [workspace.dependencies]"))
        .collect();
    fail(problems, "unused workspace dependencies");
}

#[test]
fn no_markers_of_unfinished_work() {
    let markers = ["todo!(", "unimplemented!(", "dbg!(", "#[ignore"];
    let mut problems = Vec::new();
    for f in crates().iter().flat_map(|c| c.all.clone()) {
        if f == "xtask/tests/tidy.rs" {
            continue;
        }
        for (n, line) in read(&f).lines().enumerate() {
            if let Some(m) = markers.iter().find(|m| line.contains(*m)) {
                problems.push(format!("{f}:{}: `{m}`", n + 1));
            }
        }
    }
    fail(problems, "markers of unfinished work or skipped tests");
}

// ---------------------------------------------------------------------------------------------
// Module import cycles

/// `lab/home.rs` → `["lab", "home"]`; `lab/mod.rs` → `["lab"]`; `lib.rs` → `[]`.
fn module_path(rel_in_src: &str) -> Vec<String> {
    let stem = rel_in_src.trim_end_matches(".rs");
    let mut parts: Vec<String> = stem.split('/').map(str::to_string).collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Every path a file names that starts with `crate`, `super` or `self`, with `use` trees
/// expanded (`use crate::{a, b::c}` → `crate::a`, `crate::b::c`).
fn named_paths(text: &str) -> Vec<Vec<String>> {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut paths = Vec::new();
    // `use` statements (at the start of a line), trees expanded.
    let mut statement: Option<String> = None;
    for line in code.lines() {
        let trimmed = line.trim_start();
        if statement.is_none() {
            let body = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "]
                .iter()
                .find_map(|p| trimmed.strip_prefix(p));
            statement = body.map(str::to_string);
        } else if let Some(s) = statement.as_mut() {
            s.push(' ');
            s.push_str(trimmed);
        }
        if let Some(s) = statement.take_if(|s| s.contains(';')) {
            let tree = &s[..s.find(';').unwrap()];
            expand_use(tree, &mut Vec::new(), &mut paths);
        }
    }
    // Inline paths anywhere (`crate::util::human_bytes(…)`).
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0
                && (bytes[at - 1].is_ascii_alphanumeric()
                    || bytes[at - 1] == b'_'
                    || bytes[at - 1] == b':')
            {
                continue;
            }
            let segment: String = code[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let parts: Vec<String> = segment
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            paths.push(parts);
        }
    }
    paths
}

fn expand_use(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let depth = prefix.len();
        prefix.extend(head);
        for item in split_top_level(inner) {
            expand_use(item, prefix, out);
        }
        prefix.truncate(depth);
    } else {
        let item = tree.split(" as ").next().unwrap_or(tree).trim();
        if item.is_empty() {
            return;
        }
        let mut path = prefix.clone();
        path.extend(
            item.split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
        out.push(path);
    }
}

fn split_top_level(inner: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
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
    items
}

/// The file module a path lands in: the longest prefix that is a module of the crate.
fn resolve(
    from: &[String],
    path: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let mut base: Vec<String> = match path.first()?.as_str() {
        "crate" => Vec::new(),
        "self" => from.to_vec(),
        "super" => from.to_vec(),
        _ => return None,
    };
    let mut rest = &path[1..];
    if path[0] == "super" {
        base.pop();
        while rest.first().map(String::as_str) == Some("super") {
            base.pop();
            rest = &rest[1..];
        }
    }
    let mut best = base.clone();
    for segment in rest {
        base.push(segment.clone());
        if modules.contains(&base) {
            best = base.clone();
        } else {
            break;
        }
    }
    Some(best)
}

fn is_prefix(a: &[String], b: &[String]) -> bool {
    a.len() <= b.len() && a == &b[..a.len()]
}

/// Module graphs' strongly connected components with more than one module.
fn cycles(c: &Crate) -> Vec<Vec<String>> {
    let files: Vec<&String> = c.sources.iter().filter(|f| !is_test_file(f)).collect();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(f)).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let from = module_path(f);
        let text = read(&format!("{}/src/{f}", c.dir));
        for path in named_paths(without_tests(&text)) {
            let Some(to) = resolve(&from, &path, &modules) else {
                continue;
            };
            // A module and its ancestors or descendants are one unit of code, not a cycle.
            if is_prefix(&to, &from) || is_prefix(&from, &to) {
                continue;
            }
            edges.entry(from.clone()).or_default().insert(to);
        }
    }
    tarjan(&modules, &edges)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .map(|scc| {
            scc.iter()
                .map(|m| {
                    if m.is_empty() {
                        "crate".into()
                    } else {
                        m.join("::")
                    }
                })
                .collect()
        })
        .collect()
}

fn tarjan(
    nodes: &BTreeSet<Vec<String>>,
    edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
) -> Vec<Vec<Vec<String>>> {
    struct State<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<Vec<String>, usize>,
        low: BTreeMap<Vec<String>, usize>,
        stack: Vec<Vec<String>>,
        on_stack: BTreeSet<Vec<String>>,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit(s: &mut State, v: &Vec<String>) {
        let i = s.index.len();
        s.index.insert(v.clone(), i);
        s.low.insert(v.clone(), i);
        s.stack.push(v.clone());
        s.on_stack.insert(v.clone());
        for w in s.edges.get(v).cloned().unwrap_or_default() {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let low = s.low[v].min(s.low[&w]);
                s.low.insert(v.clone(), low);
            } else if s.on_stack.contains(&w) {
                let low = s.low[v].min(s.index[&w]);
                s.low.insert(v.clone(), low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(&w);
                let done = &w == v;
                scc.push(w);
                if done {
                    break;
                }
            }
            scc.sort();
            s.out.push(scc);
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for n in nodes {
        if !s.index.contains_key(n) {
            visit(&mut s, n);
        }
    }
    s.out
}

#[test]
fn no_crate_has_a_module_import_cycle() {
    let problems: Vec<String> = crates()
        .iter()
        .flat_map(|c| {
            cycles(c)
                .into_iter()
                .map(|scc| format!("{}: {} use each other; move the shared piece into one of them or a module both use", c.dir, scc.join(", ")))
                .collect::<Vec<_>>()
        })
        .collect();
    fail(problems, "module import cycles");
}

#[test]
fn the_cycle_finder_sees_a_cycle_through_use_trees_and_inline_paths() {
    let a = named_paths("use crate::{b::{self, X}, c as d};\nfn f() { super::e::g(); }\n");
    assert!(
        a.contains(&vec!["crate".into(), "b".into(), "self".into()]),
        "{a:?}"
    );
    assert!(a.contains(&vec!["crate".into(), "c".into()]), "{a:?}");
    assert!(
        a.contains(&vec!["super".into(), "e".into(), "g".into()]),
        "{a:?}"
    );
    let modules: BTreeSet<Vec<String>> = [
        vec![],
        vec!["lab".into()],
        vec!["lab".into(), "home".into()],
        vec!["lab".into(), "stack".into()],
    ]
    .into_iter()
    .collect();
    let from = vec!["lab".to_string(), "home".to_string()];
    assert_eq!(
        resolve(
            &from,
            &["super".into(), "stack".into(), "StackKind".into()],
            &modules
        ),
        Some(vec!["lab".to_string(), "stack".to_string()])
    );
    let mut edges = BTreeMap::new();
    edges.insert(
        vec!["lab".to_string(), "home".to_string()],
        [vec!["lab".to_string(), "stack".to_string()]].into(),
    );
    edges.insert(
        vec!["lab".to_string(), "stack".to_string()],
        [vec!["lab".to_string(), "home".to_string()]].into(),
    );
    let sccs: Vec<_> = tarjan(&modules, &edges)
        .into_iter()
        .filter(|s| s.len() > 1)
        .collect();
    assert_eq!(sccs.len(), 1);
}
