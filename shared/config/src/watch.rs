//! Watching a config file or directory for changes.
//!
//! The parent directory is watched, not the file: editors save by writing a temporary file and
//! renaming it over the old one, and Kubernetes swaps a ConfigMap by re-pointing the `..data`
//! symlink, and neither is seen by a watch on the old file's inode. Events arrive in bursts,
//! so they are debounced: the callback runs once the directory has been quiet for `quiet`.

use std::path::Path;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};

/// Keeps the watch alive; dropping it stops watching.
pub struct Watcher {
    _inner: RecommendedWatcher,
}

/// Calls `on_change` (on a thread of its own) after changes to `path`, debounced by `quiet`.
pub fn watch(
    path: &Path,
    quiet: Duration,
    on_change: impl Fn() + Send + 'static,
) -> notify::Result<Watcher> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        }
    };
    let (tx, rx) = channel::<()>();
    let mut inner = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let is_read = matches!(&event, Ok(e) if matches!(e.kind, notify::EventKind::Access(_)));
        if !is_read {
            let _ = tx.send(());
        }
    })?;
    inner.watch(&dir, RecursiveMode::NonRecursive)?;
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            // Ends when the watcher, and with it the sender, is dropped.
            while rx.recv().is_ok() {
                loop {
                    match rx.recv_timeout(quiet) {
                        Ok(()) => continue,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                on_change();
            }
        })
        .map_err(|e| notify::Error::io(e))?;
    Ok(Watcher { _inner: inner })
}
