//! Go cover profiles (`go test -coverprofile`, modes `set`, `count` and `atomic`) in.
//!
//! A profile lists blocks: `file:startLine.startCol,endLine.endCol statements count`. Lines
//! are what covd merges, so each block with statements marks its lines `startLine..=endLine`
//! executable, and a line's hits are the largest count of the blocks on it (two blocks can
//! share a line; one execution of the line is not two). Across profiles the counts add up, as
//! Go's own merge adds block counts. Files are named by import path
//! (`example.com/mod/pkg/file.go`); a `--map-prefix example.com/mod/=` rule makes them
//! repository paths.

use std::collections::BTreeMap;
use std::io::BufRead;

use super::{ParseError, Record};
use crate::model::{FileBuilder, MAX_LINE};

/// The most lines one block may span. Real blocks (basic blocks of Go code) are far
/// shorter; without a bound, a one-line profile could claim ten million lines.
pub const MAX_BLOCK_LINES: u32 = 100_000;

/// Lines a profile may claim beyond four per byte read.
const LINE_BUDGET_BASE: u64 = 1_000_000;

/// Reads a profile, calling `on_record` once per file (in path order, after the whole profile:
/// a file's blocks may be scattered through it); `false` stops early.
pub fn read(
    mut input: impl BufRead,
    mut on_record: impl FnMut(Record) -> bool,
) -> Result<(), ParseError> {
    // file -> line -> hits (max over the blocks on the line)
    let mut files: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    let mut line_no = 0u64;
    let mut buf = String::new();
    let mut saw_mode = false;
    // Lines claimed so far, against a budget that grows with the input: real blocks cover a
    // few lines per ~40 bytes, so a profile claiming far more lines than bytes is hostile.
    let (mut claimed, mut bytes) = (0u64, 0u64);
    loop {
        buf.clear();
        let n = input
            .read_line(&mut buf)
            .map_err(|e| ParseError::io(line_no + 1, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        bytes += n as u64;
        let text = buf.trim();
        if text.is_empty() {
            continue;
        }
        let fail = |m: String| ParseError::at(line_no, format!("Go cover profile: {m}"));
        if let Some(mode) = text.strip_prefix("mode:") {
            if !matches!(mode.trim(), "set" | "count" | "atomic") {
                return Err(fail(format!("unknown mode `{}`", mode.trim())));
            }
            // `go tool covdata` concatenations repeat the mode line; later ones are no news.
            saw_mode = true;
            continue;
        }
        if !saw_mode {
            return Err(fail("the profile does not start with `mode:`".into()));
        }
        let (file, start, end, statements, count) = block(text).map_err(fail)?;
        if statements == 0 {
            continue;
        }
        claimed += u64::from(end - start) + 1;
        if claimed > LINE_BUDGET_BASE + 4 * bytes {
            return Err(fail(format!(
                "the profile claims {claimed} lines in {bytes} bytes; not a real profile"
            )));
        }
        let lines = files.entry(file.to_owned()).or_default();
        for line in start..=end {
            let slot = lines.entry(line).or_default();
            *slot = (*slot).max(count);
        }
    }
    if !saw_mode {
        return Err(ParseError::at(
            line_no.max(1),
            "Go cover profile: empty (no `mode:` line)",
        ));
    }
    for (path, lines) in files {
        let mut b = FileBuilder::new();
        for (line, hits) in lines {
            b.line(line, hits);
        }
        let record = Record {
            test_name: String::new(),
            path,
            file: b.build(),
        };
        if !on_record(record) {
            break;
        }
    }
    Ok(())
}

/// `file:12.3,14.2 2 1` → (file, 12, 14, 2, 1).
fn block(text: &str) -> Result<(&str, u32, u32, u64, u64), String> {
    // The file name may hold colons (Windows drives); the block is after the last one.
    let (file, rest) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("`{}` is not `file:start,end statements count`", cut(text)))?;
    let mut fields = rest.split_whitespace();
    let (range, statements, count) =
        match (fields.next(), fields.next(), fields.next(), fields.next()) {
            (Some(r), Some(s), Some(c), None) => (r, s, c),
            _ => {
                return Err(format!(
                    "`{}` is not `file:start,end statements count`",
                    cut(text)
                ));
            }
        };
    let (start, end) = range
        .split_once(',')
        .ok_or_else(|| format!("block range `{range}` has no comma"))?;
    let line = |pos: &str| -> Result<u32, String> {
        let l = pos.split_once('.').map_or(pos, |(l, _)| l);
        match l.parse::<u64>() {
            Ok(n) if n >= 1 && n <= u64::from(MAX_LINE) => Ok(n as u32),
            _ => Err(format!("line `{l}` is out of range")),
        }
    };
    let (start, end) = (line(start)?, line(end)?);
    if end < start {
        return Err(format!(
            "block ends (line {end}) before it starts (line {start})"
        ));
    }
    if end - start > MAX_BLOCK_LINES {
        // A few bytes of input must not make millions of lines.
        return Err(format!(
            "block spans {} lines (more than {MAX_BLOCK_LINES}); not a real block",
            end - start + 1
        ));
    }
    let number = |s: &str, what: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("{what} `{s}` is not a number"))
    };
    if file.is_empty() {
        return Err("a block without a file name".into());
    }
    Ok((
        file,
        start,
        end,
        number(statements, "statement count")?,
        number(count, "count")?,
    ))
}

fn cut(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(text: &str) -> Result<Vec<Record>, ParseError> {
        let mut out = Vec::new();
        read(text.as_bytes(), |r| {
            out.push(r);
            true
        })?;
        Ok(out)
    }

    #[test]
    fn blocks_become_lines_with_the_largest_count() {
        let recs = read_all(
            "mode: count\nm/a.go:3.10,5.2 2 4\nm/b.go:1.1,1.5 1 0\nm/a.go:5.2,6.3 1 7\nm/a.go:9.1,9.9 0 9\n",
        )
        .unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].path, "m/a.go");
        assert_eq!(
            recs[0].file.line_hits().collect::<Vec<_>>(),
            vec![(3, 4), (4, 4), (5, 7), (6, 7)]
        );
        assert_eq!(recs[1].file.line_hits().collect::<Vec<_>>(), vec![(1, 0)]);
    }

    #[test]
    fn malformed_profiles_name_the_line() {
        for (text, line, needle) in [
            ("m/a.go:1.1,2.2 1 1\n", 1, "does not start with `mode:`"),
            ("mode: fast\n", 1, "unknown mode"),
            ("mode: set\nm/a.go:1.1,2.2 1\n", 2, "is not `file"),
            ("mode: set\nm/a.go:0.1,2.2 1 1\n", 2, "out of range"),
            ("mode: set\nm/a.go:5.1,2.2 1 1\n", 2, "ends (line 2) before"),
            ("mode: set\nm/a.go:1.1,2.2 x 1\n", 2, "statement count"),
            ("mode: set\nm/a.go 1.1,2.2 1 1\n", 2, "is not `file"),
            (
                "mode: set\nm/a.go:1.1,9999999.2 1 1\n",
                2,
                "not a real block",
            ),
            ("", 1, "empty"),
        ] {
            let e = read_all(text).expect_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }
}
