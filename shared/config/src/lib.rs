//! weir-config: the config language of Weir (DESIGN.md §3).
//!
//! `load` reads a file or a directory of `*.toml` files, checks everything and returns either
//! a validated [`Config`] or every error found, each naming its file, line and config path.
//! Compiling the config into runtime tables is the job of `weir-routing` and `weir-proxy`.

pub mod duration;
mod model;
pub mod raw;
mod source;
mod validate;
mod watch;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

pub use model::*;
pub use source::{ConfigError, ConfigErrors};
pub use watch::{watch, Watcher};

/// A validated config with where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// What `/config` and `weir_config_info` show: the hash of the contents, or the Git commit
    /// the files were checked out at.
    pub revision: String,
    /// Hash of the config's and its certificate files' contents: the same files give the same
    /// hash, whatever the revision says (a certificate rotated under one commit).
    pub contents: String,
    /// The files read, in merge order.
    pub files: Vec<PathBuf>,
    /// The certificate, key and CA files the config names (watched like the config).
    pub material: Vec<PathBuf>,
}

/// Loads, merges and validates the config at `path` (a file or a directory).
pub fn load(path: &Path, role: Role) -> Result<Loaded, ConfigErrors> {
    let (sources, raws) = source::Sources::read(path);
    finish(sources, raws, role)
}

/// Validates config text as if read from a file named `name` (for tests and tools).
pub fn parse(name: &str, text: &str, role: Role) -> Result<Loaded, ConfigErrors> {
    let mut sources = source::Sources {
        root: PathBuf::from(name),
        ..Default::default()
    };
    let raws = sources
        .parse(PathBuf::from(name), text.to_string())
        .into_iter()
        .collect();
    finish(sources, raws, role)
}

fn finish(
    sources: source::Sources,
    raws: Vec<(usize, raw::RawFile)>,
    role: Role,
) -> Result<Loaded, ConfigErrors> {
    let mut errors = sources.errors.clone();
    // With a file unreadable, references into it would be reported as dangling: report only
    // what is wrong with the files themselves.
    let validated = if sources.unparsed > 0 {
        None
    } else {
        match validate::validate(&sources, raws, role) {
            Ok(validated) if errors.is_empty() => Some(validated),
            Ok(_) => None,
            Err(more) => {
                errors.extend(more);
                None
            }
        }
    };
    match validated {
        Some((config, material)) => {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            for f in &sources.files {
                f.path.hash(&mut hasher);
                f.text.hash(&mut hasher);
            }
            for (path, bytes) in &material {
                path.hash(&mut hasher);
                bytes.hash(&mut hasher);
            }
            let contents = format!("{:016x}", hasher.finish());
            Ok(Loaded {
                config,
                revision: contents.clone(),
                contents,
                files: sources.files.iter().map(|f| f.path.clone()).collect(),
                material: material.into_iter().map(|(path, _)| path).collect(),
            })
        }
        None => {
            errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
            Err(ConfigErrors(errors))
        }
    }
}
