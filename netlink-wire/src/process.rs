//! The one runner for the helper tools the plugins and the agent drive (`nft -f -`,
//! `iptables-restore`, `iptables-save`, `ip -batch`): a script on stdin, stdout captured, and
//! an error that names the tool, its arguments and what it said.

use std::io::Write;
use std::process::{Command, Stdio};

/// Why running a tool failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The tool could not be started (not on PATH, not executable).
    #[error("running {tool}: {source}")]
    Spawn {
        /// The program.
        tool: String,
        /// The error from exec.
        source: std::io::Error,
    },
    /// The tool ran and exited non-zero (or was killed).
    #[error("{tool} {args}: {stderr}")]
    Failed {
        /// The program.
        tool: String,
        /// Its arguments, space-separated.
        args: String,
        /// Its trimmed stderr, or how it ended when it said nothing.
        stderr: String,
    },
    /// Talking to the running tool failed.
    #[error("{tool}: {source}")]
    Io {
        /// The program.
        tool: String,
        /// The I/O error writing its stdin or reading its output.
        source: std::io::Error,
    },
}

impl RunError {
    /// Whether the tool is simply not installed.
    pub fn not_found(&self) -> bool {
        matches!(self, RunError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// The tool's own message when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            RunError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// Runs `tool args` with `stdin` (none when `None`) and returns its stdout when it exits 0.
pub fn run(tool: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String, RunError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RunError::Spawn { tool: tool.into(), source })?;
    // A write error (the tool exited early) matters only if the tool then reports success.
    let written = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(bytes)) => pipe.write_all(bytes),
        _ => Ok(()),
    };
    let out = child.wait_with_output().map_err(|source| RunError::Io { tool: tool.into(), source })?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let stderr = if said.is_empty() { out.status.to_string() } else { said };
        return Err(RunError::Failed { tool: tool.into(), args: args.join(" "), stderr });
    }
    written.map_err(|source| RunError::Io { tool: tool.into(), source })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `tool args` with `script` on stdin, for tools that read a whole transaction there.
pub fn pipe(tool: &str, args: &[&str], script: &str) -> Result<(), RunError> {
    run(tool, args, Some(script.as_bytes())).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_errors_and_missing_tools_are_told_apart() {
        assert_eq!(run("cat", &[], Some(b"abc")).unwrap(), "abc");
        let e = run("sh", &["-c", "echo bad >&2; exit 3"], None).unwrap_err();
        assert_eq!(e.stderr(), Some("bad"));
        assert_eq!(e.to_string(), "sh -c echo bad >&2; exit 3: bad");
        let e = run("sh", &["-c", "exit 4"], None).unwrap_err();
        assert!(e.to_string().contains("exit status: 4"), "{e}");
        let e = pipe("/nonexistent/tool", &[], "").unwrap_err();
        assert!(e.not_found() && e.to_string().starts_with("running /nonexistent/tool"), "{e}");
    }
}
