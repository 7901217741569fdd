//! Config from a Git repository (DESIGN.md §6 `--config-git`), through the `git` command.
//!
//! Each commit of the ref is checked out into a directory of its own, and `current` (a
//! symlink) is renamed onto it, so a reload never reads half a checkout; the reload then reads
//! `current/<git-path>` like any config directory or file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// How long one git command may take: the poll period, within these bounds. A config
/// repository is small: a fetch that takes longer has a server that stopped answering, and it
/// is killed so that polls, SIGHUP, certificate rotations and the drain go on.
const GIT_TIMEOUT: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(30));

pub struct GitSource {
    url: String,
    /// `url` as logs, `/config` and `weir_config_info` show it: without credentials.
    shown_url: String,
    /// The user and password (or token) `url` carries, never shown.
    credentials: Option<String>,
    git_ref: String,
    path: PathBuf,
    /// How often the control task calls [`GitSource::sync`].
    pub poll: Duration,
    /// Holds `repo/` (a bare repository, one commit deep), `<commit>/` checkouts and `current`.
    root: PathBuf,
    commits: Mutex<Commits>,
}

/// The commits of the ref this source has seen.
#[derive(Default)]
struct Commits {
    /// The one the serving config was loaded from.
    serving: String,
    /// The one `current` points at: `serving`, or a newer one whose reload is under way.
    current: String,
    /// The last one whose config the reload refused: not checked out again while the ref stays
    /// at it, but for SIGHUP (a file it names may have come since).
    refused: String,
}

impl GitSource {
    /// Whether `path` is in one of this source's checkouts.
    pub fn holds(&self, path: &std::path::Path) -> bool {
        path.starts_with(&self.root)
    }

    /// Fetches `git_ref` of `url` into a fresh directory under `root` and checks it out.
    pub fn fetch_first(
        url: &str,
        git_ref: &str,
        path: &Path,
        poll: Duration,
        root: &Path,
    ) -> anyhow::Result<GitSource> {
        if root.exists() {
            std::fs::remove_dir_all(root)
                .with_context(|| format!("clearing {}", root.display()))?;
        }
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let source = GitSource {
            url: url.to_string(),
            shown_url: without_credentials(url),
            credentials: credentials(url).map(str::to_string),
            git_ref: git_ref.to_string(),
            path: path.to_path_buf(),
            poll,
            root: root.to_path_buf(),
            commits: Mutex::default(),
        };
        let first = source.git(root, &["init", "--quiet", "--bare", "repo"]);
        match first.and_then(|_| source.sync(false)) {
            Ok(commit) => {
                source.settle(&commit.unwrap_or_default(), true);
                Ok(source)
            }
            Err(e) => {
                source.remove_checkout();
                Err(e)
            }
        }
    }

    /// Where the config is: `current/<git-path>` of the checkout.
    pub fn config_path(&self) -> PathBuf {
        // `--git-path .` (the default) is the checkout itself, so errors read
        // `<commit>:gateway.toml:3`, not `<commit>:./gateway.toml:3`.
        match self.path.as_os_str() == "." {
            true => self.checkout(),
            false => self.checkout().join(&self.path),
        }
    }

    /// The checkout of the commit being loaded (`current`).
    pub fn checkout(&self) -> PathBuf {
        self.root.join("current")
    }

    /// What admin `/config` names as the source.
    pub fn describe(&self) -> String {
        format!(
            "{} {} {}",
            self.shown_url,
            self.git_ref,
            self.path.display()
        )
    }

    /// The commit the serving config was loaded from.
    pub fn commit(&self) -> String {
        self.commits().serving.clone()
    }

    fn commits(&self) -> std::sync::MutexGuard<'_, Commits> {
        self.commits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes the repository and checkouts, when the process ends.
    pub fn remove_checkout(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }

