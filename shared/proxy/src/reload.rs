//! Hot reload: load -> validate -> compile -> swap, keeping the old snapshot on any error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tracing::{error, info};
use weir_config::{Config, ConfigErrors, Role};

use crate::snapshot::Snapshot;

/// Gives the memory freed since the last call back to the system. Parsing a config takes
/// several times the memory of its result (a span-preserving TOML document, 200 MiB at 10,000
/// routes), and the allocator would otherwise keep those pages for a load that may never come.
#[allow(unsafe_code)]
fn return_free_memory() {
    // SAFETY: mi_collect has no preconditions; it frees and purges only what is unused. It
    // is harmless when mimalloc is not the global allocator (its own heaps are then empty).
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Owns the current snapshot and replaces it on reload.
pub struct Reloader {
    path: PathBuf,
    role: Role,
    /// What admin `/config` and `weir_config_info` name as the source: the path, or the Git
    /// repository the files at `path` come from.
    source: String,
    /// The Git commit checked out at `path`, which is then the revision; `None` for plain
    /// files, whose revision is a hash of their contents.
    commit: Mutex<Option<String>>,
    /// With Git, the checkout's directory, which errors name as `<commit>:` instead (a
    /// temporary path means nothing to whoever reads `/config`).
    checkout: Option<String>,
    current: ArcSwap<Snapshot>,
    /// Every error of the last failed reload, cleared by a good one. Admin only, never on
    /// the request path.
    last_error: Mutex<Option<String>>,
    /// With Git, the errors of the refused commit at the ref's head, shown until the ref moves:
    /// a good reload meanwhile (a certificate rotated) is one of the commit serving.
    refused: Mutex<Option<String>>,
    /// Held for a whole reload, so a file event and SIGHUP never race to swap.
    reloading: Mutex<()>,
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
        Reloader::from_source(path, role, path.display().to_string(), None)
    }

    /// Loads the config for the first time from files at `path` that come from `source`, at
    /// Git `commit` of the checkout in `checkout` if they are one.
    pub fn from_source(
        path: &Path,
        role: Role,
        source: String,
        git: Option<(&Path, String)>,
    ) -> Result<Reloader, ConfigErrors> {
        let (checkout, commit) = match git {
            Some((dir, commit)) => (Some(format!("{}/", dir.display())), Some(commit)),
            None => (None, None),
        };
        let mut loaded = weir_config::load(path, role)?;
        if let Some(commit) = &commit {
            loaded.revision.clone_from(commit);
        }
        let snapshot = Snapshot::compile(loaded, role, 1, None);
        return_free_memory();
        applied(&source, &snapshot);
        Ok(Reloader {
            path: path.to_path_buf(),
            role,
            source,
            commit: Mutex::new(commit),
            checkout,
            current: ArcSwap::from_pointee(snapshot),
            last_error: Mutex::new(None),
            refused: Mutex::new(None),
            reloading: Mutex::new(()),
        })
    }

    /// The snapshot a new request should use from start to end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The path, or the Git repository, ref and path, as `/config` names it.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The Git commit now checked out at `path`, for the next reload.
    pub fn set_commit(&self, commit: String) {
        *self.commit.lock().unwrap_or_else(|e| e.into_inner()) = Some(commit);
    }

    /// Reloads from the source; on any error the old snapshot keeps serving.
    pub fn reload(&self) -> Outcome {
        let outcome = self.load_and_swap();
        return_free_memory();
        outcome
    }

    fn load_and_swap(&self) -> Outcome {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot();
        let mut loaded = match weir_config::load(&self.path, self.role) {
            Ok(loaded) => loaded,
            Err(errors) => {
                for e in &errors.0 {
                    error!("config error: {}", self.shown(e.to_string()));
                }
                self.fail(old.generation, self.shown(errors.to_string()));
                return Outcome::Failed;
            }
        };
        if let Some(commit) = &*self.commit.lock().unwrap_or_else(|e| e.into_inner()) {
            loaded.revision.clone_from(commit);
        }
        if loaded.revision == old.revision && loaded.contents == old.contents {
            self.set_error(None);
            return Outcome::Unchanged;
        }
        if let Some(change) = start_only_change(&old.config, &loaded.config) {
            let message = format!(
                "{change}; it applies only at start: restart (or upgrade) to apply it. \
                 Nothing of this change was applied."
            );
            error!("{message}");
            self.fail(old.generation, message);
            return Outcome::Failed;
        }
        // The same listeners, maybe declared in another order: each is served by its place
        // in the list (its certificates, its limits), so they keep the places they started in.
        let place = |name: &str| (old.config.listeners.iter()).position(|l| l.name == name);
        loaded.config.listeners.sort_by_key(|l| place(&l.name));
        let generation = old.generation + 1;
        let snapshot = Snapshot::compile(loaded, self.role, generation, Some(&old));
        info!(generation, revision = %snapshot.revision, "config reloaded");
        applied(&self.source, &snapshot);
        let metrics = weir_telemetry::metrics();
        metrics.config_reloads.with_label_values(&["success"]).inc();
        self.current.store(Arc::new(snapshot));
        self.set_error(None);
        Outcome::Applied { generation }
    }

    /// `text` with the Git checkout's files named `<commit>:<path in the repository>`.
    fn shown(&self, text: String) -> String {
        let Some(checkout) = &self.checkout else {
            return text;
        };
        let commit = self
            .commit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let commit = commit.unwrap_or_default();
        text.replace(checkout, &format!("{}:", &commit[..commit.len().min(12)]))
    }

    fn fail(&self, generation: u64, message: String) {
        weir_telemetry::metrics()
            .config_reloads
            .with_label_values(&["failure"])
            .inc();
        error!(
            generation,
            "reload failed; still serving the last good config"
        );
        self.set_error(Some(message));
    }

    fn set_error(&self, error: Option<String>) {
        *locked(&self.last_error) = error;
    }

    /// With Git, after the reload of a fetched commit: whether it was refused, so that its
    /// errors stay in `/config` until the ref moves.
    pub fn set_refused(&self, refused: bool) {
        let errors = refused.then(|| locked(&self.last_error).clone()).flatten();
        *locked(&self.refused) = errors;
    }

    /// The body of admin `/config`.
    pub fn status(&self) -> serde_json::Value {
        let last_error = locked(&self.last_error).clone();
        let last_error = last_error.or_else(|| locked(&self.refused).clone());
        let s = self.snapshot();
        serde_json::json!({
            "generation": s.generation,
            "revision": s.revision,
            "source": self.source,
            "loaded_at": s.loaded_at,
            "last_error": last_error,
            "config": *s.config,
        })
    }
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the metrics that describe the serving config.
fn applied(source: &str, snapshot: &Snapshot) {
    let metrics = weir_telemetry::metrics();
    metrics.config_applied(source, &snapshot.revision, snapshot.generation);
    let expiries = crate::tls::expiries(&snapshot.config);
    metrics.certificates_applied(expiries.iter().map(|(cert, at)| (cert.as_str(), *at)));
}

/// The first section that a reload cannot apply because the process reads it at start only.
fn start_only_change(old: &Config, new: &Config) -> Option<String> {
    use serde_json::Value;
    fn json<T: serde::Serialize>(value: &T) -> Value {
        serde_json::to_value(value).unwrap_or_default()
    }
    /// "`what` `key` changed", for the first key (nested keys too) whose value differs, with
    /// the values when `shown` (not for sections that may hold a collector's credentials).
    fn changed(what: &str, old: &Value, new: &Value, shown: bool) -> Option<String> {
        if old == new {
            return None;
        }
        if let (Some(o), Some(n)) = (old.as_object(), new.as_object()) {
            let key = o.keys().chain(n.keys()).find(|k| o.get(*k) != n.get(*k))?;
            let at = |v: &serde_json::Map<String, Value>| v.get(key).cloned().unwrap_or_default();
            return changed(&format!("{what} {key}"), &at(o), &at(n), shown);
        }
        Some(match shown {
            true => format!("{what} changed ({old} -> {new})"),
            false => format!("{what} changed"),
        })
    }
    // A listener's certificates and client CA are read at each handshake, so they reload;
    // its socket, protocol (plaintext too, for the sidecar's permissive mTLS) and idle timeout
    // (Pingora's HTTP/2 server takes it at start) do not.
    // By name: the order listeners are declared in (or files merged in) changes nothing.
    let sockets = |c: &Config| -> std::collections::BTreeMap<String, Value> {
        (c.listeners.iter())
            .map(|l| {
                let plaintext = l.tls.as_ref().is_some_and(|t| t.also_plaintext);
                let all = json(l);
                let mut socket = serde_json::Map::new();
                for key in ["listen", "protocol", "idle_timeout", "proxy_protocol"] {
                    socket.insert(key.into(), all[key].clone());
                }
                // The sidecar's mtls = "permissive".
                socket.insert("plaintext too".into(), plaintext.into());
                (l.name.clone(), Value::Object(socket))
            })
            .collect()
    };
    let (before, after) = (sockets(old), sockets(new));
    // The sidecar's listeners are its [inbound] and [outbound] sections.
    let named = |name: &str| match new.sidecar {
        Some(_) => format!("[{name}]"),
        None => format!("listener {name:?}"),
    };
    let listener = (before.keys().chain(after.keys())).find_map(|name| {
        match (before.get(name), after.get(name)) {
            (Some(_), None) => Some(format!("{} gone", named(name))),
            (None, Some(_)) => Some(format!("{} added", named(name))),
            (Some(o), Some(n)) => changed(&named(name), o, n, true),
            (None, None) => None,
        }
    });
    listener
        .or_else(|| changed("[runtime]", &json(&old.runtime), &json(&new.runtime), true))
        .or_else(|| changed("[admin]", &json(&old.admin), &json(&new.admin), true))
        .or_else(|| {
            changed(
                "[telemetry]",
                &json(&old.telemetry),
                &json(&new.telemetry),
                false,
            )
        })
}
