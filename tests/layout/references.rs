//! What each file names of the others, resolved to the file that defines it.
//!
//! Collected: every `use` (groups and renames expanded), every path of two or more segments in
//! code and types, and the paths inside macro invocations (read token by token, since the
//! bodies of `format!`, `assert_eq!` or `log::info!` are not parsed as code). Resolved the way
//! rustc 2018+ resolves them: from `crate::`, `self::`, `super::`, a child module, or a name a
//! `use` brought into the module; then to the file that *defines* the item, following
//! re-exports (`pub use child::Item`, globs) — a facade `mod.rs` that re-exports is not where
//! its children's items live. A glob import (`use super::*`) counts as naming the module it
//! imports from, which can only add edges, never hide one. Visibility restrictions
//! (`pub(in crate::x)`), attributes and doc comments name modules without depending on them
//! and are skipped.
//!
//! Also collected: calls into the OS below std (`libc::f(..)`, any `nix::` path).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use syn::visit::{self, Visit};

use crate::crate_tree::CrateTree;

/// One file naming an item of another.
#[derive(Debug, Clone)]
pub struct Reference {
    pub file: PathBuf,
    pub line: usize,
    /// The path as written.
    pub written: String,
    /// The file that defines what it names.
    pub to: PathBuf,
}

/// A call into the OS that bypasses std: `libc::name(..)` or any use of `nix`.
#[derive(Debug, Clone)]
pub struct OsCall {
    pub file: PathBuf,
    /// The module the call is in (crate-relative path).
    pub module: Vec<String>,
    pub line: usize,
    pub written: String,
}

/// A path as written, before resolution.
struct Written {
    file: PathBuf,
    scope: Vec<String>,
    line: usize,
    segments: Vec<String>,
}

/// What a module holds by name: items it defines, names its module-level `use`s bind (to a
/// path still to resolve), and the modules it glob-imports.
#[derive(Default)]
struct Names {
    defined: BTreeSet<String>,
    uses: BTreeMap<String, Vec<String>>,
    globs: Vec<Vec<String>>,
}

/// Every reference between files of `tree` that stays inside the crate, and every OS call.
pub fn collect(tree: &CrateTree) -> (Vec<Reference>, Vec<OsCall>) {
    let mut c = Collector {
        file: PathBuf::new(),
        scope: Vec::new(),
        written: Vec::new(),
        names: BTreeMap::new(),
        os_calls: Vec::new(),
    };
    for (file, ast) in &tree.files {
        // The module the file is (the shortest path: the others are its inline modules).
        c.scope = tree
            .modules
            .iter()
            .filter(|(_, m)| &m.file == file)
            .map(|(p, _)| p.clone())
            .min_by_key(|p| p.len())
            .expect("every parsed file is some module's");
        c.file = file.clone();
        c.record_names(&ast.items);
        c.visit_file(ast);
    }
    let resolver = Resolver {
        tree,
        names: &c.names,
    };
    let refs = c
        .written
        .iter()
        .filter_map(|w| {
            let absolute = resolver.absolute(&w.scope, &w.segments)?;
            Some(Reference {
                file: w.file.clone(),
                line: w.line,
                written: w.segments.join("::"),
                to: resolver.defining_file(&absolute, 0),
            })
        })
        .collect();
    (refs, c.os_calls)
}

struct Resolver<'a> {
    tree: &'a CrateTree,
    names: &'a BTreeMap<Vec<String>, Names>,
}

/// Re-exports and aliases followed at most this deep (`use a::a` would otherwise loop).
const MAX_REEXPORTS: usize = 16;

