//! The kernel matrix's fetcher (`tests/kernels/fetch-kernel.sh`) reaches the Debian archive at
//! the address the machine's own apt configuration uses, in either source format, and says so
//! clearly when there is none; and no file of the repository names an archive host. The
//! configurations here are private (`APT_CONFIG` points apt at them) and nothing is fetched:
//! `--sources` prints the private sources list the fetcher would use, and exits.

use std::path::{Path, PathBuf};
use std::process::Command;

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernels/fetch-kernel.sh")
}

fn apt_available() -> bool {
    if Command::new("apt-get").arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("apt-get is missing: CI runs on Debian, where the kernel matrix needs it");
    }
    eprintln!("SKIPPED (no apt-get on this machine)");
    false
}

/// A private apt configuration: `list` as sources.list, `parts` as sources.list.d files.
struct AptConfig {
    dir: PathBuf,
}

impl AptConfig {
    fn new(name: &str, list: &str, parts: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("rt{}-apt-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("parts")).unwrap();
        std::fs::write(dir.join("sources.list"), list).unwrap();
        for (file, text) in parts {
            std::fs::write(dir.join("parts").join(file), text).unwrap();
        }
        std::fs::write(
            dir.join("apt.conf"),
            format!(
                "Dir::Etc::SourceList \"{0}/sources.list\";\nDir::Etc::SourceParts \"{0}/parts\";\n",
                dir.display()
            ),
        )
        .unwrap();
        AptConfig { dir }
    }

    /// `fetch-kernel.sh --sources <suite>` under this configuration: (exit code, stdout, stderr).
    fn sources(&self, suite: &str) -> (i32, String, String) {
        let out = Command::new("bash")
            .arg(script())
            .args(["--sources", suite])
            .env("APT_CONFIG", self.dir.join("apt.conf"))
            .output()
            .expect("run fetch-kernel.sh");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for AptConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn deb(uri: &str, suite: &str) -> String {
    format!("deb [signed-by={KEYRING}] {uri} {suite} main")
}

#[test]
fn one_line_sources_give_the_release_its_updates_and_security() {
    if !apt_available() {
        return;
    }
    let apt = AptConfig::new(
        "list",
        "# a comment\n\
         deb [arch=amd64] http://mirror.example.net/debian/ bookworm main contrib\n\
         deb http://mirror.example.net/debian-security bookworm-security main\n\
         deb-src http://src.example.net/debian bookworm main\n\
         deb https://vendor.example.com/apt cloud-sdk-bookworm main\n",
        &[],
    );
    let (code, out, err) = apt.sources("bullseye");
    assert_eq!(code, 0, "{err}");
    let want = [
        deb("http://mirror.example.net/debian", "bullseye"),
        deb("http://mirror.example.net/debian", "bullseye-updates"),
        deb(
            "http://mirror.example.net/debian-security",
            "bullseye-security",
        ),
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), want, "{err}");
}

#[test]
fn deb822_sources_are_read_and_other_vendors_ignored() {
    if !apt_available() {
        return;
    }
    let apt = AptConfig::new(
        "deb822",
        "",
        &[
            (
                "a-vendor.sources",
                "Types: deb\nURIs: https://deb.vendor.example.com/node_20.x\nSuites: nodistro\n\
                 Components: main\n",
            ),
            (
                "debian.sources",
                "Types: deb\nURIs: http://other.example.org/debian\n\
                 Suites: trixie trixie-updates\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                 Types: deb\nURIs: http://other.example.org/debian-security\n\
                 Suites: trixie-security\nComponents: main\n",
            ),
        ],
    );
    // A backports suite and sid come alone (their kernel is then the candidate); a release
    // gets its -updates and -security.
    let (code, out, err) = apt.sources("trixie-backports");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        deb("http://other.example.org/debian", "trixie-backports")
    );
    let (code, out, err) = apt.sources("sid");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), deb("http://other.example.org/debian", "sid"));
    let (code, out, _) = apt.sources("bookworm");
    assert_eq!(code, 0);
    assert!(
        out.contains(&deb(
            "http://other.example.org/debian-security",
            "bookworm-security"
        )),
        "{out}"
    );
}

#[test]
fn no_debian_archive_is_a_clear_error() {
    if !apt_available() {
        return;
    }
    let apt = AptConfig::new(
        "none",
        "deb https://vendor.example.com/apt cloud-sdk-bookworm main\n",
        &[],
    );
    let (code, out, err) = apt.sources("bookworm");
    assert_ne!(code, 0, "{out}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("names no Debian archive") && err.contains("sources.list"),
        "{err}"
    );
}

#[test]
fn a_release_without_a_security_archive_says_so() {
    if !apt_available() {
        return;
    }
    let apt = AptConfig::new(
        "nosec",
        "deb http://mirror.example.net/debian bookworm main\n",
        &[],
    );
    let (code, out, err) = apt.sources("bookworm");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(err.contains("no Debian security archive"), "{err}");
}

/// The matrix follows the machine's mirror; the repository itself names none.
#[test]
fn the_repository_names_no_debian_archive_host() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut offenders = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" || name == ".git" {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                // Spelled in two halves so this file does not name it either.
                if text.contains(concat!("debian", ".org")) {
                    offenders.push(path.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "files naming a Debian archive host: {offenders:?}"
    );
}
