//! Config from a Git repository (DESIGN.md §6 `--config-git`), through the `git` command.
//!
//! Each commit of the ref is checked out into a directory of its own, and `current` (a
//! symlink) is renamed onto it, so a reload never reads half a checkout; the reload then reads
//! `current/<git-path>` like any config directory or file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};

pub struct GitSource {
    url: String,
    git_ref: String,
    path: PathBuf,
    /// How often the control task calls [`GitSource::sync`].
    pub poll: Duration,
    /// Holds `repo/` (a bare repository, one commit deep), `<commit>/` checkouts and `current`.
    root: PathBuf,
    commit: Mutex<String>,
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
            git_ref: git_ref.to_string(),
            path: path.to_path_buf(),
            poll,
            root: root.to_path_buf(),
            commit: Mutex::new(String::new()),
        };
        let first = git(root, &["init", "--quiet", "--bare", "repo"]).and_then(|_| source.sync());
        if let Err(e) = first {
            source.remove_checkout();
            return Err(e);
        }
        Ok(source)
    }

    /// Where the config is: `current/<git-path>` of the checkout.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("current").join(&self.path)
    }

    /// What admin `/config` names as the source.
    pub fn describe(&self) -> String {
        format!("{} {} {}", self.url, self.git_ref, self.path.display())
    }

    pub fn commit(&self) -> String {
        self.commit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Deletes the repository and checkouts, when the process ends.
    pub fn remove_checkout(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }

    /// Fetches the ref; when it moved, checks the new commit out, swaps it in and returns it.
    /// On an error (the server is down, the ref is gone) the checkout in place is kept.
    pub fn sync(&self) -> anyhow::Result<Option<String>> {
        let repo = self.root.join("repo");
        let fetch = [
            "fetch",
            "--quiet",
            "--depth=1",
            "--no-tags",
            &self.url,
            &self.git_ref,
        ];
        git(&repo, &fetch).with_context(|| format!("fetching {} {}", self.url, self.git_ref))?;
        let commit = git(&repo, &["rev-parse", "FETCH_HEAD^{commit}"])?;
        let mut current = self.commit.lock().unwrap_or_else(|e| e.into_inner());
        if *current == commit {
            return Ok(None);
        }
        let tree = self.root.join(&commit);
        if tree.exists() {
            std::fs::remove_dir_all(&tree)?;
        }
        std::fs::create_dir(&tree)?;
        let work_tree = format!("--work-tree={}", tree.display());
        git(
            &repo,
            &[
                &work_tree, "checkout", "--quiet", "--force", &commit, "--", ".",
            ],
        )
        .with_context(|| format!("checking out {commit}"))?;
        let link = self.root.join("current.new");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&commit, &link)?;
        std::fs::rename(&link, self.root.join("current"))?;
        if !current.is_empty() {
            let _ = std::fs::remove_dir_all(self.root.join(&*current));
        }
        current.clone_from(&commit);
        Ok(Some(commit))
    }
}

/// Runs `git ARGS` in `dir`; its trimmed stdout, or an error with its stderr.
fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        // Never wait on a prompt for credentials: fail instead, and try again at the next poll.
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .context("running git (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
