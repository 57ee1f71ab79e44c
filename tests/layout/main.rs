//! Layout rules the compiler does not check, over the sources of `src/` (the library and the
//! binary): every file is compiled; no file imports itself back through others (no import
//! cycle); and calls into the OS below std (`libc::f(..)`, any `nix::` path) appear only in
//! modules allowed `unsafe` — `sys`, and the few `lib.rs` lists as not yet migrated.
//!
//! The graph is built from the Rust syntax tree (`syn`), not from text: every `use` and every
//! path in code, types and macro bodies, resolved through re-exports to the file that defines
//! what it names (see `references`). Run with `--nocapture` to see the graph's size and every
//! cycle.

mod crate_tree;
mod cycles;
mod references;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate_tree::CrateTree;
use references::{OsCall, Reference};

/// The roots of the crates built from `src/`: the library and the `ringtun` binary.
const CRATE_ROOTS: [&str; 2] = ["src/lib.rs", "src/main.rs"];

/// This checkout, or the one `RINGTUN_LAYOUT_REPO` names (to measure another commit's tree).
fn repo() -> PathBuf {
    std::env::var_os("RINGTUN_LAYOUT_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn crates() -> Vec<CrateTree> {
    CRATE_ROOTS
        .iter()
        .map(|root| CrateTree::load(&repo(), Path::new(root)).unwrap())
        .collect()
}

/// Where a file first names another: `file:line (path as written)`.
type Sites = BTreeMap<(PathBuf, PathBuf), String>;

/// The file-level import graph of all crates (edges never cross crates: `ringtun::` from the
/// binary leaves its crate), with the first site of each edge.
fn file_graph(trees: &[CrateTree]) -> (BTreeMap<PathBuf, BTreeSet<PathBuf>>, Sites) {
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    let mut sites = Sites::new();
    for tree in trees {
        for file in tree.files.keys() {
            edges.entry(file.clone()).or_default();
        }
        let (refs, _) = references::collect(tree);
        for Reference {
            file,
            line,
            written,
            to,
        } in refs
        {
            if to == file {
                continue;
            }
            edges.entry(file.clone()).or_default().insert(to.clone());
            sites
                .entry((file.clone(), to))
                .or_insert_with(|| format!("{}:{line} ({written})", file.display()));
        }
    }
    (edges, sites)
}

#[test]
fn every_rust_file_in_src_is_compiled() {
    let trees = crates();
    let reached: BTreeSet<&PathBuf> = trees.iter().flat_map(|t| t.files.keys()).collect();
    let orphans: Vec<PathBuf> = crate_tree::rust_files(&repo(), Path::new("src"))
        .into_iter()
        .filter(|f| !reached.contains(f))
        .collect();
    assert!(
        orphans.is_empty(),
        "no `mod` declaration reaches these files, so the layout checks cannot see them: {orphans:?}"
    );
}

#[test]
fn src_has_no_import_cycle() {
    let trees = crates();
    let (edges, sites) = file_graph(&trees);
    let components = cycles::strongly_connected(&edges);
    let edge_count: usize = edges.values().map(BTreeSet::len).sum();
    let in_cycles: usize = components.iter().map(Vec::len).sum();
    println!(
        "import graph of src/: {} files, {edge_count} file-to-file imports; {} cycle(s) \
         joining {in_cycles} files",
        edges.len(),
        components.len()
    );
    let mut failures = Vec::new();
    for component in &components {
        let cycle = cycles::shortest_cycle(&edges, component, &component[0]);
        let mut text = format!("{} files in one cycle:\n", component.len());
        for f in component {
            text += &format!("    {}\n", f.display());
        }
        text += "  for example:\n";
        for (i, from) in cycle.iter().enumerate() {
            let to = &cycle[(i + 1) % cycle.len()];
            text += &format!(
                "    {} -> {}   at {}\n",
                from.display(),
                to.display(),
                sites[&(from.clone(), to.clone())]
            );
        }
        println!("{text}");
        failures.push(text);
    }
    assert!(
        failures.is_empty(),
        "import cycles in src/ (each file of a cycle depends on every other):\n{}",
        failures.join("\n")
    );
}

#[test]
fn os_calls_stay_in_modules_allowed_unsafe() {
    let trees = crates();
    let mut outside = Vec::new();
    for tree in &trees {
        let (_, calls) = references::collect(tree);
        for OsCall {
            file,
            module,
            line,
            written,
        } in calls
        {
            let allowed = (0..=module.len()).any(|n| tree.modules[&module[..n]].allows_unsafe);
            if !allowed {
                outside.push(format!("{}:{line}: {written}", file.display()));
            }
        }
    }
    assert!(
        outside.is_empty(),
        "calls into the OS outside `sys` (add a safe wrapper in src/sys/ and call that):\n{}",
        outside.join("\n")
    );
}
