//! `cargo xtask tidy`: repository conventions a compiler does not check.
//!
//! Fails (exit 1) listing every problem as `path:line: message`:
//! * every `.rs` file under `crates/*/src`, `bins/*/src` and `xtask/src`
//!   starts with a `//!` module doc (`main.rs` files are exempt);
//! * `migrations/` holds only `V{n}__{name}.sql` files (`name` in
//!   `[a-z0-9_]`, no leading zeros, no sub-directories; dotfiles and
//!   `README.md` are ignored) numbered exactly 1..=N, unique and gap-free;
//! * no `SELECT *` / `SELECT t.*` (any case, also after `DISTINCT` or a
//!   comma) in `crates/store/src` or `migrations/` — comments included;
//! * every `bins/*/src/main.rs` is thin: at most [`MAX_MAIN_LINES`] lines,
//!   no `fn` other than `main` and no `struct`/`enum`/`impl`/`trait`/`mod`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::{CmdResult, new_migration, workspace};

/// Longest a binary's `main.rs` may be.
pub const MAX_MAIN_LINES: usize = 25;

/// `cargo xtask tidy` (no options).
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Checks the workspace; prints `tidy: ok` or every problem and exits 1.
pub fn run(_args: Args) -> CmdResult {
    let root = workspace::root();
    let problems = check(&root);
    if problems.is_empty() {
        println!("tidy: ok");
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &problems {
        println!("{problem}");
    }
    println!("tidy: {} problem(s)", problems.len());
    Ok(ExitCode::FAILURE)
}

/// One violated convention, located in a file (relative to the root).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The file (or directory), relative to the checked root.
    pub path: PathBuf,
    /// 1-based line, when the problem has one.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// Every problem under `root`, sorted by path and line.
pub fn check(root: &Path) -> Vec<Problem> {
    let mut report = Report {
        root,
        problems: Vec::new(),
    };
    check_module_docs(&mut report);
    check_migrations(&mut report);
    check_select_star(&mut report);
    check_thin_mains(&mut report);
    let mut problems = report.problems;
    problems.sort();
    problems
}

struct Report<'a> {
    root: &'a Path,
    problems: Vec<Problem>,
}

impl Report<'_> {
    fn add(&mut self, path: &Path, line: Option<usize>, message: impl Into<String>) {
        let path = path.strip_prefix(self.root).unwrap_or(path).to_path_buf();
        self.problems.push(Problem {
            path,
            line,
            message: message.into(),
        });
    }

    fn read(&mut self, path: &Path) -> Option<String> {
        match fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) => {
                self.add(path, None, format!("cannot read: {e}"));
                None
            }
        }
    }
}

/// `<root>/<group>/*/src` for each group, plus `<root>/xtask/src`.
fn source_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for group in ["crates", "bins"] {
        for member in sorted_entries(&root.join(group)) {
            let src = member.join("src");
            if src.is_dir() {
                dirs.push(src);
            }
        }
    }
    let xtask = root.join("xtask").join("src");
    if xtask.is_dir() {
        dirs.push(xtask);
    }
    dirs
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Files under `dir` (recursively, hidden entries skipped) with extension `ext`.
fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for path in sorted_entries(dir) {
        if is_hidden(&path) {
            continue;
        }
        if path.is_dir() {
            out.extend(files_with_ext(&path, ext));
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    out
}

fn check_module_docs(report: &mut Report<'_>) {
    for src in source_dirs(report.root) {
        for file in files_with_ext(&src, "rs") {
            if file.file_name().is_some_and(|n| n == "main.rs") {
                continue;
            }
            let Some(text) = report.read(&file) else {
                continue;
            };
            if !has_module_doc(&text) {
                report.add(
                    &file,
                    Some(1),
                    "missing `//!` module doc at the top of the file",
                );
            }
        }
    }
}

/// True when the first line that is not blank, a plain `//` comment or an
/// inner attribute is a `//!` (or `/*!`) doc comment.
fn has_module_doc(text: &str) -> bool {
    for line in text.lines().map(str::trim) {
        if line.starts_with("//!") || line.starts_with("/*!") {
            return true;
        }
        let skippable = line.is_empty()
            || line.starts_with("#![")
            || (line.starts_with("//") && !line.starts_with("///"));
        if !skippable {
            return false;
        }
    }
    false
}

fn check_migrations(report: &mut Report<'_>) {
    let dir = report.root.join("migrations");
    if !dir.is_dir() {
        return;
    }
    let mut versions: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for path in sorted_entries(&dir) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') || name == "README.md" {
            continue;
        }
        if path.is_dir() {
            report.add(
                &path,
                None,
                "sub-directory in migrations/ (refinery would embed its files too); \
                 keep every migration directly in migrations/",
            );
            continue;
        }
        match strict_migration_name(&name) {
            Ok(version) => versions.entry(version).or_default().push(path),
            Err(why) => report.add(
                &path,
                None,
                format!("migration files must be named V{{n}}__{{name}}.sql: {why}"),
            ),
        }
    }
    for (version, paths) in &versions {
        if paths.len() > 1 {
            for path in paths {
                report.add(path, None, format!("duplicate migration version {version}"));
            }
        }
    }
    let highest = versions.keys().next_back().copied().unwrap_or(0);
    for missing in (1..=highest).filter(|v| !versions.contains_key(v)) {
        report.add(
            &dir,
            None,
            format!(
                "migration V{missing} is missing: versions must run 1..={highest} without gaps"
            ),
        );
    }
}

