//! Which file holds which module: the module tree of a crate, found the way rustc finds it —
//! from the crate root through every `mod` declaration (inline modules, `name.rs`,
//! `name/mod.rs`, `#[path]`) — with each file parsed once. A file no root reaches is reported
//! instead of silently left out of the checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A module's place: its path inside its crate (`[]` is the root) and the file its items are in.
#[derive(Debug)]
pub struct Module {
    pub file: PathBuf,
    /// Names of the modules declared directly in it.
    pub children: Vec<String>,
    /// Carries `#[allow(unsafe_code)]` (on its `mod` item or as an inner attribute): the crate
    /// denies `unsafe` everywhere else.
    pub allows_unsafe: bool,
}

/// One crate: its modules by path, and every file parsed, by path relative to the repository.
pub struct CrateTree {
    pub modules: BTreeMap<Vec<String>, Module>,
    pub files: BTreeMap<PathBuf, syn::File>,
}

impl CrateTree {
    /// Loads the crate whose root file is `root` (relative to `repo`).
    pub fn load(repo: &Path, root: &Path) -> Result<CrateTree, String> {
        let mut tree = CrateTree {
            modules: BTreeMap::new(),
            files: BTreeMap::new(),
        };
        let dir = root.parent().unwrap_or(Path::new("")).to_path_buf();
        tree.load_file(repo, root, Vec::new(), dir, false)?;
        Ok(tree)
    }

    /// The module an absolute path (crate-relative segments) lands in: the longest prefix of
    /// `segments` that names a module. Items (`Config`, `load`) fall to the module holding them.
    pub fn module_of<'a>(&self, segments: &'a [String]) -> &'a [String] {
        let mut n = segments.len();
        while n > 0 && !self.modules.contains_key(&segments[..n]) {
            n -= 1;
        }
        &segments[..n]
    }

    fn load_file(
        &mut self,
        repo: &Path,
        file: &Path,
        path: Vec<String>,
        child_dir: PathBuf,
        declared_allowed: bool,
    ) -> Result<(), String> {
        let text = std::fs::read_to_string(repo.join(file))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let ast = syn::parse_file(&text).map_err(|e| {
            let at = e.span().start();
            format!("{}:{}:{}: {e}", file.display(), at.line, at.column + 1)
        })?;
        let allowed = declared_allowed || allows_unsafe(&ast.attrs);
        self.add_items(repo, file, &path, &child_dir, &ast.items, allowed)?;
        self.files.insert(file.to_path_buf(), ast);
        Ok(())
    }

    fn add_items(
        &mut self,
        repo: &Path,
        file: &Path,
        path: &[String],
        child_dir: &Path,
        items: &[syn::Item],
        allowed: bool,
    ) -> Result<(), String> {
        let mut children = Vec::new();
        // External child modules, loaded once this module is recorded.
        let mut declared = Vec::new();
        for item in items {
            let syn::Item::Mod(m) = item else { continue };
            let name = m.ident.to_string();
            let mut child = path.to_vec();
            child.push(name.clone());
            children.push(name.clone());
            match &m.content {
                Some((_, inner)) => {
                    // An inline module: its items are in this file, its own children one
                    // directory further down.
                    let allowed = allows_unsafe(&m.attrs);
                    self.add_items(repo, file, &child, &child_dir.join(&name), inner, allowed)?;
                }
                None => {
                    let (child_file, grandchild_dir) = locate(repo, file, child_dir, m)?;
                    declared.push((child, child_file, grandchild_dir, allows_unsafe(&m.attrs)));
                }
            }
        }
        self.modules.insert(
            path.to_vec(),
            Module {
                file: file.to_path_buf(),
                children,
                allows_unsafe: allowed,
            },
        );
        for (child, child_file, grandchild_dir, allowed) in declared {
            self.load_file(repo, &child_file, child, grandchild_dir, allowed)?;
        }
        Ok(())
    }
}

/// The file of `mod name;` declared in `file`, and where that file's own children live.
fn locate(
    repo: &Path,
    file: &Path,
    child_dir: &Path,
    m: &syn::ItemMod,
) -> Result<(PathBuf, PathBuf), String> {
    let name = m.ident.to_string();
    let explicit = m.attrs.iter().find_map(|a| match &a.meta {
        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    });
    let candidates = match explicit {
        Some(p) => vec![file.parent().unwrap_or(Path::new("")).join(p)],
        None => vec![
            child_dir.join(format!("{name}.rs")),
            child_dir.join(&name).join("mod.rs"),
        ],
    };
    let found = candidates
        .iter()
        .find(|c| repo.join(c).is_file())
        .ok_or_else(|| {
            format!(
                "{}: `mod {name};` but none of {candidates:?} exists",
                file.display()
            )
        })?;
    let grandchild_dir = if found.file_name().is_some_and(|f| f == "mod.rs") {
        found.parent().unwrap_or(Path::new("")).to_path_buf()
    } else {
        found.with_extension("")
    };
    Ok((found.clone(), grandchild_dir))
}

/// Every `.rs` file under `dir` (relative to `repo`), sorted.
pub fn rust_files(repo: &Path, dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(repo.join(&d)) else {
            continue;
        };
        for e in entries.flatten() {
            let rel = d.join(e.file_name());
            if e.path().is_dir() {
                stack.push(rel);
            } else if rel.extension().is_some_and(|x| x == "rs") {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// `#[allow(unsafe_code)]` among `attrs` (outer or inner).
fn allows_unsafe(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("allow")
            && a.parse_args_with(
                syn::punctuated::Punctuated::<syn::Path, syn::Token![,]>::parse_terminated,
            )
            .is_ok_and(|lints| lints.iter().any(|l| l.is_ident("unsafe_code")))
    })
}
