//! One source for each table: the error table, the management API's endpoint table and the
//! features list live once, in `docs/*.md`. The crate docs include them with `include_str!`; the
//! README carries the same text, and this test fails the moment the two differ, or a table is
//! written out by hand again in a doc comment.

use std::fs;
use std::path::{Path, PathBuf};

/// The shared documents, and the source file whose docs include each.
const TABLES: &[(&str, &str, &str)] = &[
    ("docs/errors.md", "src/lib.rs", "../docs/errors.md"),
    ("docs/features.md", "src/lib.rs", "../docs/features.md"),
    (
        "docs/admin-endpoints.md",
        "src/admin/mod.rs",
        "../../docs/admin-endpoints.md",
    ),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: impl AsRef<Path>) -> String {
    let path = root().join(path);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_readme_carries_each_table_verbatim() {
    let readme = read("README.md");
    for (doc, _, _) in TABLES {
        let text = read(doc);
        assert!(
            text.lines().any(|l| l.starts_with("| --- |")),
            "{doc} holds no table"
        );
        assert!(
            readme.contains(text.trim_end()),
            "README.md differs from {doc}: copy {doc} into the README unchanged (it is the one source)"
        );
    }
}

#[test]
fn the_crate_docs_include_each_table_and_write_none_by_hand() {
    for (doc, source, include) in TABLES {
        let code = read(source);
        assert!(
            code.contains(&format!("include_str!(\"{include}\")")),
            "{source} does not include {doc}"
        );
    }
    for source in ["src/lib.rs", "src/admin/mod.rs"] {
        let code = read(source);
        let by_hand = code
            .lines()
            .map(str::trim_start)
            .find(|l| l.starts_with("//! |") || l.starts_with("/// |"));
        assert_eq!(
            by_hand, None,
            "{source} writes a table by hand: put it in docs/ and include it"
        );
    }
}
