//! `strace -c -f -o FILE` for the benches that count system calls per
//! event: the command that runs a program under it, and the rows of its
//! summary.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// A command running `program`, under `strace -c -f -o SUMMARY` when a
/// summary file is given.
pub fn command(program: impl AsRef<OsStr>, summary: Option<&Path>) -> Command {
    match summary {
        Some(summary) => {
            let mut command = Command::new("strace");
            command.args(["-c", "-f", "-o"]).arg(summary).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// One row of the summary: a system call (or `total`), its calls and its
/// errors.
pub struct Row<'a> {
    pub name: &'a str,
    pub calls: f64,
    #[allow(dead_code)] // not every bench prints them
    pub errors: &'a str,
}

/// The rows of summary `text`, `total` included; header and rule lines are
/// skipped.
pub fn rows(text: &str) -> impl Iterator<Item = Row<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 || fields[0].starts_with('%') || fields[0].starts_with('-') {
            return None;
        }
        Some(Row {
            name: fields[fields.len() - 1],
            calls: fields[3].parse().unwrap_or(0.0),
            errors: if fields.len() == 6 { fields[4] } else { "0" },
        })
    })
}
