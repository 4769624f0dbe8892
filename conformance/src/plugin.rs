//! Running a plugin binary as a runtime does: env + stdin, inside the node namespace.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::netns::{same_namespace, Netns};

/// A plugin's exit code, stdout, parsed stdout and stderr.
#[derive(Debug)]
pub struct Out {
    /// The plugin's exit code (-1 when a signal ended it).
    pub code: i32,
    /// What the plugin printed on stdout: the result or error JSON, nothing else.
    pub stdout: String,
    /// stdout as JSON (Null if not JSON).
    pub json: Value,
    /// What it printed on stderr (its logs), for failure messages.
    pub stderr: String,
}

impl Out {
    /// The CNI error code, if stdout holds an error.
    pub fn err_code(&self) -> Option<u64> {
        self.json.get("code").and_then(Value::as_u64)
    }
}

/// Runs `bin` in `node` with CNI_COMMAND=`cmd`, the given CNI_* env and `conf` on stdin.
/// Refuses a CNI_NETNS that is the node namespace itself unless `allow_self_netns`.
pub fn invoke(node: &Netns, bin: &Path, cmd: &str, env: &[(&str, &str)], conf: &Value) -> Out {
    invoke_raw(node, bin, cmd, env, conf.to_string().as_bytes(), false)
}

/// Like [`invoke`] with raw stdin; `allow_self_netns` is for tests of that very refusal.
pub fn invoke_raw(
    node: &Netns,
    bin: &Path,
    cmd: &str,
    env: &[(&str, &str)],
    stdin: &[u8],
    allow_self_netns: bool,
) -> Out {
    if let Some((_, ns)) = env.iter().find(|(key, _)| *key == "CNI_NETNS") {
        if !allow_self_netns && !ns.is_empty() && same_namespace(Path::new(ns), node) {
            panic!("refusing to run a plugin whose CNI_NETNS {ns} is the node namespace it runs in");
        }
    }
    invoke_through(node, Command::new(bin), cmd, env, stdin)
}

/// Runs `process` (a plugin, or a wrapper that ends in one, such as `nsenter ... plugin`) as
/// [`invoke_raw`] runs a plugin, without its CNI_NETNS check. Its environment is cleared
/// first: it gets PATH, CNI_COMMAND and `env` only.
pub fn invoke_through(
    node: &Netns,
    mut process: Command,
    cmd: &str,
    env: &[(&str, &str)],
    stdin: &[u8],
) -> Out {
    process.env_clear().env("CNI_COMMAND", cmd).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (key, value) in env {
        process.env(key, value);
    }
    process.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    node.enter(&mut process);
    let mut child = process.spawn().expect("spawn plugin");
    child.stdin.take().expect("piped").write_all(stdin).expect("write stdin");
    let out = child.wait_with_output().expect("wait plugin");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Out {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
