//! Tidy: the maps match the territory. ARCHITECTURE.md names only paths that exist, and every
//! source file is named in ARCHITECTURE.md or in its crate's module map (the `//!` list of the
//! `lib.rs` or `mod.rs` above it).

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir`, skipping build output, dependencies and hidden folders.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('.') || ["target", "node_modules"].contains(&name.as_str()) {
            continue;
        }
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn repo_files() -> Vec<String> {
    let mut all = Vec::new();
    files(root(), &mut all);
    all.iter()
        .map(|p| {
            p.strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect()
}

/// The backticked words of `text`.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// Whether a code span looks like a path: a file with an extension people name, or a folder.
fn is_path(span: &str) -> bool {
    const EXTENSIONS: [&str; 8] = [".rs", ".sql", ".toml", ".md", ".json", ".yml", ".sh", ".py"];
    // A span starting with `/` is a URL path (`/docs/`), not a file.
    !span.contains(' ')
        && !span.starts_with('/')
        && !span.contains('*')
        && !span.contains("::")
        && (EXTENSIONS.iter().any(|e| span.ends_with(e)) || (span.ends_with('/') && span.len() > 1))
}

#[test]
fn every_path_architecture_names_exists() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let files = repo_files();
    let missing: Vec<&str> = code_spans(&text)
        .into_iter()
        .filter(|s| is_path(s))
        .filter(|s| {
            let s = s.trim_start_matches("./");
            !files.iter().any(|f| {
                f == s
                    || f.ends_with(&format!("/{s}"))
                    || f.contains(&format!("/{s}"))
                    || f.starts_with(s)
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {missing:?}"
    );
}

#[test]
fn every_source_file_is_on_a_map() {
    let architecture = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let named = code_spans(&architecture);
    let mut unmapped = Vec::new();
    for file in repo_files() {
        let Some((_, rest)) = file.split_once("src/") else {
            continue;
        };
        let path = Path::new(&file);
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        if !file.ends_with(".rs")
            || rest.contains("bin/")
            || ["lib", "main"].contains(&stem.as_str())
        {
            continue;
        }
        // A folder module is on the map by its folder's name; a file by its own.
        let (name, parent) = if stem == "mod" {
            let folder = path.parent().unwrap();
            let name = folder.file_name().unwrap().to_string_lossy().to_string();
            (name, folder.parent().unwrap().to_path_buf())
        } else {
            (stem, path.parent().unwrap().to_path_buf())
        };
        let in_architecture = named.iter().any(|s| {
            *s == format!("{name}.rs")
                || *s == format!("{name}/")
                || s.ends_with(&format!("/{name}.rs"))
                || s.ends_with(&format!("/{name}/"))
        });
        // The module map above it: the parent folder's lib.rs or mod.rs.
        let map = ["lib.rs", "mod.rs"]
            .iter()
            .map(|m| root().join(&parent).join(m))
            .find(|m| m.exists())
            .map(|m| {
                std::fs::read_to_string(m)
                    .unwrap()
                    .lines()
                    .take_while(|l| l.starts_with("//!") || l.is_empty())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        let in_map = map.contains(&format!("[`{name}`]")) || map.contains(&format!("`{name}.rs`"));
        if !in_architecture && !in_map {
            unmapped.push(file);
        }
    }
    assert!(
        unmapped.is_empty(),
        "source files named neither in ARCHITECTURE.md nor in their module map: {unmapped:?}"
    );
}

/// The ports speak in `ErrorKind` and strings: no driver type in their files (comments aside).
#[test]
fn no_port_names_a_driver_type() {
    let ports = [
        "backends/src/error.rs",
        "backends/src/source.rs",
        "backends/src/sink.rs",
        "backends/src/store/mod.rs",
        "backends/src/state/mod.rs",
    ];
    for port in ports {
        let text = std::fs::read_to_string(root().join(port)).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            for driver in ["rusqlite::", "clickhouse::", "rdkafka::", "redis::"] {
                assert!(
                    !code.contains(driver),
                    "{port}:{}: names {driver} in a port: {line}",
                    i + 1
                );
            }
        }
    }
}
