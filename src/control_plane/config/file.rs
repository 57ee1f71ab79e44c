//! A configuration file from disk: read it, validate it, and name the file in every problem, so
//! each subcommand that takes `--config` reports a bad file the same way
//! (`node.yaml:4:3: node.colour: unknown key …`).

use std::io;
use std::path::{Path, PathBuf};

use super::model::{Config, ConfigErrors};
use super::validate::check;

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: cannot read: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {} error(s)", path.display(), errors.0.len())]
    Invalid { path: PathBuf, errors: ConfigErrors },
}

impl FileError {
    /// Every problem, one line each, as `file:line:col: path: message` (or the read error).
    pub fn lines(&self) -> Vec<String> {
        match self {
            FileError::Unreadable { .. } => vec![self.to_string()],
            FileError::Invalid { path, errors } => errors
                .0
                .iter()
                .map(|e| format!("{}:{e}", path.display()))
                .collect(),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            FileError::Unreadable { path, .. } | FileError::Invalid { path, .. } => path,
        }
    }
}

/// Reads and validates `path`: the [`Config`], or every problem in the file. Warnings (valid
/// settings that will not do what they seem to say) are logged.
pub fn load_file(path: &Path) -> Result<Config, FileError> {
    let (config, warnings) = check_file(path)?;
    for w in warnings {
        log::warn!("{w}");
    }
    Ok(config)
}

/// [`load_file`] that hands the warnings back instead, each as
/// `file:line:col: path: warning: message` (what `ringtun check-config` prints).
pub fn check_file(path: &Path) -> Result<(Config, Vec<String>), FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    check_file_text(path, &text)
}

/// [`check_file`] of text already read from `path` (a reload reads the file once, to both
/// fingerprint and load the same bytes).
pub fn check_file_text(path: &Path, text: &str) -> Result<(Config, Vec<String>), FileError> {
    let checked = check(text).map_err(|errors| FileError::Invalid {
        path: path.to_path_buf(),
        errors,
    })?;
    let warnings = checked
        .warnings
        .iter()
        .map(|w| format!("{}:{w}", path.display()))
        .collect();
    Ok((checked.config, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ringtun-config-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn every_problem_is_named_with_the_file_and_its_place() {
        let path = scratch(
            "bad.yaml",
            "version: 1\nnode:\n  name: node-a\n  colour: blue\n  timeouts:\n    idle: forever\n",
        );
        let err = load_file(&path).unwrap_err();
        let lines = err.lines();
        let file = path.display().to_string();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with(&format!("{file}:4:")) && lines[0].contains("colour"));
        assert!(lines[1].starts_with(&format!("{file}:6:")) && lines[1].contains("idle"));
        assert_eq!(err.to_string(), format!("{file}: 2 error(s)"));
    }

    #[test]
    fn an_unreadable_file_is_one_problem_naming_it() {
        let path = Path::new("/nonexistent/ringtun.yaml");
        let err = load_file(path).unwrap_err();
        assert_eq!(err.path(), path);
        assert_eq!(err.lines().len(), 1);
        assert!(
            err.lines()[0].starts_with("/nonexistent/ringtun.yaml: cannot read: "),
            "{:?}",
            err.lines()
        );
    }

    #[test]
    fn a_valid_file_loads() {
        let path = scratch("ok.yaml", super::super::DEFAULT_CONFIG_YAML);
        let cfg = load_file(&path).expect("the commented example is valid");
        assert!(!cfg.node.name.is_empty());
    }
}
