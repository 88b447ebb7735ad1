//! `cargo xtask new-migration NAME`: writes `migrations/V{next}__{name}.sql`.
//!
//! `next` is the highest existing version + 1; NAME is lower-cased and
//! everything outside `[a-z0-9_]` becomes `_`. The file starts with a
//! comment header and is never overwritten.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::{CmdResult, workspace};

/// `cargo xtask new-migration NAME…`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What the migration does, e.g. `add webhook secrets` (words are joined with `_`).
    #[arg(required = true, value_name = "NAME")]
    name: Vec<String>,
}

/// Creates the migration file and prints its path.
pub fn run(args: Args) -> CmdResult {
    let path = create(&workspace::migrations_dir(), &args.name.join(" "))?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// `V{version}__{name}.sql` split into `(version, name)`; `None` for any
/// other file name. Lenient: any name, leading zeros allowed (tidy is strict).
pub fn parse_file_name(file_name: &str) -> Option<(u64, &str)> {
    let rest = file_name.strip_prefix('V')?.strip_suffix(".sql")?;
    let (version, name) = rest.split_once("__")?;
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((version.parse().ok()?, name))
}

/// NAME lower-cased, non-`[a-z0-9_]` runs turned into one `_`, trimmed of
/// `_`; `None` when nothing is left.
pub fn sanitise(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    for c in name.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '_'
        };
        if !(c == '_' && (out.is_empty() || out.ends_with('_'))) {
            out.push(c);
        }
    }
    let out = out.trim_end_matches('_').to_owned();
    (!out.is_empty()).then_some(out)
}

/// The version after the highest `V{n}__*.sql` in `dir` (1 when there is none).
pub fn next_version(dir: &Path) -> std::io::Result<u64> {
    let mut highest = 0;
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if let Some((version, _)) = entry.file_name().to_str().and_then(parse_file_name) {
                    highest = highest.max(version);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(highest + 1)
}

/// Writes `dir/V{next}__{sanitised name}.sql` with a header (creating `dir`
/// if needed) and returns its path. Fails rather than overwrite a file.
pub fn create(dir: &Path, name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let clean = sanitise(name)
        .ok_or_else(|| format!("migration name {name:?} has no letters or digits"))?;
    fs::create_dir_all(dir)?;
    let version = next_version(dir)?;
    let path = dir.join(format!("V{version}__{clean}.sql"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    write!(
        file,
        "-- V{version}: {title}\n\
         --\n\
         -- Applied once by refinery, in its own transaction, in version order\n\
         -- (`cargo xtask migrate`, or services started with E2A_MIGRATION_MODE=auto).\n\
         -- Never edit a migration that has been applied anywhere: add a new one.\n\
         -- Statuses are `text` with a CHECK; list columns explicitly.\n\
         \n",
        title = clean.replace('_', " ")
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitise_keeps_only_lowercase_digits_underscores() {
        assert_eq!(
            sanitise("Add Webhook-Secrets!").as_deref(),
            Some("add_webhook_secrets")
        );
        assert_eq!(sanitise("  v2 index  ").as_deref(), Some("v2_index"));
        assert_eq!(sanitise("a__b").as_deref(), Some("a_b"));
        assert_eq!(sanitise("Ünïcode").as_deref(), Some("n_code"));
        assert_eq!(sanitise("--- !!"), None);
    }

    #[test]
    fn parses_only_versioned_sql_files() {
        assert_eq!(parse_file_name("V12__add_x.sql"), Some((12, "add_x")));
        assert_eq!(parse_file_name("V012__add_x.sql"), Some((12, "add_x")));
        assert_eq!(parse_file_name("V1_add.sql"), None);
        assert_eq!(parse_file_name("U1__x.sql"), None);
        assert_eq!(parse_file_name("V__x.sql"), None);
        assert_eq!(parse_file_name("V1__x.txt"), None);
    }

    #[test]
    fn creates_the_next_version_without_overwriting() {
        let dir = std::env::temp_dir().join(format!("xtask-newmig-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = create(&dir, "initial schema").expect("first");
        assert_eq!(first, dir.join("V1__initial_schema.sql"));
        fs::write(dir.join("V7__later.sql"), "").expect("write");
        fs::write(dir.join("notes.txt"), "").expect("write");
        let next = create(&dir, "Add Things").expect("next");
        assert_eq!(next, dir.join("V8__add_things.sql"));
        let text = fs::read_to_string(&next).expect("read");
        assert!(text.starts_with("-- V8: add things\n"), "{text}");
        assert!(create(&dir, "!!!").is_err());
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
