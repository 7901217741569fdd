//! Watching a config file or directory for changes.
//!
//! The parent directory is watched, not the file: editors save by writing a temporary file and
//! renaming it over the old one, and Kubernetes swaps a ConfigMap by re-pointing the `..data`
//! symlink, and neither is seen by a watch on the old file's inode. Events arrive in bursts;
//! the caller debounces them (weir-proxy does, on its control task, with no thread of its own).

use std::path::Path;

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};

/// Keeps the watch alive; dropping it stops watching.
pub struct Watcher {
    _inner: RecommendedWatcher,
}

/// Calls `on_change`, on notify's thread, for every event that may change the config at `path`.
pub fn watch(path: &Path, on_change: impl Fn() + Send + 'static) -> notify::Result<Watcher> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        }
    };
    // Only the config itself counts, not logs or editor swap files in the same directory.
    let file_name = (!path.is_dir())
        .then(|| path.file_name().map(|n| n.to_os_string()))
        .flatten();
    let mut inner = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| concerns_config(p, file_name.as_deref()))
        {
            on_change();
        }
    })?;
    inner.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(Watcher { _inner: inner })
}

/// A change to `path` may change the config: it is the config file (or, for a directory, a
/// `*.toml` file), or a ConfigMap's `..data` link.
fn concerns_config(path: &Path, file_name: Option<&std::ffi::OsStr>) -> bool {
    let Some(name) = path.file_name() else {
        return false;
    };
    let text = name.to_string_lossy();
    if text.starts_with("..data") {
        return true;
    }
    match file_name {
        Some(file) => name == file,
        None => text.ends_with(".toml") && !text.starts_with('.'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_config_files_count() {
        let file = Some(std::ffi::OsStr::new("gateway.toml"));
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
