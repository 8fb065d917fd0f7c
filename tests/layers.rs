//! The import graph of `src/` has no circles and no arrows that run back up the layers.
//!
//! Every `.rs` file under `src/` is read; the module paths it names (`use crate::...`, inline
//! `crate::a::b::f()`, `super::`, `self::`, a `mod.rs`'s `use child::...`, and `adt::...` in
//! `main.rs`) are resolved to the file that defines the module, and give one arrow per
//! (file, file) pair. Two graphs are checked:
//! - files: no two files may reach each other (a circle such as `a.rs` -> `b.rs` -> `a.rs`);
//! - top-level modules (`src/x.rs` or the folder `src/x/`, and `main.rs`): no circle, and no arrow
//!   from a lower floor to a higher one in [`FLOORS`].
//!
//! `cargo test --test layers -- --nocapture` prints the top-level graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The floors of the house, lowest first. A module may use modules on its own floor or below,
/// never above. A new top-level module must be given a floor here.
const FLOORS: &[&[&str]] = &[
    &["json", "weights", "progress", "fixtures"],
    &["schedule"],
    &["models"],
    &["data", "disc"],
    &["eval", "sample", "dist"],
    &["train"],
    &["report", "inspect"],
    &["demo", "bench", "demo_data"],
    &["main"],
];

/// One module file: its module path (`["models", "pipeline"]`; `[]` for lib.rs) and text.
struct ModFile {
    rel: String,
    module: Vec<String>,
    is_dir_module: bool,
    text: String,
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<ModFile>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, root, out);
            continue;
        }
        if p.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let mut parts: Vec<String> = rel
            .trim_end_matches(".rs")
            .split('/')
            .map(String::from)
            .collect();
        let last = parts.pop().unwrap();
        let is_dir_module = matches!(last.as_str(), "mod" | "lib" | "main");
        if !is_dir_module {
            parts.push(last.clone());
        }
        if last == "main" {
            parts = vec!["main".into()];
        }
        let text =
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        out.push(ModFile {
            rel,
            module: parts,
            is_dir_module: is_dir_module && last != "main",
            text,
        });
    }
}

