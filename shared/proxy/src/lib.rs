//! weir-proxy: the proxy both Weir binaries run.
//!
//! - [`alloc`]: the global allocator (mimalloc) of every Weir binary;
//! - [`snapshot`]: the compiled config a request reads, one `Arc` per generation;
//! - [`reload`]: load -> validate -> compile -> swap, keeping the last good config;
//! - [`git`]: config from a Git repository, a checkout per commit;
//! - [`proxy`]: the Pingora `ProxyHttp`, where errors become statuses and flags;
//! - [`tls`]: https listeners (certificates by SNI, client certificates, the peer's identity)
//!   and TLS to services;
//! - `proxy_protocol`: the PROXY header a load balancer in front puts before a connection;
//! - [`capture`]: the sidecar behind iptables: the rules, and calls no route takes;
//! - `stream`: `tcp` and `tls` (passthrough) listeners, bytes forwarded to a route's backends;
//! - [`mirror`]: fire-and-forget copies of requests to a shadow service;
//! - [`pipeline`]: reading pipelined HTTP/1.1 answers, for the mirror's copies;
//! - [`discovery`]: per-service background work: active health checks, DNS re-resolution;
//! - [`admin`]: `/live`, `/ready`, `/config`, `/metrics`, `/endpoints`, `POST /shutdown`;
//! - [`server`]: wiring of the Pingora server, reload triggers (files, SIGHUP, Git polls) and
//!   the drain;
//! - [`cli`]: the command line of both binaries.

pub mod admin;
pub mod alloc;
pub mod capture;
pub mod cli;
mod connection;
pub mod discovery;
pub mod git;
pub mod mirror;
pub mod pipeline;
pub mod proxy;
mod proxy_protocol;
pub mod reload;
pub mod server;
pub mod snapshot;
mod stream;
pub mod tls;

/// The directory of this user's upgrade sockets and Git checkouts: `$TMPDIR/weir-<uid>`. Made
/// (mode 0700) only by what uses it, `--upgrade` and `--config-git`, so a plain start needs no
/// writable `$TMPDIR` (a read-only root filesystem).
pub fn private_dir_path() -> std::path::PathBuf {
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    std::env::temp_dir().join(format!("weir-{uid}"))
}

/// [`private_dir_path`], made if missing, and checked to be this user's alone, as tmux checks
/// its socket directory. In a shared `/tmp` another user could otherwise bind the upgrade
/// socket first (and be handed the listening sockets) or plant a checkout directory Weir
/// would read config from.
pub fn private_dir() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    use std::os::unix::fs::DirBuilderExt;
    let dir = private_dir_path();
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(e).with_context(|| {
                format!(
                    "creating {}, for upgrade sockets and Git checkouts (TMPDIR picks where)",
                    dir.display()
                )
            });
        }
        _ => {}
    }
    check_private_dir(&dir)?;
    Ok(dir)
}

/// That `dir` is a directory of this user's alone (mode 0700), not a link.
pub fn check_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).with_context(|| dir.display().to_string())?;
    #[allow(unsafe_code)]
    // SAFETY: as above.
    let uid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        anyhow::bail!(
            "{} is not a directory of this user's alone (mode 0700): remove it, or set TMPDIR",
            dir.display()
        );
    }
    Ok(())
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(|| QuietStderr)
        .try_init();
}

/// Standard error that never fails. With no one left reading it (a closed pipe), log lines are
/// dropped; given the error, tracing-subscriber reports it with `eprintln!`, which panics on
/// that same closed stderr and took the process down.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
