//! ADR 0001: openraft is used behind the crate's own API, so only `src/raft/` may name it.
//! Scans every Rust source file of `src/` outside `src/raft/` for `openraft` in code
//! (comments may mention the library).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for e in entries {
        let path = e.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The code of one line: everything before a `//` comment (line, doc or inner doc).
/// Good enough for this check: no string literal in this crate contains `//openraft`.
fn code_of(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Lines outside comments that name `openraft`, as "file:line: text".
fn offenders(src: &Path) -> Vec<String> {
    let raft_dir = src.join("raft");
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for f in files.iter().filter(|f| !f.starts_with(&raft_dir)) {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        let mut in_block_comment = false;
        for (i, line) in text.lines().enumerate() {
            let mut code = line;
            if in_block_comment {
                match code.find("*/") {
                    Some(end) => {
                        code = &code[end + 2..];
                        in_block_comment = false;
                    }
                    None => continue,
                }
            }
            if let Some(start) = code.find("/*")
                && !code[start..].contains("*/")
            {
                in_block_comment = true;
                code = &code[..start];
            }
            if code_of(code).contains("openraft") {
                found.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn only_src_raft_names_openraft() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    rust_files(&src, &mut all);
    // The scan really covers the crate (a moved directory must not make it pass vacuously).
    assert!(all.iter().any(|f| f.ends_with("service.rs")), "{all:?}");
    assert!(all.iter().any(|f| f.ends_with("node.rs")), "{all:?}");
    assert!(all.iter().any(|f| f.ends_with("raft/group.rs")), "{all:?}");
    let found = offenders(&src);
    assert!(
        found.is_empty(),
        "openraft named outside src/raft/ (put it behind raft::RaftGroup and its types):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scan_catches_a_use_and_ignores_comments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::create_dir_all(src.join("raft")).expect("mkdir");
    std::fs::write(src.join("raft/mod.rs"), "use openraft::Raft;\n").expect("write");
    std::fs::write(
        src.join("ok.rs"),
        "//! Every range is one openraft group.\n/* openraft\n openraft */ fn f() {} // openraft\n",
    )
    .expect("write");
    assert!(offenders(src).is_empty(), "{:?}", offenders(src));
    std::fs::write(
        src.join("bad.rs"),
        "fn f() { let _ = openraft::ReadPolicy::ReadIndex; }\n",
    )
    .expect("write");
    let found = offenders(src);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("bad.rs:1"), "{found:?}");
}
