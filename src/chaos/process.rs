//! One part of the stack as a child process that the soak can SIGKILL and
//! start again with the same arguments, its output appended to one log file.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

pub struct Proc {
    pub name: String,
    bin: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
    /// Exits the soak did not cause (a crash of its own), with their status.
    pub unexpected_exits: Vec<String>,
}

impl Proc {
    pub fn new(name: &str, bin: &Path, args: Vec<OsString>, log: PathBuf) -> Proc {
        Proc {
            name: name.to_string(),
            bin: bin.to_path_buf(),
            args,
            log,
            child: None,
            unexpected_exits: Vec::new(),
        }
    }

    /// Starts the process (appending to its log). The parent's `EDGELOOP_*`
    /// variables are not passed on: they would override the arguments.
    pub fn start(&mut self) -> Result<()> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = out.try_clone()?;
        let mut command = Command::new(&self.bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("EDGELOOP_") {
                command.env_remove(key);
            }
        }
        // A process group of its own: a Ctrl-C meant for the soak does not
        // reach it (the soak stops it in order itself).
        #[cfg(unix)]
        command.process_group(0);
        let child = command
            .args(&self.args)
            .env("EDGELOOP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Records an exit the soak did not cause; returns whether it had exited.
    pub fn note_exit(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                self.unexpected_exits
                    .push(format!("{} exited by itself ({status})", self.name));
                self.child = None;
                true
            }
            _ => false,
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, as a crash, a power cut of the device or an OOM kill would.
    pub async fn kill9(&mut self) {
        self.note_exit();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Sends SIGTERM (a clean stop request); [`Proc::wait`] collects the exit.
    pub async fn sigterm(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if let Some(pid) = child.id() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await
                .context("running kill -TERM")?;
        }
        Ok(())
    }

    /// Waits until `deadline` for the process to exit; SIGKILL after that
    /// (an error saying so).
    pub async fn wait(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} is not running", self.name))?;
        match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = child.kill().await;
                anyhow::bail!(
                    "{} did not stop in time after SIGTERM; killed (log: {})",
                    self.name,
                    self.log.display()
                )
            }
        }
    }

    /// SIGTERM, then waits up to `grace` (SIGKILL after that).
    pub async fn terminate(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        self.sigterm().await?;
        self.wait(tokio::time::Instant::now() + grace).await
    }
}
