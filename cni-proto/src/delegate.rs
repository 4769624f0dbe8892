//! Running another plugin (IPAM) the way a runtime does: found through CNI_PATH, the same
//! environment and the same stdin, its error passed up with its code.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};

use serde_json::Value;

use crate::env::{Command, Invocation};
use crate::error::Error;
use crate::result::CniResult;

/// Code for a delegated plugin that could not be found or run, or printed garbage.
pub const DELEGATE_FAILED: u32 = 199;

fn verb(command: Command) -> &'static str {
    match command {
        Command::Add => "ADD",
        Command::Del => "DEL",
        Command::Check => "CHECK",
        Command::Gc => "GC",
        Command::Status => "STATUS",
        Command::Version => "VERSION",
    }
}

/// Finds the executable of plugin `plugin_type` in the CNI_PATH directories.
pub fn find(plugin_type: &str, path: &[PathBuf]) -> Result<PathBuf, Error> {
    if plugin_type.is_empty() || plugin_type.contains('/') || plugin_type == "." || plugin_type == ".." {
        return Err(Error::InvalidConfig(format!("invalid plugin type {plugin_type:?}")));
    }
    if path.is_empty() {
        return Err(Error::MissingEnv(vec!["CNI_PATH"]));
    }
    path.iter().map(|d| d.join(plugin_type)).find(|p| p.is_file()).ok_or_else(|| {
        Error::plugin(
            DELEGATE_FAILED,
            format!("failed to find plugin {plugin_type:?} in path {path:?}"),
            String::new(),
        )
    })
}

/// A delegated plugin that is running; [`Pending::wait`] collects its answer. Starting it
/// early lets its process start overlap the caller's own work.
pub struct Pending {
    child: std::process::Child,
    writer: Option<std::thread::JoinHandle<()>>,
    command: Command,
    name: String,
}

/// Starts `plugin_type` (found through CNI_PATH) with `command`, without waiting for it.
pub fn spawn(plugin_type: &str, command: Command, inv: &Invocation, stdin: &[u8]) -> Result<Pending, Error> {
    let bin = find(plugin_type, &inv.path)?;
    spawn_path(&bin, command, inv, stdin)
}

fn fail(msg: String) -> Error {
    Error::plugin(DELEGATE_FAILED, msg, String::new())
}

/// Starts the plugin at `bin` with `command`, without waiting for it.
pub fn spawn_path(bin: &Path, command: Command, inv: &Invocation, stdin: &[u8]) -> Result<Pending, Error> {
    let path = std::env::join_paths(&inv.path).unwrap_or_default();
    let mut process = Proc::new(bin);
    process
        .env("CNI_COMMAND", verb(command))
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_IFNAME", &inv.ifname)
        .env("CNI_ARGS", &inv.args_raw)
        .env("CNI_PATH", path)
        .env("CNI_NETNS", inv.netns.as_deref().unwrap_or(Path::new("")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = process.spawn().map_err(|e| fail(format!("running {}: {e}", bin.display())))?;
    let mut pipe = child.stdin.take().expect("piped stdin");
    // A config fits the pipe buffer and is written at once; a larger one is written from a
    // thread so that neither side can block the other. A plugin that exits without reading
    // closes the pipe; its exit status tells.
    let writer = if stdin.len() < 16 * 1024 {
        let _ = pipe.write_all(stdin);
        None
    } else {
        let data = stdin.to_vec();
        Some(std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        }))
    };
    let name = bin.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Pending { child, writer, command, name })
}

impl Pending {
    /// Waits for the plugin: its result for ADD, `None` otherwise, or its error.
    pub fn wait(self) -> Result<Option<CniResult>, Error> {
        self.wait_status().1
    }

    /// [`Pending::wait`], with whether the plugin exited 0: an IPAM plugin that did may hold
    /// a lease even when what it printed is unusable, and must then be asked to release it.
    pub fn wait_status(self) -> (bool, Result<Option<CniResult>, Error>) {
        let command = self.command;
        match self.wait_exit() {
            Ok((stdout, name)) => (true, Self::parse(command, &stdout, &name)),
            Err((exited_ok, e)) => (exited_ok, Err(e)),
        }
    }

    /// Waits for the exit: stdout and the plugin's name if it was 0, else the plugin's error.
    fn wait_exit(self) -> Result<(Vec<u8>, String), (bool, Error)> {
        let Pending { child, writer, command, name } = self;
        let out = child.wait_with_output().map_err(|e| (false, fail(format!("waiting for {name}: {e}"))))?;
        if let Some(thread) = writer {
            let _ = thread.join();
        }
        if !out.status.success() {
            let json: Option<Value> = serde_json::from_slice(&out.stdout).ok();
            return Err((
                false,
                match json {
                    Some(json) if json.get("code").and_then(Value::as_u64).is_some() => Error::Plugin {
                        code: json["code"].as_u64().unwrap_or(DELEGATE_FAILED as u64) as u32,
                        msg: format!(
                            "{name}: {}",
                            json.get("msg").and_then(Value::as_str).unwrap_or("failed")
                        ),
                        details: json.get("details").and_then(Value::as_str).unwrap_or("").to_string(),
                    },
                    _ => fail(format!(
                        "{name} {} failed ({}): {}",
                        verb(command),
                        out.status,
                        String::from_utf8_lossy(&out.stdout).trim()
                    )),
                },
            ));
        }
        Ok((out.stdout, name))
    }

    fn parse(command: Command, stdout: &[u8], name: &str) -> Result<Option<CniResult>, Error> {
        if command != Command::Add {
            return Ok(None);
        }
        let json: Value = serde_json::from_slice(stdout).map_err(|e| Error::Decode {
            what: "delegated plugin result",
            details: format!("{name}: {e}"),
        })?;
        CniResult::from_json(&json, "1.1.0").map(Some)
    }
}
