//! The layout's rules, checked from the code's own `crate::` paths (DESIGN.md draws them):
//! each top-level module imports only from the layers below it, no two files import each other,
//! and only the CLI prints. Test code (`#[cfg(test)]` onwards, `tests.rs` files) is exempt.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each top-level module may import (besides itself). `formats` may name the model's
/// hyper-parameters (a config.json describes them) and nothing else of the model.
const ALLOWED: &[(&str, &[&str])] = &[
    ("ground", &[]),
    ("quant", &["ground"]),
    ("formats", &["ground", "model::hparams"]),
    ("model", &["ground", "quant"]),
    ("cpu", &["ground", "quant", "model"]),
    ("cuda", &["ground", "quant", "model"]),
    ("convert", &["ground", "quant", "formats", "model"]),
    (
        "runtime",
        &["ground", "formats", "model", "convert", "cpu", "cuda"],
    ),
    (
        "verify",
        &[
            "ground", "quant", "formats", "model", "convert", "runtime", "cpu",
        ],
    ),
    (
        "generate",
        &["ground", "formats", "model", "convert", "runtime", "cpu"],
    ),
    ("cli", &["*"]),
];
/// Where the format layer keeps to itself: the GGUF reader and writer know no model.
const GGUF_ALLOWED: &[&str] = &["ground", "formats::gguf"];

struct SrcFile {
    path: PathBuf,
    /// Module path (`convert::plan`; `cuda` for cuda/mod.rs).
    module: Vec<String>,
    /// Non-test code, comments removed.
    code: String,
}

fn sources() -> Vec<SrcFile> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = vec![];
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if !name.ends_with(".rs") || name == "main.rs" || name == "lib.rs" || name == "tests.rs"
            {
                continue;
            }
            let rel = p.strip_prefix(&root).unwrap().with_extension("");
            let mut module: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .collect();
            if module.last().map(String::as_str) == Some("mod") {
                module.pop();
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let code = non_test_code(&text)
                .iter()
                .map(|l| match l.find("//") {
                    Some(i) => &l[..i],
                    None => l,
                })
                .collect::<Vec<_>>()
                .join("\n");
            out.push(SrcFile {
                path: p,
                module,
                code,
            });
        }
    }
    assert!(out.len() > 40, "src/ not found under {}", root.display());
    out
}

/// The lines of `text` outside its top-level `#[cfg(test)]` items: a `mod x;` line, or a
/// `mod x { ... }` up to its closing brace at the start of a line (rustfmt's layout).
fn non_test_code(text: &str) -> Vec<&str> {
    let mut out = vec![];
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.trim_end() != "#[cfg(test)]" {
            out.push(l);
            continue;
        }
        match lines.next() {
            Some(item) if item.trim_end().ends_with(';') => {}
            Some(_) => {
                for l in lines.by_ref() {
                    if l.trim_end() == "}" {
                        break;
                    }
                }
            }
            None => {}
        }
    }
    out
}

/// Every `crate::a::b...` path in `code`, including those inside `use crate::{a, b::c}`.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let item = item.trim();
                if !item.is_empty() {
                    out.push(item.split("::").map(|s| s.trim().to_string()).collect());
                }
            }
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        out.push(
            rest[..end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        );
    }
    out
}

fn allowed(top: &str, target: &[String]) -> bool {
    let rules = ALLOWED
        .iter()
        .find(|(m, _)| *m == top)
        .unwrap_or_else(|| panic!("top-level module '{top}' has no layering rule"))
        .1;
    let t = target.join("::");
    target[0] == top
        || rules
            .iter()
            .any(|r| *r == "*" || t == *r || t.starts_with(&format!("{r}::")))
}

#[test]
fn each_layer_imports_only_from_below() {
    let mut bad = vec![];
    for f in sources() {
        let top = &f.module[0];
        for p in crate_paths(&f.code) {
            if p.is_empty() {
                continue;
            }
            if !allowed(top, &p) {
                bad.push(format!("{}: crate::{}", f.path.display(), p.join("::")));
            }
            if f.module.len() > 1 && f.module[..2] == ["formats", "gguf"] {
                let t = p.join("::");
                if !GGUF_ALLOWED
                    .iter()
                    .any(|a| t == *a || t.starts_with(&format!("{a}::")))
                {
                    bad.push(format!(
                        "{}: the GGUF layer names crate::{t}",
                        f.path.display()
                    ));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_two_files_import_each_other() {
    let files = sources();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    // The file a path lands in: its longest prefix that is a module file.
    let resolve = |p: &[String]| -> Option<Vec<String>> {
        (1..=p.len())
            .rev()
            .map(|k| p[..k].to_vec())
            .find(|m| modules.contains(m))
    };
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        for p in crate_paths(&f.code) {
            if let Some(t) = resolve(&p).filter(|t| *t != f.module) {
                edges.entry(f.module.clone()).or_default().insert(t);
            }
        }
    }
    let mut cycles = vec![];
    for (a, targets) in &edges {
        for b in targets {
            if a < b && edges.get(b).is_some_and(|t| t.contains(a)) {
                cycles.push(format!("{} <-> {}", a.join("::"), b.join("::")));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "files importing each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn only_the_cli_prints() {
    let mut bad = vec![];
    for f in sources() {
        if f.module[0] == "cli" {
            continue;
        }
        for (n, l) in f.code.lines().enumerate() {
            for mac in ["println!", "eprintln!", "print!", "eprint!", "dbg!"] {
                let hit = l.match_indices(mac).any(|(i, _)| {
                    i == 0 || !l[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                if hit {
                    bad.push(format!("{}:{}: {}", f.path.display(), n + 1, l.trim()));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "printing outside the CLI:\n{}",
        bad.join("\n")
    );
}

/// The rules can fail: a planted import against the layering and a planted print are caught.
#[test]
fn the_rules_catch_what_they_forbid() {
    assert!(!allowed("quant", &["formats".into(), "gguf".into()]));
    assert!(!allowed("model", &["cpu".into()]));
    assert!(!allowed("formats", &["model".into(), "llama".into()]));
    assert!(allowed("formats", &["model".into(), "hparams".into()]));
    assert!(allowed("cli", &["verify".into()]));
    let paths =
        crate_paths("use crate::{ground::error::Error, quant::dot};\nlet x = crate::cpu::f();");
    assert_eq!(
        paths,
        vec![
            vec!["ground".to_string(), "error".into(), "Error".into()],
            vec!["quant".to_string(), "dot".into()],
            vec!["cpu".to_string(), "f".into()],
        ]
    );
}