/// The version of a correctly named migration file, or why the name is wrong.
fn strict_migration_name(file_name: &str) -> Result<u64, String> {
    let Some((version, name)) = new_migration::parse_file_name(file_name) else {
        return Err("not of that form".into());
    };
    let digits = &file_name[1..file_name.find("__").unwrap_or(1)];
    if version == 0 {
        return Err("versions start at 1".into());
    }
    if digits.starts_with('0') {
        return Err(format!("write V{version}, without leading zeros"));
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!("name {name:?} must be non-empty [a-z0-9_]"));
    }
    Ok(version)
}

fn check_select_star(report: &mut Report<'_>) {
    let mut files = files_with_ext(&report.root.join("crates/store/src"), "rs");
    files.extend(files_with_ext(&report.root.join("migrations"), "sql"));
    for file in files {
        let Some(text) = report.read(&file) else {
            continue;
        };
        for line in select_star_lines(&text) {
            report.add(
                &file,
                Some(line),
                "`SELECT *`: list the columns (a new column must not change what code reads)",
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Word(&'a str),
    Star,
    Dot,
    Comma,
    Open,
    Close,
    Semi,
    Other,
}

/// A rough SQL tokenizer that also copes with SQL inside Rust string
/// literals (`"` is just punctuation; `\n`, `\t`, `\r` and line-continuation
/// escapes count as whitespace). Returns tokens with 1-based lines.
fn tokens(text: &str) -> Vec<(Tok<'_>, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b if b.is_ascii_whitespace() => i += 1,
            // `\n`, `\t`, `\r` escapes: skip both bytes; a line continuation:
            // skip the backslash and let the newline be counted.
            b'\\' if matches!(bytes.get(i + 1), Some(b'n' | b't' | b'r')) => i += 2,
            b'\\' if bytes.get(i + 1) == Some(&b'\n') => i += 1,
            b if b.is_ascii_alphabetic() || b == b'_' => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'$'))
                {
                    i += 1;
                }
                out.push((Tok::Word(&text[start..i]), line));
            }
            _ => {
                let tok = match b {
                    b'*' => Tok::Star,
                    b'.' => Tok::Dot,
                    b',' => Tok::Comma,
                    b'(' => Tok::Open,
                    b')' => Tok::Close,
                    b';' => Tok::Semi,
                    _ => Tok::Other,
                };
                out.push((tok, line));
                i += 1;
            }
        }
    }
    out
}

/// Words that end a select list.
const SELECT_LIST_END: &[&str] = &[
    "from",
    "into",
    "where",
    "group",
    "having",
    "window",
    "order",
    "limit",
    "offset",
    "union",
    "intersect",
    "except",
    "for",
    "fetch",
];

