//! A Markdown summary for a pull-request comment: completeness first (a partial result must not
//! pass for a whole one), then totals, then the files with the most uncovered lines.

use std::io::{self, Write};

use crate::model::Totals;

/// How many files the "most uncovered" table lists.
pub const TOP_FILES: usize = 10;

/// What the summary says about completeness.
#[derive(Debug, Clone, Default)]
pub struct Completeness {
    pub complete: bool,
    pub declared: bool,
    pub missing: Vec<String>,
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "–".into();
    }
    format!("{:.2}%", part as f64 * 100.0 / whole as f64)
}

/// Keeps Markdown table syntax out of a path.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('`', "'")
}

pub fn write(
    mut w: impl Write,
    run_id: &str,
    totals: Totals,
    completeness: &Completeness,
    files: &[(impl AsRef<str>, Totals)],
) -> io::Result<()> {
    writeln!(w, "### Coverage of `{}`\n", cell(run_id))?;
    if completeness.complete {
        writeln!(w, "Complete: every expected shard finished.\n")?;
    } else if !completeness.declared {
        writeln!(
            w,
            "**Completeness unknown:** the run declared no expected shards.\n"
        )?;
    } else {
        writeln!(
            w,
            "**Incomplete:** {} shard(s) missing: {}.\n",
            completeness.missing.len(),
            completeness
                .missing
                .iter()
                .map(|s| format!("`{}`", cell(s)))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    writeln!(w, "| | covered | total | % |\n|---|---:|---:|---:|")?;
    for (name, part, whole) in [
        ("Lines", totals.lines_covered, totals.lines),
        ("Branches", totals.branches_taken, totals.branches),
        ("Functions", totals.functions_hit, totals.functions),
    ] {
        writeln!(
            w,
            "| {name} | {part} | {whole} | {} |",
            percent(part, whole)
        )?;
    }
    writeln!(w, "\n{} files.", totals.files)?;
    let mut worst: Vec<_> = files
        .iter()
        .filter(|(_, t)| t.lines > t.lines_covered)
        .collect();
    worst.sort_by(|a, b| {
        (b.1.lines - b.1.lines_covered)
            .cmp(&(a.1.lines - a.1.lines_covered))
            .then_with(|| a.0.as_ref().cmp(b.0.as_ref()))
    });
    if !worst.is_empty() {
        writeln!(
            w,
            "\n**Most uncovered lines**\n\n| file | uncovered | lines | % covered |\n|---|---:|---:|---:|"
        )?;
        for (path, t) in worst.iter().take(TOP_FILES) {
            writeln!(
                w,
                "| `{}` | {} | {} | {} |",
                cell(path.as_ref()),
                t.lines - t.lines_covered,
                t.lines,
                percent(t.lines_covered, t.lines)
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_is_missing_first_and_lists_the_worst_files() {
        let t = |lines, covered| Totals {
            files: 1,
            lines,
            lines_covered: covered,
            ..Totals::default()
        };
        let files = vec![
            ("a|b.c", t(10, 9)),
            ("big.c", t(100, 10)),
            ("done.c", t(5, 5)),
        ];
        let total = Totals {
            files: 3,
            lines: 115,
            lines_covered: 24,
            ..Totals::default()
        };
        let mut out = Vec::new();
        let c = Completeness {
            complete: false,
            declared: true,
            missing: vec!["3".into()],
        };
        write(&mut out, "ci-42", total, &c, &files).unwrap();
        let md = String::from_utf8(out).unwrap();
        let incomplete = md.find("**Incomplete:** 1 shard(s) missing: `3`").unwrap();
        assert!(
            incomplete < md.find("| Lines | 24 | 115 | 20.87% |").unwrap(),
            "{md}"
        );
        let big = md.find("`big.c` | 90").unwrap();
        assert!(big < md.find(r"`a\|b.c` | 1").unwrap());
        assert!(!md.contains("done.c"));
    }
}