impl Resolver<'_> {
    /// The crate-relative path `segments` means in module `scope`, or `None` when it leaves the
    /// crate (std, libc, another crate) or is relative to a type (`Self::`).
    fn absolute(&self, scope: &[String], segments: &[String]) -> Option<Vec<String>> {
        self.absolute_within(scope, segments, 0)
    }

    fn absolute_within(
        &self,
        scope: &[String],
        segments: &[String],
        depth: usize,
    ) -> Option<Vec<String>> {
        let (first, rest) = segments.split_first()?;
        let mut base = match first.as_str() {
            "crate" => Vec::new(),
            "self" => scope.to_vec(),
            "super" => {
                let mut base = scope.to_vec();
                base.pop()?;
                return self.absolute_from(base, rest);
            }
            _ => {
                let here = self.tree.modules.get(scope)?;
                if here.children.contains(first) {
                    scope.to_vec()
                } else {
                    // A name a `use` of this module brought in.
                    if depth >= MAX_REEXPORTS {
                        return None;
                    }
                    let target = self.names.get(scope)?.uses.get(first)?;
                    let mut base = self.absolute_within(scope, target, depth + 1)?;
                    base.extend(rest.iter().cloned());
                    return Some(base);
                }
            }
        };
        if first != "crate" && first != "self" {
            base.push(first.clone());
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// `super::super::x` after the first `super`.
    fn absolute_from(&self, mut base: Vec<String>, rest: &[String]) -> Option<Vec<String>> {
        let mut rest = rest;
        while rest.first().is_some_and(|s| s == "super") {
            base.pop()?;
            rest = &rest[1..];
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The file defining what `path` names: the module it lands in, or — when that module
    /// only re-exports the name — the file the re-export leads to.
    fn defining_file(&self, path: &[String], depth: usize) -> PathBuf {
        let module = self.tree.module_of(path);
        let here = self.tree.modules[module].file.clone();
        let Some(name) = path.get(module.len()) else {
            return here;
        };
        let Some(names) = self.names.get(module) else {
            return here;
        };
        if names.defined.contains(name) || depth >= MAX_REEXPORTS {
            return here;
        }
        let via = |target: Vec<String>| -> Option<PathBuf> {
            let mut next = self.absolute(module, &target)?;
            next.extend(path[module.len() + 1..].iter().cloned());
            Some(self.defining_file(&next, depth + 1))
        };
        if let Some(target) = names.uses.get(name) {
            // A re-export of something outside the crate is this module's own business.
            return via(target.clone()).unwrap_or(here);
        }
        for glob in &names.globs {
            let Some(source) = self.absolute(module, glob) else {
                continue;
            };
            let offers = self
                .names
                .get(&source)
                .is_some_and(|n| n.defined.contains(name) || n.uses.contains_key(name));
            if offers {
                let mut target = glob.clone();
                target.push(name.clone());
                if let Some(file) = via(target) {
                    return file;
                }
            }
        }
        here
    }
}

struct Collector {
    file: PathBuf,
    scope: Vec<String>,
    written: Vec<Written>,
    names: BTreeMap<Vec<String>, Names>,
    os_calls: Vec<OsCall>,
}

/// The leaves of a `use` tree: each full path, and the name it binds (`None` for a glob).
fn use_leaves(
    tree: &syn::UseTree,
    prefix: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, Option<String>)>,
) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_leaves(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) if n.ident == "self" => {
            out.push((prefix.clone(), prefix.last().cloned()));
        }
        syn::UseTree::Name(n) => {
            let mut path = prefix.clone();
            path.push(n.ident.to_string());
            out.push((path, Some(n.ident.to_string())));
        }
        syn::UseTree::Rename(r) => {
            let mut path = prefix.clone();
            path.push(r.ident.to_string());
            let binding = (r.rename != "_").then(|| r.rename.to_string());
            out.push((path, binding));
        }
        syn::UseTree::Glob(_) => out.push((prefix.clone(), None)),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_leaves(t, prefix, out);
            }
        }
    }
}