/// Lines holding a `*` (or `qualifier.*`) that is a whole item of a select
/// list: `SELECT *`, `SELECT DISTINCT *`, `SELECT t.*`, `SELECT a, t.*`,
/// also in sub-selects. `count(*)` and `a * b` are fine.
fn select_star_lines(text: &str) -> Vec<usize> {
    struct Frame {
        depth: usize,
        expect_item: bool,
    }
    let toks = tokens(text);
    let mut frames: Vec<Frame> = Vec::new();
    let mut depth = 0usize;
    let mut lines = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let (tok, line) = toks[i];
        let at_item = frames
            .last()
            .is_some_and(|f| f.depth == depth && f.expect_item);
        let current = frames.last_mut().filter(|f| f.depth == depth);
        match tok {
            Tok::Word(w) if w.eq_ignore_ascii_case("select") => frames.push(Frame {
                depth,
                expect_item: true,
            }),
            Tok::Word(w)
                if at_item
                    && (w.eq_ignore_ascii_case("distinct") || w.eq_ignore_ascii_case("all")) => {}
            Tok::Word(w) if SELECT_LIST_END.iter().any(|k| w.eq_ignore_ascii_case(k)) => {
                if current.is_some() {
                    frames.pop();
                }
            }
            Tok::Word(_) => {
                if at_item {
                    // qualifier(.qualifier)*.*
                    let mut j = i;
                    while matches!(toks.get(j), Some((Tok::Word(_), _)))
                        && matches!(toks.get(j + 1), Some((Tok::Dot, _)))
                    {
                        j += 2;
                    }
                    if j > i && matches!(toks.get(j), Some((Tok::Star, _))) {
                        lines.push(toks[j].1);
                    }
                }
                if let Some(frame) = current {
                    frame.expect_item = false;
                }
            }
            Tok::Star => {
                if at_item {
                    lines.push(line);
                }
                if let Some(frame) = current {
                    frame.expect_item = false;
                }
            }
            Tok::Comma => {
                if let Some(frame) = current {
                    frame.expect_item = true;
                }
            }
            Tok::Open => {
                if let Some(frame) = current {
                    frame.expect_item = false;
                }
                depth += 1;
            }
            Tok::Close => {
                depth = depth.saturating_sub(1);
                while frames.last().is_some_and(|f| f.depth > depth) {
                    frames.pop();
                }
            }
            Tok::Semi => {
                frames.clear();
                depth = 0;
            }
            Tok::Dot | Tok::Other => {
                if let Some(frame) = current {
                    frame.expect_item = false;
                }
            }
        }
        i += 1;
    }
    lines.dedup();
    lines
}

fn check_thin_mains(report: &mut Report<'_>) {
    for bin in sorted_entries(&report.root.join("bins")) {
        let main = bin.join("src").join("main.rs");
        if !main.is_file() {
            continue;
        }
        let Some(text) = report.read(&main) else {
            continue;
        };
        let count = text.lines().count();
        if count > MAX_MAIN_LINES {
            report.add(
                &main,
                None,
                format!(
                    "{count} lines; a binary's main.rs is a thin call into its library \
                     (at most {MAX_MAIN_LINES} lines): move the code into src/lib.rs"
                ),
            );
        }
        for (line, what) in thick_main_lines(&text) {
            report.add(
                &main,
                Some(line),
                format!("{what} in main.rs: move it into the service library (src/lib.rs)"),
            );
        }
    }
}

