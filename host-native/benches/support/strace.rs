//! The rows of an `strace -c -f -o FILE` summary, for the benches that
//! count system calls per event.

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