impl Collector {
    /// The names the module in `self.scope` holds at its top level.
    fn record_names(&mut self, items: &[syn::Item]) {
        let names = self.names.entry(self.scope.clone()).or_default();
        for item in items {
            let ident = match item {
                syn::Item::Const(i) => &i.ident,
                syn::Item::Enum(i) => &i.ident,
                syn::Item::ExternCrate(i) => &i.ident,
                syn::Item::Fn(i) => &i.sig.ident,
                syn::Item::Macro(i) => match &i.ident {
                    Some(ident) => ident,
                    None => continue,
                },
                syn::Item::Mod(i) => &i.ident,
                syn::Item::Static(i) => &i.ident,
                syn::Item::Struct(i) => &i.ident,
                syn::Item::Trait(i) => &i.ident,
                syn::Item::TraitAlias(i) => &i.ident,
                syn::Item::Type(i) => &i.ident,
                syn::Item::Union(i) => &i.ident,
                syn::Item::Use(u) if u.leading_colon.is_none() => {
                    let mut leaves = Vec::new();
                    use_leaves(&u.tree, &mut Vec::new(), &mut leaves);
                    for (path, binding) in leaves {
                        match binding {
                            Some(name) => {
                                names.uses.insert(name, path);
                            }
                            None => names.globs.push(path),
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            names.defined.insert(ident.to_string());
        }
    }

    fn push(&mut self, segments: Vec<String>, line: usize) {
        if segments.first().is_some_and(|s| s == "nix") {
            self.os_call(line, segments.join("::"));
        }
        if !segments.is_empty() {
            self.written.push(Written {
                file: self.file.clone(),
                scope: self.scope.clone(),
                line,
                segments,
            });
        }
    }

    fn os_call(&mut self, line: usize, written: String) {
        self.os_calls.push(OsCall {
            file: self.file.clone(),
            module: self.scope.clone(),
            line,
            written,
        });
    }

    /// Paths inside a macro invocation: `a::b::c` runs of tokens, at any depth.
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let tts: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tts.len() {
            match &tts[i] {
                TokenTree::Group(g) => {
                    self.scan_tokens(g.stream());
                    i += 1;
                }
                TokenTree::Ident(id) => {
                    let line = id.span().start().line;
                    let mut segments = vec![id.to_string()];
                    let mut j = i + 1;
                    while let (
                        Some(TokenTree::Punct(a)),
                        Some(TokenTree::Punct(b)),
                        Some(TokenTree::Ident(next)),
                    ) = (tts.get(j), tts.get(j + 1), tts.get(j + 2))
                    {
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        segments.push(next.to_string());
                        j += 3;
                    }
                    if segments.len() >= 2 {
                        let called = matches!(tts.get(j),
                            Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Parenthesis);
                        if segments[0] == "libc" && called {
                            self.os_call(line, segments.join("::"));
                        }
                        self.push(segments, line);
                    }
                    i = j;
                }
                _ => i += 1,
            }
        }
    }
}

fn segments_of(path: &syn::Path) -> Vec<String> {
    path.segments.iter().map(|s| s.ident.to_string()).collect()
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // Only inline modules are walked here; a `mod x;` file is visited as its own file.
        if let Some((_, items)) = &m.content {
            self.scope.push(m.ident.to_string());
            self.record_names(items);
            for item in items {
                self.visit_item(item);
            }
            self.scope.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if u.leading_colon.is_some() {
            return;
        }
        let line = u.use_token.span.start().line;
        let mut leaves = Vec::new();
        use_leaves(&u.tree, &mut Vec::new(), &mut leaves);
        for (path, _) in leaves {
            self.push(path, line);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() && p.segments.len() >= 2 {
            let line = p.segments[0].ident.span().start().line;
            self.push(segments_of(p), line);
        }
        visit::visit_path(self, p);
    }

    fn visit_expr_call(&mut self, call: &'ast syn::ExprCall) {
        if let syn::Expr::Path(f) = &*call.func {
            let segs = segments_of(&f.path);
            if segs.len() >= 2 && segs[0] == "libc" {
                let line = f.path.segments[0].ident.span().start().line;
                self.os_call(line, segs.join("::"));
            }
        }
        visit::visit_expr_call(self, call);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.scan_tokens(m.tokens.clone());
    }

    // `pub(in crate::x)` and attributes name modules without depending on them.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}
    fn visit_attribute(&mut self, _: &'ast syn::Attribute) {}
}
