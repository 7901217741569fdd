//! Reading config files and pointing at places in them.
//!
//! Every error carries the file, the line and a readable config path. Lines come from the
//! span-preserving `toml_edit` document: a validation error gives the key path of the value at
//! fault (`route[2].backend[1].service`) and [`Sources::line`] walks the document to it.

use std::fmt;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{Array, ArrayOfTables, Document, Item, TableLike, Value};

use crate::raw::RawFile;

/// One error in a config, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error is about the file as a whole.
    pub line: usize,
    /// Readable config path, e.g. `route "web" backend[1]`; empty at top level.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every error found in a config, in file and line order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A step in a key path: a table key or an array index.
#[derive(Debug, Clone)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(k: &str) -> Self {
        Seg::Key(k.to_string())
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

/// Builds a key path: `keys!["route", 2, "backend", 1]`.
macro_rules! keys {
    ($($seg:expr),* $(,)?) => { vec![$($crate::source::Seg::from($seg)),*] };
}
pub(crate) use keys;

/// A parsed config file.
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
    doc: Document<String>,
    /// Byte offset where each line starts, for span -> line without rescanning the text.
    line_starts: Vec<usize>,
}

/// The files of one config, in merge order, with the errors found while reading them.
#[derive(Default)]
pub struct Sources {
    /// The file or directory the config was read from.
    pub root: PathBuf,
    pub files: Vec<SourceFile>,
    pub errors: Vec<ConfigError>,
    /// Files that could not be read or parsed at all.
    pub unparsed: usize,
}

impl Sources {
    /// Reads one file, or every `*.toml` of a directory sorted by name (hidden files skipped,
    /// which also skips the `..data` entries of a Kubernetes ConfigMap mount).
    pub fn read(path: &Path) -> (Sources, Vec<(usize, RawFile)>) {
        let mut sources = Sources {
            root: path.to_path_buf(),
            ..Sources::default()
        };
        let mut raws = Vec::new();
        let paths = match config_files(path) {
            Ok(paths) => paths,
            Err(message) => {
                sources.unparsed += 1;
                sources.errors.push(ConfigError {
                    file: path.to_path_buf(),
                    line: 0,
                    path: String::new(),
                    message,
                });
                return (sources, raws);
            }
        };
        for file in paths {
            match read_regular(&file) {
                Ok(text) => {
                    if let Some(raw) = sources.parse(file, text) {
                        raws.push(raw);
                    }
                }
                Err(e) => {
                    sources.unparsed += 1;
                    sources.errors.push(ConfigError {
                        file,
                        line: 0,
                        path: String::new(),
                        message: format!("cannot read: {e}"),
                    })
                }
            }
        }
        (sources, raws)
    }

    /// Parses one file's text into its file number and raw form; a syntax or type error is
    /// recorded and gives `None`. Unknown keys are recorded too, but the file still counts.
    pub fn parse(&mut self, path: PathBuf, text: String) -> Option<(usize, RawFile)> {
        let doc = match Document::parse(text.clone()) {
            Ok(doc) => doc,
            Err(e) => {
                self.unparsed += 1;
                let line = e.span().map_or(0, |s| line_of(&text, s.start));
                let mut message = first_line(e.message());
                // toml_edit says "duplicate key" alone; its span is the key, or the table.
                let named = e.span().and_then(|s| text.get(s)).map(str::trim);
                if let Some(name) = named.filter(|n| message == "duplicate key" && !n.is_empty()) {
                    message = format!("duplicate key {name:?}");
                }
                self.errors.push(ConfigError {
                    file: path,
                    line,
                    path: String::new(),
                    message,
                });
                return None;
            }
        };
        let mut unknown = Vec::new();
        let de = toml_edit::de::Deserializer::from(doc.clone());
        let raw: Result<RawFile, _> = serde_ignored::deserialize(de, |p| unknown.push(segs(&p)));
        let file = self.files.len();
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        self.files.push(SourceFile {
            path,
            text,
            doc,
            line_starts,
        });
        for key in unknown {
            let name = match key.last() {
                Some(Seg::Key(k)) => k.clone(),
                _ => String::new(),
            };
            let label = self.files[file].label(&key[..key.len().saturating_sub(1)]);
            let err = self.error(file, &key, label, format!("unknown key {name:?}"));
            self.errors.push(err);
        }
        match raw {
            Ok(raw) => Some((file, raw)),
            Err(e) => {
                self.unparsed += 1;
                let f = &self.files[file];
                let span = e.span();
                let line = span.as_ref().map_or(0, |s| line_of(&f.text, s.start));
                // The TOML error gives only the span of the value; its key is found from that.
                let key = span.map_or_else(Vec::new, |s| key_at(f.node(), s.start));
                self.errors.push(ConfigError {
                    file: f.path.clone(),
                    line,
                    path: f.label(&key),
                    message: first_line(e.message()),
                });
                None
            }
        }
    }

    /// An error at `key` of file number `file`.
    /// A missing section of a config that has no file yet is reported against `root`.
    pub fn error(&self, file: usize, key: &[Seg], path: String, message: String) -> ConfigError {
        let (file, line) = match self.files.get(file) {
            Some(f) => (f.path.clone(), f.line(key)),
            None => (self.root.clone(), 0),
        };
        ConfigError {
            file,
            line,
            path,
            message,
        }
    }

    /// "a.toml:3", for messages that point at a second place.
    pub fn place(&self, file: usize, key: &[Seg]) -> String {
        match self.files.get(file) {
            Some(f) => format!("{}:{}", f.path.display(), f.line(key)),
            None => self.root.display().to_string(),
        }
    }
}

