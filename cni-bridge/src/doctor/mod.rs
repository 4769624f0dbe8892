//! `cni-bridge doctor`: the troubleshooting a person does by hand on a node, as one table of
//! checks with the fix for each failure. Read-only: it runs `ip`, `bridge`, `nft` and
//! `iptables-save`, reads /proc/sys and the lease directory, and changes nothing.
//!
//! Run it where the plugin runs (the node's network namespace): everything it inspects is
//! that namespace's, except a pod's, which it enters by its namespace file.
//!
//! args.rs reads the command line, node.rs what the checks look at, checks.rs the checks and
//! table.rs prints them; this file only runs them in that order.

mod args;
mod checks;
mod node;
mod table;

use args::{parse_args, USAGE};
use checks::run_checks;
use table::{table, Status};

/// `cni-bridge doctor ARGS`: prints the checks; the process exit code.
pub fn main(args: &[String]) -> i32 {
    let o = match parse_args(args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return 0;
        }
        Err(e) => {
            eprintln!("cni-bridge doctor: {e}\n{USAGE}");
            return 2;
        }
    };
    let checks = run_checks(&o);
    if o.json {
        println!("{}", serde_json::to_string_pretty(&checks).unwrap_or_default());
    } else {
        print!("{}", table(&checks));
    }
    i32::from(checks.iter().any(|c| c.status == Status::Fail))
}
