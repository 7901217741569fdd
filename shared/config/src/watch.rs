//! Watching a config file or directory for changes.
//!
//! The parent directory is watched, not the file: editors save by writing a temporary file and
//! renaming it over the old one, and Kubernetes swaps a ConfigMap by re-pointing the `..data`
//! symlink, and neither is seen by a watch on the old file's inode. A config directory is
//! watched itself and in its parent, for when it is replaced whole. Events arrive in bursts;
//! the caller debounces them (weir-proxy does, on its control task, with no thread of its own).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};

/// Keeps the watch alive; dropping it stops watching.
pub struct Watcher {
    _inner: RecommendedWatcher,
}

/// Calls `on_change`, on notify's thread, for every event that may change the config at `path`
/// (if given) or one of the `material` files it names (certificates, keys, CAs).
pub fn watch(
    path: Option<&Path>,
    material: &[PathBuf],
    on_change: impl Fn() + Send + 'static,
) -> notify::Result<Watcher> {
    // Per directory, the names that count there; `None`: every `*.toml` (a config directory).
    let mut dirs: Vec<(PathBuf, Option<Vec<OsString>>)> = Vec::new();
    let mut add = |file: &Path, is_dir: bool| {
        let (dir, name) = if is_dir {
            (file.to_path_buf(), None)
        } else {
            let dir = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            // `conf/../certs` is `certs`: it must not stop being watchable while `conf` is
            // away (a config directory replaced by two renames).
            let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| without_dot_dot(&dir));
            (dir, file.file_name().map(|n| n.to_os_string()))
        };
        match dirs.iter_mut().find(|(d, _)| *d == dir) {
            Some((_, Some(names))) => names.extend(name),
            Some((_, None)) => {}
            None => dirs.push((dir, name.map(|n| vec![n]))),
        }
    };
    // A link is watched where it is and where it points: an edit of its target changes the
    // config too.
    let mut watched: Vec<(PathBuf, bool)> = Vec::new();
    for (file, is_dir) in path
        .map(|p| (p, p.is_dir()))
        .into_iter()
        .chain(material.iter().map(|f| (f.as_path(), false)))
    {
        watched.push((file.to_path_buf(), is_dir));
        let link = std::fs::symlink_metadata(file).is_ok_and(|m| m.file_type().is_symlink());
        if let Some(target) = link.then(|| std::fs::canonicalize(file).ok()).flatten() {
            watched.push((target, is_dir));
        }
    }
    for (file, is_dir) in &watched {
        add(file, *is_dir);
        // A config directory replaced whole, or its link re-pointed, shows in its parent.
        if *is_dir {
            add(file, false);
        }
    }
    let filters = dirs.clone();
    let mut inner = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        // By name only: an event that names a watched file in another watched directory
        // costs a reload that finds the config unchanged.
        let concerns = |p: &PathBuf| {
            filters
                .iter()
                .any(|(_, names)| concerns_config(p, names.as_deref()))
        };
        if event.paths.iter().any(concerns) {
            on_change();
        }
    })?;
    // A directory that cannot be watched now (gone for a moment) leaves the others watched;
    // the watch is made anew after every reload.
    let mut failed = None;
    let mut watching = 0;
    for (dir, _) in &dirs {
        match inner.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => watching += 1,
            Err(e) => {
                tracing::warn!("cannot watch {}: {e}; watching the rest", dir.display());
                failed.get_or_insert(e);
            }
        }
    }
    match (watching, failed) {
        (0, Some(e)) => Err(e),
        _ => Ok(Watcher { _inner: inner }),
    }
}

/// `path` with each `dir/..` taken out, as the config's relative paths mean it.
fn without_dot_dot(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            part => out.push(part),
        }
    }
    out
}

/// A change to `path` may change the config: it is one of the watched `files` (or, for a
/// config directory, a `*.toml` file), or a ConfigMap's or Secret's `..data` link.
fn concerns_config(path: &Path, files: Option<&[OsString]>) -> bool {
    let Some(name) = path.file_name() else {
        return false;
    };
    let text = name.to_string_lossy();
    if text.starts_with("..data") {
        return true;
    }
    match files {
        Some(files) => files.iter().any(|f| f == name),
        None => text.ends_with(".toml") && !text.starts_with('.'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_config_files_count() {
        let names = [OsString::from("gateway.toml")];
        let file = Some(&names[..]);
        assert!(concerns_config(Path::new("/c/gateway.toml"), file));
        assert!(concerns_config(Path::new("/c/..data"), file));
        assert!(concerns_config(Path::new("/c/..data_tmp"), file));
        assert!(!concerns_config(Path::new("/c/access.log"), file));
        assert!(!concerns_config(Path::new("/c/.gateway.toml.swp"), file));
        assert!(concerns_config(Path::new("/c/routes.toml"), None));
        assert!(!concerns_config(Path::new("/c/.routes.toml.tmp"), None));
        assert!(!concerns_config(Path::new("/c/notes.txt"), None));
    }
}
