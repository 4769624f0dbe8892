//! The agent's logs as `kubectl logs` shows them: stderr is a pipe there, so no ANSI colour
//! escapes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use cni_conformance::netns::Netns;
use cni_conformance::require_root;

#[test]
fn logs_to_a_pipe_carry_no_ansi_escapes() {
    require_root("logs_to_a_pipe_carry_no_ansi_escapes");
    let node = Netns::new("agent-logs");
    let mut c = Command::new(env!("CARGO_BIN_EXE_cni-route-agent"));
    c.args(["--node-name", "n1", "--source", "kubernetes", "--kubeconfig", "/nonexistent/kubeconfig"])
        .args(["--listen", "127.0.0.1:0", "--cni-conf-dir", "/nonexistent/net.d"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    node.enter(&mut c);
    let mut child = c.spawn().unwrap();
    let mut seen = String::new();
    // Until the agent reports its source's error (or exits).
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("kubeconfig") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("ERROR") && seen.contains("kubeconfig"), "the error is logged: {seen}");
    assert!(!seen.contains('\u{1b}'), "no escape codes in piped logs: {seen:?}");
}