/// Lines of a `main.rs` that define something other than `fn main`.
fn thick_main_lines(text: &str) -> Vec<(usize, String)> {
    const ITEMS: &[&str] = &[
        "struct",
        "enum",
        "impl",
        "trait",
        "mod",
        "union",
        "macro_rules!",
    ];
    let mut out = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with("//") {
            continue;
        }
        let words: Vec<&str> = line
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '!'))
            .filter(|w| !w.is_empty())
            .collect();
        for (k, word) in words.iter().enumerate() {
            if *word == "fn" {
                let name = words.get(k + 1).copied().unwrap_or("");
                if name != "main" {
                    out.push((index + 1, format!("`fn {name}`")));
                }
            }
        }
        let first_item_word = words
            .iter()
            .find(|w| !matches!(**w, "pub" | "crate" | "super" | "unsafe"));
        if let Some(word) = first_item_word
            && ITEMS.contains(word)
            && line.starts_with(|c: char| c.is_ascii_lowercase())
        {
            out.push((index + 1, format!("`{word}`")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_doc_detection() {
        assert!(has_module_doc("//! Doc.\nfn x() {}"));
        assert!(has_module_doc("\n// SPDX header\n#![allow(x)]\n//! Doc.\n"));
        assert!(has_module_doc("/*! Doc. */"));
        assert!(!has_module_doc("/// item doc\nfn x() {}"));
        assert!(!has_module_doc("use std::fs;\n//! late\n"));
        assert!(!has_module_doc(""));
    }

    #[test]
    fn select_star_detection() {
        let flagged = [
            "SELECT * FROM t",
            "select\n  *\nfrom t",
            "SELECT DISTINCT * FROM t",
            "SELECT t.* FROM t",
            "select a, m.* from messages m",
            "SELECT s.t.* FROM s.t",
            "WHERE EXISTS (SELECT * FROM t)",
            r#"client.query("SELECT\n * FROM t", &[])"#,
            "-- we never SELECT * here",
        ];
        for sql in flagged {
            assert_eq!(select_star_lines(sql).len(), 1, "not flagged: {sql}");
        }
        let fine = [
            "SELECT count(*) FROM t",
            "SELECT a * b FROM t",
            "SELECT id, status FROM t WHERE n = 2 * 3",
            "SELECT 1; UPDATE t SET n = n * 2",
            "tokio::select! { x = y => {} }",
            "INSERT INTO t SELECT id FROM u",
            "SELECT (a).* FROM t", // composite expansion: an expression, not a table star
        ];
        for sql in fine {
            assert!(select_star_lines(sql).is_empty(), "wrongly flagged: {sql}");
        }
        assert_eq!(select_star_lines("SELECT 1;\n\nSELECT *\nFROM t"), vec![3]);
    }

    #[test]
    fn migration_names() {
        assert_eq!(strict_migration_name("V1__init.sql"), Ok(1));
        assert_eq!(strict_migration_name("V12__add_x2.sql"), Ok(12));
        assert!(strict_migration_name("V01__init.sql").is_err());
        assert!(strict_migration_name("V0__init.sql").is_err());
        assert!(strict_migration_name("V1__Init.sql").is_err());
        assert!(strict_migration_name("V1__.sql").is_err());
        assert!(strict_migration_name("V1_init.sql").is_err());
        assert!(strict_migration_name("init.sql").is_err());
    }

    #[test]
    fn thin_main_detection() {
        let thin = "//! x\nfn main() -> std::process::ExitCode {\n    e2a_api::main()\n}\n";
        assert!(thick_main_lines(thin).is_empty());
        assert!(thick_main_lines("#[tokio::main]\nasync fn main() {}\n").is_empty());
        let thick = "fn main() {}\nfn helper() {}\nstruct Config;\npub(crate) mod x;\n";
        let found: Vec<usize> = thick_main_lines(thick)
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        assert_eq!(found, vec![2, 3, 4]);
    }

    /// A scratch workspace with one file per convention, broken or not.
    struct Fixture(PathBuf);

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("xtask-tidy-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create fixture");
            Self(dir)
        }

        fn file(&self, rel: &str, text: &str) -> &Self {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().expect("parent")).expect("create dirs");
            fs::write(path, text).expect("write fixture file");
            self
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn clean_workspace_passes() {
        let fx = Fixture::new("clean");
        fx.file("crates/store/src/lib.rs", "//! Store.\npub mod users;\n")
            .file(
                "crates/store/src/users.rs",
                "//! Users.\nconst Q: &str = \"SELECT id, email FROM users\";\n",
            )
            .file(
                "bins/api/src/main.rs",
                "fn main() {\n    e2a_api::main();\n}\n",
            )
            .file("bins/api/src/lib.rs", "//! Api.\n")
            .file("xtask/src/main.rs", "fn main() {}\n")
            .file("migrations/V1__init.sql", "CREATE TABLE t (id int);\n")
            .file("migrations/V2__more.sql", "SELECT count(*) FROM t;\n")
            .file("migrations/.gitkeep", "");
        assert_eq!(check(&fx.0), Vec::<Problem>::new());
    }

    #[test]
    fn every_problem_is_listed() {
        let fx = Fixture::new("broken");
        fx.file("crates/store/src/lib.rs", "pub mod users;\n")
            .file(
                "crates/store/src/users.rs",
                "//! Users.\n\nconst Q: &str = \"select u.* from users u\";\n",
            )
            .file("crates/runtime/src/deep/mod.rs", "// no doc\nuse x;\n")
            .file(
                "bins/api/src/main.rs",
                &format!("fn main() {{}}\nfn helper() {{}}\n{}", "\n".repeat(30)),
            )
            .file("xtask/src/tidy.rs", "fn x() {}\n")
            .file("migrations/V1__init.sql", "SELECT * FROM t;\n")
            .file("migrations/V3__gap.sql", "")
            .file("migrations/V3__dup.sql", "")
            .file("migrations/V4__Bad-Name.sql", "")
            .file("migrations/notes.txt", "");
        let found: Vec<String> = check(&fx.0).iter().map(ToString::to_string).collect();
        let expected = [
            "bins/api/src/main.rs: 32 lines",
            "bins/api/src/main.rs:2: `fn helper`",
            "crates/runtime/src/deep/mod.rs:1: missing `//!`",
            "crates/store/src/lib.rs:1: missing `//!`",
            "crates/store/src/users.rs:3: `SELECT *`",
            "migrations: migration V2 is missing",
            "migrations/V1__init.sql:1: `SELECT *`",
            "migrations/V3__dup.sql: duplicate migration version 3",
            "migrations/V3__gap.sql: duplicate migration version 3",
            "migrations/V4__Bad-Name.sql: migration files must be named",
            "migrations/notes.txt: migration files must be named",
            "xtask/src/tidy.rs:1: missing `//!`",
        ];
        for needle in expected {
            assert!(
                found.iter().any(|p| p.starts_with(needle)),
                "{needle:?} not reported; got:\n{}",
                found.join("\n")
            );
        }
        assert_eq!(found.len(), expected.len(), "got:\n{}", found.join("\n"));
    }
}