impl SourceFile {
    /// The line of the deepest part of `key` that exists in the file (1-based, 0 if none).
    fn line(&self, key: &[Seg]) -> usize {
        let mut node = self.node();
        let mut at = None;
        for seg in key {
            let next = match (seg, node) {
                (Seg::Key(k), Node::Table(t)) => t.get_key_value(k).map(|(key, item)| {
                    at = key.span().or_else(|| item.span()).or(at.clone());
                    Node::of_item(item)
                }),
                (Seg::Index(i), Node::Tables(a)) => a.get(*i).map(|t| {
                    at = t.span().or(at.clone());
                    Node::Table(t)
                }),
                (Seg::Index(i), Node::Values(a)) => a.get(*i).map(|v| {
                    at = v.span().or(at.clone());
                    Node::of_value(v)
                }),
                _ => None,
            };
            match next {
                Some(next) => node = next,
                None => break,
            }
        }
        at.map_or(0, |span| {
            self.line_starts
                .partition_point(|&start| start <= span.start)
        })
    }
}

/// A place in a parsed document, borrowed.
#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a dyn TableLike),
    Tables(&'a ArrayOfTables),
    Values(&'a Array),
    Leaf,
}

impl<'a> Node<'a> {
    fn of_item(item: &'a Item) -> Node<'a> {
        match item {
            Item::Table(t) => Node::Table(t),
            Item::ArrayOfTables(a) => Node::Tables(a),
            Item::Value(v) => Node::of_value(v),
            Item::None => Node::Leaf,
        }
    }

    fn of_value(value: &'a Value) -> Node<'a> {
        match value {
            Value::InlineTable(t) => Node::Table(t),
            Value::Array(a) => Node::Values(a),
            _ => Node::Leaf,
        }
    }
}

fn config_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = fs::read_dir(path)
        .map_err(|e| format!("cannot list directory: {e}"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // Not `is_file`: a dangling link or a directory named so is an error, not skipped.
            !name.starts_with('.') && name.ends_with(".toml")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err("no *.toml files in this directory".into());
    }
    Ok(files)
}

/// A config file's text. Only a regular file (or a link to one) is read: a FIFO or a device
/// would never end, and the load would hang with it.
fn read_regular(file: &Path) -> std::io::Result<String> {
    match fs::metadata(file)?.is_file() {
        true => fs::read_to_string(file),
        false => Err(std::io::Error::other("not a regular file")),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

/// `serde_ignored`'s path as key segments.
fn segs(path: &serde_ignored::Path<'_>) -> Vec<Seg> {
    use serde_ignored::Path as P;
    let mut out = match path {
        P::Root => return Vec::new(),
        P::Seq { parent, .. }
        | P::Map { parent, .. }
        | P::Some { parent }
        | P::NewtypeStruct { parent }
        | P::NewtypeVariant { parent } => segs(parent),
    };
    match path {
        P::Seq { index, .. } => out.push(Seg::Index(*index)),
        P::Map { key, .. } => out.push(Seg::Key(key.clone())),
        _ => {}
    }
    out
}

/// The key path of the innermost value whose text holds byte `offset` (empty if none).
fn key_at(node: Node<'_>, offset: usize) -> Vec<Seg> {
    let children: Vec<(Seg, Node<'_>, Option<Range<usize>>)> = match node {
        Node::Table(t) => t
            .iter()
            .map(|(k, item)| (Seg::Key(k.to_string()), Node::of_item(item), item.span()))
            .collect(),
        Node::Tables(a) => a
            .iter()
            .enumerate()
            .map(|(i, t)| (Seg::Index(i), Node::Table(t), None))
            .collect(),
        Node::Values(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (Seg::Index(i), Node::of_value(v), v.span()))
            .collect(),
        Node::Leaf => Vec::new(),
    };
    for (seg, child, span) in children {
        let mut inner = key_at(child, offset);
        if !inner.is_empty() || span.is_some_and(|s| s.contains(&offset)) {
            inner.insert(0, seg);
            return inner;
        }
    }
    Vec::new()
}

impl SourceFile {
    fn node(&self) -> Node<'_> {
        Node::Table(self.doc.as_table())
    }

    /// A key path as people read it, naming routes, services and listeners by their names:
    /// `route "web" backend[1]`.
    fn label(&self, key: &[Seg]) -> String {
        let name = match key {
            [Seg::Key(kind), Seg::Index(i), ..]
                if matches!(kind.as_str(), "route" | "service" | "listener") =>
            {
                self.doc
                    .get(kind)
                    .and_then(Item::as_array_of_tables)
                    .and_then(|tables| tables.get(*i))
                    .and_then(|t| t.get("name"))
                    .and_then(Item::as_str)
                    .map(str::to_string)
            }
            // A value directly in a section, such as `[runtime] threads`.
            [Seg::Key(section), Seg::Key(leaf)]
                if !self
                    .doc
                    .get(section)
                    .and_then(|t| t.get(leaf))
                    .is_some_and(Item::is_table_like) =>
            {
                return format!("[{section}] {leaf}");
            }
            _ => None,
        };
        label_named(name, key)
    }
}

fn label_named(name: Option<String>, key: &[Seg]) -> String {
    match (name, key) {
        (Some(name), [Seg::Key(kind), _]) => {
            format!("{kind} {name:?}")
        }
        (Some(name), [Seg::Key(kind), _, rest @ ..]) => {
            format!("{kind} {name:?} {}", readable(rest))
        }
        (None, [Seg::Key(section)]) => format!("[{section}]"),
        // A table of a table, such as [telemetry.tracing].
        (None, [Seg::Key(_), Seg::Key(_)]) => format!("[{}]", readable(key)),
        _ => readable(key),
    }
}

/// A key path as people read it: `route[2].backend[1]`.
pub fn readable(key: &[Seg]) -> String {
    let mut out = String::new();
    for seg in key {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}
