//! The doctor's output: one row per check, as a table or JSON.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Status {
    Pass,
    Fail,
    Skip,
}

/// One row of the table.
#[derive(Debug, Serialize)]
pub(super) struct Check {
    pub(super) check: &'static str,
    pub(super) status: Status,
    pub(super) detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) fix: String,
}

pub(super) fn pass(check: &'static str, detail: impl Into<String>) -> Check {
    Check { check, status: Status::Pass, detail: detail.into(), fix: String::new() }
}

pub(super) fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { check, status: Status::Fail, detail: detail.into(), fix: fix.into() }
}

pub(super) fn skip(check: &'static str, detail: impl Into<String>) -> Check {
    Check { check, status: Status::Skip, detail: detail.into(), fix: String::new() }
}

pub(super) fn table(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<width$}  {:<6}  DETAIL\n", "CHECK", "RESULT");
    for c in checks {
        let r = match c.status {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        s.push_str(&format!("{:<width$}  {r:<6}  {}\n", c.check, c.detail));
        if !c.fix.is_empty() {
            s.push_str(&format!("{:<width$}  {:<6}  fix: {}\n", "", "", c.fix));
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    s.push_str(&format!("{} checks, {failed} failed\n", checks.len()));
    s
}