    /// Fetches the ref; when it moved, checks the new commit out, swaps it in and returns it,
    /// for a reload and then [`GitSource::settle`]. A refused commit is tried `again` only when
    /// asked (SIGHUP); a ref moved back from one to the commit serving returns that commit,
    /// whose reload clears the refusal. On an error (the server is down or does not answer,
    /// the ref is gone) the checkout in place is kept.
    pub fn sync(&self, again: bool) -> anyhow::Result<Option<String>> {
        let repo = self.root.join("repo");
        let fetch = [
            "fetch",
            "--quiet",
            "--depth=1",
            "--no-tags",
            // A URL or ref that starts with `-` (`--upload-pack=...`) is no option.
            "--end-of-options",
            &self.url,
            &self.git_ref,
        ];
        self.git(&repo, &fetch)
            .with_context(|| format!("fetching {} {}", self.shown_url, self.git_ref))?;
        let commit = self.git(&repo, &["rev-parse", "FETCH_HEAD^{commit}"])?;
        let mut commits = self.commits();
        if commit == commits.refused && !again {
            return Ok(None);
        }
        // Any other commit puts the refused one behind: if the ref comes back to it, it is
        // tried and refused again, with its errors.
        let back = !std::mem::take(&mut commits.refused).is_empty();
        if commit == commits.current {
            return Ok(back.then_some(commit));
        }
        let tree = self.root.join(&commit);
        if tree.exists() {
            std::fs::remove_dir_all(&tree)?;
        }
        std::fs::create_dir(&tree)?;
        let work_tree = format!("--work-tree={}", tree.display());
        self.git(
            &repo,
            &[
                &work_tree, "checkout", "--quiet", "--force", &commit, "--", ".",
            ],
        )
        .with_context(|| format!("checking out {commit}"))?;
        self.point_current_at(&commit)?;
        commits.current.clone_from(&commit);
        Ok(Some(commit))
    }

    /// After the reload of `commit` (from [`GitSource::sync`]): when it was `applied`, the
    /// checkout of the commit before it goes; when refused, `current` goes back to the commit
    /// serving, so that a certificate rotation reloads under it, and the refused commit is not
    /// tried again until the ref moves.
    pub fn settle(&self, commit: &str, applied: bool) {
        let mut commits = self.commits();
        let gone = match applied {
            true => std::mem::replace(&mut commits.serving, commit.to_string()),
            false => match self.point_current_at(&commits.serving) {
                Ok(()) => {
                    commits.refused = commit.to_string();
                    commit.to_string()
                }
                Err(_) => return,
            },
        };
        commits.current = commits.serving.clone();
        if !gone.is_empty() && gone != commits.serving {
            let _ = std::fs::remove_dir_all(self.root.join(gone));
        }
    }

    fn git(&self, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
        let timeout = self.poll.clamp(GIT_TIMEOUT.0, GIT_TIMEOUT.1);
        // The command line and git's own words repeat them.
        git(dir, args, timeout).map_err(|e| match &self.credentials {
            Some(secret) => anyhow!(e.to_string().replace(secret.as_str(), "***")),
            None => e,
        })
    }

    /// Renames a new `current` link onto the old one: a reload reads one checkout or the other.
    fn point_current_at(&self, commit: &str) -> std::io::Result<()> {
        let link = self.root.join("current.new");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(commit, &link)?;
        std::fs::rename(&link, self.root.join("current"))
    }
}

/// A repository URL without the user and password (or token) it may carry,
/// `https://deploy:TOKEN@git.example.com/config.git`: `https://***@git.example.com/config.git`.
fn without_credentials(url: &str) -> String {
    match credentials(url) {
        Some(secret) => url.replacen(secret, "***", 1),
        None => url.to_string(),
    }
}

/// The `user:password` of `scheme://user:password@host/...`; none in an scp-like
/// `git@host:path`, whose user is no secret.
fn credentials(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    authority.rfind('@').map(|at| &authority[..at])
}

/// Runs `git ARGS` in `dir` for at most `timeout`; its trimmed stdout, or an error with its
/// stderr.
fn git(dir: &Path, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
    let mut child = Command::new("git")
        .current_dir(dir)
        .args(args)
        // Never wait on a prompt for credentials: fail instead, and try again at the next poll.
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running git (is it installed?)")?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).trim().to_string()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            // Its readers end when the last process holding the pipes does; not waited for.
            bail!("git {}: no answer in {timeout:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (stdout.join(), stderr.join());
    if !status.success() {
        bail!("git {}: {}", args.join(" "), stderr.unwrap_or_default());
    }
    Ok(stdout.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::without_credentials;

    #[test]
    fn credentials_are_left_out_of_a_url_shown() {
        for (url, shown) in [
            (
                "https://deploy:s3cr3t@git.example.com/config.git",
                "https://***@git.example.com/config.git",
            ),
            ("https://oauth2:t@ok@host/a@b", "https://***@host/a@b"),
            (
                "https://git.example.com/a@b.git",
                "https://git.example.com/a@b.git",
            ),
            (
                "git@github.com:org/config.git",
                "git@github.com:org/config.git",
            ),
        ] {
            assert_eq!(without_credentials(url), shown);
        }
    }
}
