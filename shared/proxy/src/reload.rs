//! Hot reload: load -> validate -> compile -> swap, keeping the old snapshot on any error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tracing::{error, info, warn};
use weir_config::{ConfigErrors, Role};

use crate::snapshot::Snapshot;

/// Owns the current snapshot and replaces it on reload.
pub struct Reloader {
    path: PathBuf,
    role: Role,
    current: ArcSwap<Snapshot>,
    /// Every error of the last failed reload, cleared by a good one. Admin only, never on
    /// the request path.
    last_error: Mutex<Option<String>>,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The files are byte for byte what is serving: nothing to do.
    Unchanged,
    Applied {
        generation: u64,
    },
    Failed,
}

impl Reloader {
    /// Loads the config for the first time.
    pub fn new(path: &Path, role: Role) -> Result<Reloader, ConfigErrors> {
        let loaded = weir_config::load(path, role)?;
        let snapshot = Snapshot::compile(loaded, role, 1, None);
        Ok(Reloader {
            path: path.to_path_buf(),
            role,
            current: ArcSwap::from_pointee(snapshot),
            last_error: Mutex::new(None),
        })
    }

    /// The snapshot a new request should use from start to end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reloads from the source. Reloads are serialized by the error lock, so two triggers
    /// (a file event and SIGHUP) never race to swap.
    pub fn reload(&self) -> Outcome {
        let mut last_error = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot();
        let loaded = match weir_config::load(&self.path, self.role) {
            Ok(loaded) => loaded,
            Err(errors) => {
                for e in &errors.0 {
                    error!(file = %e.file.display(), line = e.line, "config error: {}", e);
                }
                error!(
                    errors = errors.0.len(),
                    generation = old.generation,
                    "reload failed; still serving the last good config"
                );
                *last_error = Some(errors.to_string());
                return Outcome::Failed;
            }
        };
        if loaded.revision == old.revision {
            *last_error = None;
            return Outcome::Unchanged;
        }
        if loaded
            .config
            .listeners
            .iter()
            .map(|l| (&l.name, l.listen))
            .ne(old.config.listeners.iter().map(|l| (&l.name, l.listen)))
        {
            warn!("listener changes take effect at the next restart or upgrade; routes and services are reloaded now");
        }
        let generation = old.generation + 1;
        let snapshot = Snapshot::compile(loaded, self.role, generation, Some(&old));
        info!(generation, revision = %snapshot.revision, "config reloaded");
        self.current.store(Arc::new(snapshot));
        *last_error = None;
        Outcome::Applied { generation }
    }

    /// The body of admin `/config`.
    pub fn status(&self) -> serde_json::Value {
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let s = self.snapshot();
        serde_json::json!({
            "generation": s.generation,
            "revision": s.revision,
            "source": self.path.display().to_string(),
            "loaded_at": s.loaded_at,
            "last_error": last_error,
            "config": *s.config,
        })
    }
}