/// The text with comments, string and char literals blanked (newlines kept).
fn strip(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied().unwrap_or('\0');
        if c == '/' && next == '/' {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == '*' {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r'
            && (next == '"' || next == '#')
            && !b
                .get(i.wrapping_sub(1))
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // Raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                if b[j] == '\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                } else if b[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && (b.get(i + 2) == Some(&'\'') || next == '\\') {
            // A char literal ('x' or '\n', '\u{..}'); a lifetime 'a has no closing quote.
            i += 1;
            if b[i] == '\\' {
                i += 1;
            }
            i += 1;
            while i < b.len() && b[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Parses a use tree starting at `i` (just after `prefix::`) and appends every full path.
fn parse_tree(b: &[char], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_whitespace() {
            *i += 1;
        }
    };
    let mut path = prefix;
    loop {
        skip_ws(i);
        if *i < b.len() && b[*i] == '{' {
            *i += 1;
            loop {
                skip_ws(i);
                if *i >= b.len() {
                    return;
                }
                if b[*i] == '}' {
                    *i += 1;
                    return;
                }
                if b[*i] == ',' {
                    *i += 1;
                    continue;
                }
                parse_tree(b, i, path.clone(), out);
            }
        }
        let start = *i;
        while *i < b.len() && is_ident(b[*i]) {
            *i += 1;
        }
        if *i == start {
            // `*` or anything else ends the path.
            out.push(path);
            return;
        }
        let seg: String = b[start..*i].iter().collect();
        if seg != "self" {
            path.push(seg);
        }
        skip_ws(i);
        if *i + 1 < b.len() && b[*i] == ':' && b[*i + 1] == ':' {
            *i += 2;
        } else {
            out.push(path);
            return;
        }
    }
}

/// Every module path named in a file, made absolute (crate-relative).
fn named_paths(f: &ModFile, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let text = strip(&f.text);
    let b: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    // Inline `mod name {` blocks change what `super` and `self` mean.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    // The last two plain words, cleared by punctuation (for `mod name {` and `use child::`).
    let mut words: Vec<String> = Vec::new();
    let skip_ws = |mut k: usize| {
        while k < b.len() && b[k].is_whitespace() {
            k += 1;
        }
        k
    };
    let path_sep_at = |k: usize| k + 1 < b.len() && b[k] == ':' && b[k + 1] == ':';
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '{' {
            if words.len() == 2 && words[0] == "mod" {
                inline.push((words[1].clone(), depth));
            }
            depth += 1;
            words.clear();
            i += 1;
            continue;
        }
        if c == '}' {
            depth = depth.saturating_sub(1);
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
            words.clear();
            i += 1;
            continue;
        }
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if !is_ident(c) {
            words.clear();
            // A path that does not start at a keyword (`std::x::y`) is skipped whole.
            if path_sep_at(i) {
                i += 2;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                continue;
            }
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let word: String = b[start..i].iter().collect();
        let after = skip_ws(i);
        let here: Vec<String> = f
            .module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(n, _)| n.clone()))
            .collect();
        // (the module the path is relative to, where its first segment starts)
        let base: Option<(Vec<String>, usize)> = if !path_sep_at(after) {
            None
        } else if word == "crate" || (word == "adt" && f.module == ["main"]) {
            Some((vec![], after + 2))
        } else if word == "super" {
            let mut m = here.clone();
            m.pop();
            let mut k = skip_ws(after + 2);
            // super::super::
            while b[k..].starts_with(&['s', 'u', 'p', 'e', 'r']) && path_sep_at(skip_ws(k + 5)) {
                m.pop();
                k = skip_ws(skip_ws(k + 5) + 2);
            }
            Some((m, k))
        } else if word == "self" {
            Some((here.clone(), after + 2))
        } else if words.last().is_some_and(|w| w == "use")
            && inline.is_empty()
            && f.is_dir_module
            && children.contains(&word)
        {
            Some((f.module.clone(), start))
        } else {
            None
        };
        if let Some((base, mut k)) = base {
            parse_tree(&b, &mut k, base, &mut out);
            i = k;
            words.clear();
            continue;
        }
        if word != "pub" {
            words.push(word);
            if words.len() > 2 {
                words.remove(0);
            }
        }
    }
    out
}

struct Graph {
    files: BTreeMap<String, BTreeSet<String>>,
    top: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    let by_module: BTreeMap<Vec<String>, String> = files
        .iter()
        .map(|f| (f.module.clone(), f.rel.clone()))
        .collect();
    let mut g = Graph {
        files: BTreeMap::new(),
        top: BTreeMap::new(),
    };
    for f in &files {
        let children: BTreeSet<String> = files
            .iter()
            .filter(|o| o.module.len() == f.module.len() + 1 && o.module.starts_with(&f.module))
            .map(|o| o.module.last().unwrap().clone())
            .collect();
        let from_top = f.module.first().cloned();
        g.files.entry(f.rel.clone()).or_default();
        if let Some(t) = &from_top {
            g.top.entry(t.clone()).or_default();
        }
        for p in named_paths(f, &children) {
            // The longest prefix that is a module file.
            let target = (0..=p.len())
                .rev()
                .find_map(|n| by_module.get(&p[..n]).map(|r| (n, r)));
            let Some((n, target)) = target else { continue };
            if n == 0 || *target == f.rel {
                continue; // the crate root only declares modules; self-references are no arrow
            }
            g.files.get_mut(&f.rel).unwrap().insert(target.clone());
            if let Some(t) = &from_top {
                if *t != p[0] {
                    g.top.get_mut(t).unwrap().insert(p[0].clone());
                }
            }
        }
    }
    g
}

/// The circles of a graph: its strongly connected components with more than one node.
fn circles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Reachability by depth-first search from each node (graphs here are small).
    let reach = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for m in g.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    stack.push(m.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|k| (k, reach(k))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for a in g.keys() {
        if done.contains(a) {
            continue;
        }
        let comp: Vec<String> = g
            .keys()
            .filter(|b| *b == a || (reaches[a].contains(*b) && reaches[*b].contains(a)))
            .cloned()
            .collect();
        done.extend(comp.iter().cloned());
        if comp.len() > 1 {
            out.push(comp);
        }
    }
    out
}

fn describe(g: &BTreeMap<String, BTreeSet<String>>, comp: &[String]) -> String {
    let set: BTreeSet<&String> = comp.iter().collect();
    let arrows: Vec<String> = comp
        .iter()
        .flat_map(|a| {
            g[a].iter()
                .filter(|b| set.contains(b))
                .map(move |b| format!("{a} -> {b}"))
        })
        .collect();
    arrows.join(", ")
}

#[test]
fn no_circle_between_source_files() {
    let g = graph();
    assert!(
        g.files.len() > 20,
        "found only {} source files",
        g.files.len()
    );
    let c = circles(&g.files);
    assert!(
        c.is_empty(),
        "source files that import each other (directly or around a circle):\n{}",
        c.iter()
            .map(|c| format!("  {}", describe(&g.files, c)))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn no_circle_between_top_level_modules() {
    let g = graph();
    let c = circles(&g.top);
    assert!(
        c.is_empty(),
        "top-level modules that import each other:\n{}",
        c.iter()
            .map(|c| format!("  {}", describe(&g.top, c)))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn no_arrow_runs_up_the_floors() {
    let g = graph();
    let floor = |m: &str| FLOORS.iter().position(|f| f.contains(&m));
    let mut up = Vec::new();
    for (a, bs) in &g.top {
        println!(
            "{a} (floor {:?}) -> {}",
            floor(a),
            bs.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        let fa =
            floor(a).unwrap_or_else(|| panic!("src/{a} has no floor in FLOORS (tests/layers.rs)"));
        for b in bs {
            let fb = floor(b)
                .unwrap_or_else(|| panic!("src/{b} has no floor in FLOORS (tests/layers.rs)"));
            if fb > fa {
                up.push(format!("  {a} (floor {fa}) -> {b} (floor {fb})"));
            }
        }
    }
    assert!(
        up.is_empty(),
        "arrows that run up the floors:\n{}",
        up.join("\n")
    );
}

/// The parser itself: the forms of path this test must see.
#[test]
fn parser_sees_every_form_of_path() {
    let f = ModFile {
        rel: "a/mod.rs".into(),
        module: vec!["a".into()],
        is_dir_module: true,
        text: r#"
            use crate::x::{y::Z, w::{self, V}};
            use b::Q; // a child module, 2018-style
            // use crate::commented::Out;
            fn f() { let s = "crate::in_string::No"; crate::inline::call(); super::up::f(); }
            #[cfg(test)]
            mod tests { use super::*; use super::b::T; }
        "#
        .into(),
    };
    let children: BTreeSet<String> = ["b".to_string()].into();
    let got: BTreeSet<String> = named_paths(&f, &children)
        .iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = [
        "x::y::Z",
        "x::w",
        "x::w::V",
        "a::b::Q",
        "inline::call",
        "up::f",
        "a",
        "a::b::T",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, want);
}
