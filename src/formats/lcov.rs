//! LCOV tracefiles (geninfo's `.info`), in and out.
//!
//! Reading accepts what geninfo 1.x/2.x, coverage.py, c8, grcov and llvm-cov write: `TN` (a
//! named test's covered lines are attributed to it), `SF`,
//! `DA` (with or without a checksum), `FN` in both the 2-field and the 3-field
//! (`FN:start,end,name`) form, `FNDA`, lcov 2.2's `FNL`/`FNA`, `BRDA` with `-`, the summary
//! lines (`LF`, `LH`, `FNF`, `FNH`, `BRF`, `BRH`; checked to be numbers, then recomputed), and
//! `end_of_record`. Unknown record types are skipped, and so are `BRDA` records at line 0
//! (old coverage.py's exit branches). Anything malformed is an error naming the
//! line; nothing here panics on any input.
//!
//! Writing follows geninfo's record order, so lcov and genhtml read the result.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::ops::Range;

use crate::model::{
    BranchArm, BranchKey, FileBuilder, FileCoverage, MAX_BLOCK, MAX_LINE, block_number,
};

use super::ParseError;
pub use super::Record;

pub use crate::model::EXCEPTION_BLOCK;

/// The longest line the reader gathers, in bytes. A longer one (a file that is not LCOV, or
/// one without newlines) is refused, naming the line, rather than held whole in memory.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Reads records one at a time, so a tracefile of any size is never held whole in memory.
#[derive(Debug)]
pub struct Reader<R> {
    input: R,
    line_no: u64,
    buf: Vec<u8>,
    test_name: String,
    bytes_read: u64,
    /// The size of the last record read, to size the next one's buffers.
    sizes: Sizes,
}

/// A record's lines (repeats included), branch arms, functions (the larger of its FN and
/// FNA counts) and bytes of FN and FNDA names.
#[derive(Debug, Default, Clone, Copy)]
struct Sizes {
    lines: usize,
    branches: usize,
    functions: usize,
    names: usize,
}

/// The record being read.
struct Open {
    path: String,
    builder: FileBuilder,
    /// The names of FN and FNDA records, back to back; the two lists below hold ranges of it.
    /// Matched by name at end_of_record. One string and two lists per record instead of a
    /// `String` per name and a hash map: the matching was 16% of the reader's instructions
    /// (callgrind, the ingest benchmark's data, 10 functions per file).
    names: String,
    /// (name, start, end) from FN.
    functions: Vec<(Range<usize>, u32, u32)>,
    /// (name, hits) from FNDA.
    function_hits: Vec<(Range<usize>, u64)>,
    // lcov 2.2: FNL:index,start[,end] then FNA:index,hits,name.
    function_locations: HashMap<u64, (u32, u32)>,
}

impl<R: BufRead> Reader<R> {
    pub fn new(input: R) -> Reader<R> {
        Reader {
            input,
            line_no: 0,
            buf: Vec::with_capacity(256),
            test_name: String::new(),
            bytes_read: 0,
            sizes: Sizes::default(),
        }
    }

    /// Bytes consumed so far (for progress reporting).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next record, `Ok(None)` at a clean end of input.
    pub fn next_record(&mut self) -> Result<Option<Record>, ParseError> {
        let mut open: Option<Open> = None;
        loop {
            // A line is read where the input buffered it, without a copy; only a line that
            // straddles the end of the buffer is gathered into `buf`. Reading each line into
            // `buf` with `read_until` (std's byte search and a copy) was 19% of the reader's
            // instructions (callgrind, one shard of the ingest benchmark's data). An
            // interrupted read is retried, as `read_until` does.
            let available = loop {
                match self.input.fill_buf() {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    read => break read.map_err(|e| ParseError::io(self.line_no + 1, e))?,
                }
            };
            let (line, consumed) = match memchr::memchr(b'\n', available) {
                Some(i) => (&available[..i], i + 1),
                None if available.is_empty() => {
                    return match open {
                        None => Ok(None),
                        Some(o) => Err(ParseError::at(
                            self.line_no,
                            format!(
                                "the input ends inside the record for SF:{} (no end_of_record; \
                                 is the file truncated?)",
                                o.path
                            ),
                        )),
                    };
                }
                None => {
                    self.buf.clear();
                    self.buf.extend_from_slice(available);
                    let partial = available.len();
                    self.input.consume(partial);
                    // One byte beyond the limit tells a line that is too long.
                    let room = MAX_LINE_BYTES.saturating_sub(partial) as u64 + 1;
                    let rest = io::Read::take(&mut self.input, room)
                        .read_until(b'\n', &mut self.buf)
                        .map_err(|e| ParseError::io(self.line_no + 1, e))?;
                    if self.buf.len() > MAX_LINE_BYTES && self.buf.last() != Some(&b'\n') {
                        return Err(ParseError::at(
                            self.line_no + 1,
                            format!(
                                "the line is longer than {MAX_LINE_BYTES} bytes (is this an \
                                 LCOV tracefile?)"
                            ),
                        ));
                    }
                    self.bytes_read += (partial + rest) as u64;
                    (self.buf.as_slice(), 0)
                }
            };
            self.bytes_read += consumed as u64;
            self.line_no += 1;
            let step = handle_line(
                trim(line),
                self.line_no,
                &mut self.test_name,
                &mut open,
                self.sizes,
            );
            self.input.consume(consumed);
            if let Some(mut o) = step? {
                self.sizes = o.sizes();
                let path = std::mem::take(&mut o.path);
                let mut file = finish(o);
                // A named test's section (`lcov --test-name`, kept apart by `lcov -a`): its
                // covered lines are that test's.
                if !self.test_name.is_empty() {
                    let covered = file.covered().clone();
                    file.set_tests(vec![(self.test_name.as_str().into(), covered)]);
                }
                return Ok(Some(Record {
                    test_name: self.test_name.clone(),
                    path,
                    file,
                }));
            }
        }
    }
}

/// One line of input: `Some` with the record it closed.
fn handle_line(
    line: &[u8],
    line_no: u64,
    test_name: &mut String,
    open: &mut Option<Open>,
    sizes: Sizes,
) -> Result<Option<Open>, ParseError> {
    let error = |message: &str| ParseError::at(line_no, message);
    if line.is_empty() {
        return Ok(None);
    }
    if line == b"end_of_record" {
        return match open.take() {
            Some(o) => Ok(Some(o)),
            None => Err(error("end_of_record without a record (no SF before it)")),
        };
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Ok(None); // not a record line; unknown content is skipped
    };
    let (tag, value) = (&line[..colon], &line[colon + 1..]);
    match tag {
        b"TN" => *test_name = utf8(value, line_no)?.to_owned(),
        b"SF" => {
            if let Some(o) = open {
                return Err(error(&format!(
                    "SF while the record for SF:{} is still open (missing end_of_record)",
                    o.path
                )));
            }
            let path = utf8(value, line_no)?;
            if path.is_empty() {
                return Err(error("SF with an empty path"));
            }
            *open = Some(Open::new(path, sizes));
        }
        b"DA" | b"FN" | b"FNDA" | b"FNL" | b"FNA" | b"BRDA" => {
            let Some(o) = open.as_mut() else {
                return Err(error(&format!(
                    "{} outside a record (no SF before it)",
                    String::from_utf8_lossy(tag)
                )));
            };
            parse_entry(o, tag, value).map_err(|m| ParseError::at(line_no, m))?;
        }
        b"LF" | b"LH" | b"FNF" | b"FNH" | b"BRF" | b"BRH" => {
            number::<u64>(value, "count").map_err(|m| error(&m))?;
        }
        _ => {} // VER, MCDC and future record types: skipped
    }
    Ok(None)
}

impl Open {
    /// A record for `path`, with room for one the size of `like`.
    fn new(path: &str, like: Sizes) -> Open {
        Open {
            path: path.to_owned(),
            builder: FileBuilder::with_capacity(like.lines, like.branches, like.functions),
            names: String::with_capacity(like.names),
            functions: Vec::with_capacity(like.functions),
            function_hits: Vec::with_capacity(like.functions),
            function_locations: HashMap::new(),
        }
    }

    fn sizes(&self) -> Sizes {
        let (lines, branches, functions) = self.builder.counts();
        Sizes {
            lines,
            branches,
            functions: functions.max(self.functions.len()),
            names: self.names.len(),
        }
    }

    /// Appends a function name to `names`.
    fn name(&mut self, name: &[u8]) -> Result<Range<usize>, String> {
        let name = function_name(name)?;
        let start = self.names.len();
        self.names.push_str(name);
        Ok(start..self.names.len())
    }
}

/// The coverage of a closed record: functions matched with their hits. The FNDA hits of a name
/// add up; the first FN of a name takes them, a later FN of the same name gets 0.
fn finish(mut o: Open) -> FileCoverage {
    let names = o.names.as_str();
    // FNDA by name, each name once with its hits summed, and whether an FN took them.
    o.function_hits
        .sort_unstable_by(|a, b| names[a.0.clone()].cmp(&names[b.0.clone()]));
    // `None` once an FN took the hits.
    let mut hits: Vec<(&str, Option<u64>)> = Vec::with_capacity(o.function_hits.len());
    for (range, n) in &o.function_hits {
        let name = &names[range.clone()];
        match hits.last_mut() {
            Some((last, Some(sum))) if *last == name => *sum = sum.saturating_add(*n),
            _ => hits.push((name, Some(*n))),
        }
    }
    for (range, start, end) in &o.functions {
        let name = &names[range.clone()];
        let taken = match hits.binary_search_by(|(n, _)| (*n).cmp(name)) {
            Ok(i) => hits[i].1.take().unwrap_or(0),
            Err(_) => 0,
        };
        o.builder.function(name, *start, *end, taken);
    }
    // FNDA without a matching FN: keep the hits, with the start line unknown.
    for (name, n) in &hits {
        if let Some(n) = n {
            o.builder.function(name, 0, 0, *n);
        }
    }
    o.builder.build()
}

fn parse_entry(o: &mut Open, tag: &[u8], value: &[u8]) -> Result<(), String> {
    match tag {
        b"DA" => {
            let (line, hits) = match plain_da(value) {
                Some(entry) => entry,
                None => general_da(value)?,
            };
            o.builder.line(line, hits);
        }
        b"FN" => {
            let (start, rest) = split_once(value, "FN")?;
            let start = line_number(Some(start), "FN")?;
            // lcov 2.x: FN:start,end,name. A name never starts with digits and a comma.
            let (end, name) = match split_once(rest, "FN") {
                Ok((end, name)) if !end.is_empty() && end.iter().all(u8::is_ascii_digit) => {
                    (line_number(Some(end), "FN end")?, name)
                }
                _ => (0, rest),
            };
            let name = o.name(name)?;
            o.functions.push((name, start, end));
        }
        b"FNDA" => {
            let (hits, name) = split_once(value, "FNDA")?;
            let hits = count(Some(hits), "FNDA hit count")?;
            let name = o.name(name)?;
            o.function_hits.push((name, hits));
        }
        b"FNL" => {
            let mut parts = value.splitn(3, |&b| b == b',');
            let index = number::<u64>(parts.next().unwrap_or_default(), "FNL index")?;
            let start = line_number(parts.next(), "FNL")?;
            let end = match parts.next() {
                Some(e) => line_number(Some(e), "FNL end")?,
                None => 0,
            };
            o.function_locations.insert(index, (start, end));
        }
        b"FNA" => {
            let mut parts = value.splitn(3, |&b| b == b',');
            let index = number::<u64>(parts.next().unwrap_or_default(), "FNA index")?;
            let hits = count(parts.next(), "FNA hit count")?;
            let name = function_name(parts.next().ok_or("FNA without a name")?)?;
            let (start, end) = *o.function_locations.get(&index).ok_or_else(|| {
                format!("FNA refers to function index {index}, which no FNL declared")
            })?;
            o.builder.function(name, start, end, hits);
        }
        b"BRDA" => {
            let entry = match plain_brda(value) {
                Some(entry) => Some(entry),
                None => general_brda(value)?,
            };
            if let Some((key, taken)) = entry {
                o.builder.branch(key, taken);
            }
        }
        _ => {}
    }
    Ok(())
}

/// DA:line,hits[,checksum]
fn general_da(value: &[u8]) -> Result<(u32, u64), String> {
    let mut parts = value.splitn(3, |&b| b == b',');
    let line = line_number(parts.next(), "DA")?;
    let hits = count(parts.next(), "DA hit count")?;
    Ok((line, hits))
}

/// [`general_da`] for a line of plain numbers.
fn plain_da(value: &[u8]) -> Option<(u32, u64)> {
    let [line, hits] = plain_numbers::<2>(value)?;
    let line = u32::try_from(line)
        .ok()
        .filter(|l| (1..=MAX_LINE).contains(l))?;
    (hits != NOT_RUN).then_some((line, hits))
}

/// BRDA:line,block,branch,taken; `None` for an arm to skip.
fn general_brda(value: &[u8]) -> Result<Option<(BranchKey, Option<u64>)>, String> {
    // The branch may be a label containing commas, so the taken count is after the last comma.
    let (line, rest) = split_once(value, "BRDA")?;
    // coverage.py before 7.6.2 wrote exit branches at line 0 (coveragepy#1846): they
    // name no source line, so they are skipped rather than refusing the file.
    if line == b"0" {
        return Ok(None);
    }
    let line = line_number(Some(line), "BRDA")?;
    let (block, rest) = split_once(rest, "BRDA")?;
    // lcov 2 and gcovr mark exception branches with an `e` before the block number.
    let (digits, mark) = match block.strip_prefix(b"e") {
        Some(n) => (n, EXCEPTION_BLOCK),
        None => (block, 0),
    };
    let block = block_number(number::<u64>(digits, "BRDA block")?, "BRDA block")? | mark;
    let comma = rest
        .iter()
        .rposition(|&b| b == b',')
        .ok_or("BRDA needs 4 fields: line,block,branch,taken")?;
    let (branch, taken) = (&rest[..comma], &rest[comma + 1..]);
    if branch.is_empty() {
        return Err("BRDA with an empty branch field".into());
    }
    let arm = match std::str::from_utf8(branch) {
        Ok(s) if s.bytes().all(|b| b.is_ascii_digit()) => {
            BranchArm::Index(number::<u32>(branch, "BRDA branch")?)
        }
        Ok(s) => BranchArm::Label(s.into()),
        Err(_) => return Err("BRDA branch label is not UTF-8".into()),
    };
    let taken = if taken == b"-" {
        None
    } else {
        Some(count(Some(taken), "BRDA taken count")?)
    };
    Ok(Some((BranchKey { line, block, arm }, taken)))
}

/// [`general_brda`] for a line of plain numbers (block without the exception mark).
fn plain_brda(value: &[u8]) -> Option<(BranchKey, Option<u64>)> {
    let [line, block, branch, taken] = plain_numbers::<4>(value)?;
    let line = u32::try_from(line)
        .ok()
        .filter(|l| (1..=MAX_LINE).contains(l))?;
    let block = block_number(block, "").ok()?;
    let arm = BranchArm::Index(u32::try_from(branch).ok()?);
    // `-` is the only way to NOT_RUN: 18 digits stay below it.
    Some((
        BranchKey { line, block, arm },
        (taken != NOT_RUN).then_some(taken),
    ))
}

/// `plain_numbers` gives a last field of `-` (LCOV's "never ran") as this.
const NOT_RUN: u64 = u64::MAX;

/// N comma-separated fields of plain digits (at most 18 each, so no overflow), the form nearly
/// every DA and BRDA line has, read in one pass; the last may be `-` ([`NOT_RUN`]). Anything
/// else (spaces, a checksum, a label, an `e` block, a sign, a long number, a missing field)
/// gives `None` and takes the general path, which also words the errors. The general path
/// costs about 250 instructions per DA line and 450 per BRDA line (callgrind), this one a
/// fraction of that.
fn plain_numbers<const N: usize>(value: &[u8]) -> Option<[u64; N]> {
    let mut out = [0u64; N];
    let mut bytes = value.iter();
    for (i, slot) in out.iter_mut().enumerate() {
        let last = i + 1 == N;
        let mut n: u64 = 0;
        let mut digits = 0;
        loop {
            match bytes.next() {
                Some(&b) if b.is_ascii_digit() && digits < 18 => {
                    n = n * 10 + u64::from(b - b'0');
                    digits += 1;
                }
                Some(b',') if !last && digits > 0 => break,
                Some(b'-') if last && digits == 0 && bytes.as_slice().is_empty() => {
                    n = NOT_RUN;
                    break;
                }
                None if last && digits > 0 => break,
                _ => return None,
            }
        }
        *slot = n;
    }
    Some(out)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn utf8(bytes: &[u8], line: u64) -> Result<&str, ParseError> {
    std::str::from_utf8(bytes).map_err(|_| ParseError::at(line, "the text is not valid UTF-8"))
}

fn split_once<'a>(value: &'a [u8], what: &str) -> Result<(&'a [u8], &'a [u8]), String> {
    let comma = value
        .iter()
        .position(|&b| b == b',')
        .ok_or_else(|| format!("{what} is missing a field (no comma)"))?;
    Ok((&value[..comma], &value[comma + 1..]))
}

fn function_name(name: &[u8]) -> Result<&str, String> {
    match std::str::from_utf8(name) {
        Ok("") => Err("empty function name".into()),
        Ok(s) => Ok(s),
        Err(_) => Err("function name is not UTF-8".into()),
    }
}

fn number<T: TryFrom<u64>>(field: &[u8], what: &str) -> Result<T, String> {
    parse_number(field).ok_or_else(|| not_a_number(field, what))
}

// Separate from `number` so the hot path formats no message. Digits are read straight from
// the bytes instead of `str::from_utf8` + `trim` + `parse`: every DA line goes through here,
// and `cargo bench --bench ingest -- lcov/parse` went from 20.9 ms to 13.5 ms with it.
fn parse_number<T: TryFrom<u64>>(field: &[u8]) -> Option<T> {
    let digits = trim(field);
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    T::try_from(n).ok()
}

#[cold]
fn not_a_number(field: &[u8], what: &str) -> String {
    format!(
        "{what} `{}` is not a number in range",
        String::from_utf8_lossy(&field[..field.len().min(40)])
    )
}

fn line_number(field: Option<&[u8]>, what: &str) -> Result<u32, String> {
    let field = field.ok_or_else(|| format!("{what} is missing its line number"))?;
    let n: u64 =
        parse_number(field).ok_or_else(|| not_a_number(field, &format!("{what} line number")))?;
    if n == 0 {
        return Err(format!("{what} line number 0 (lines start at 1)"));
    }
    if n > u64::from(MAX_LINE) {
        return Err(format!(
            "{what} line number {n} is beyond the largest accepted line ({MAX_LINE})"
        ));
    }
    Ok(n as u32)
}

fn count(field: Option<&[u8]>, what: &str) -> Result<u64, String> {
    let field = field.ok_or_else(|| format!("{what} is missing"))?;
    if field.first() == Some(&b'-') {
        return Err(format!("{what} is negative"));
    }
    // Counts beyond u64 (seen from broken gcov builds) saturate rather than fail the file.
    if !field.is_empty() && field.iter().all(u8::is_ascii_digit) {
        return Ok(parse_number::<u64>(field).unwrap_or(u64::MAX));
    }
    number(field, what)
}

/// Writes one file's record in geninfo's order.
pub fn write_record(w: &mut impl Write, path: &str, file: &FileCoverage) -> io::Result<()> {
    write_record_as(w, path, file, Dialect::Lcov2)
}

/// Which LCOV readers the output is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// lcov 2.x, genhtml 2.x, coverage.py, Codecov: `FN:start,end,name` when the end is known.
    Lcov2,
    /// lcov 1.x and genhtml 1.x, which read `FN:start,end,name` as a function named
    /// `end,name` (and then match no `FNDA`): always `FN:start,name`. They also skip every
    /// `BRDA` whose block or branch is not a number, so exception blocks (`e0`) and named arms
    /// (coverage.py's `jump to line 7`) are numbered (see [`Lcov1Branches`]).
    Lcov1,
}

/// The numbers an lcov 1.x reader gets for blocks and arms it could not read as written.
///
/// Branches come sorted by line, block, arm, and that order does the work: on a line, the
/// exception blocks (the flag is the top bit) follow every plain block, so each becomes a number
/// after the line's largest plain one; in a block, named arms follow numbered ones, so each
/// takes a number after the block's largest. Numbers that were numbers stay as they are.
#[derive(Default)]
struct Lcov1Branches {
    line: u32,
    block: Option<u32>,
    /// The line's largest plain block, and how many exception blocks it had so far.
    plain_blocks_end: u32,
    exception_blocks: u32,
    /// The block's written number, its largest numbered arm, and how many named arms so far.
    written_block: u32,
    index_end: u32,
    labels: u32,
}

impl Lcov1Branches {
    fn next(&mut self, key: &BranchKey) -> (u32, u32) {
        if key.line != self.line || self.block.is_none() {
            *self = Lcov1Branches {
                line: key.line,
                ..Lcov1Branches::default()
            };
        }
        if self.block != Some(key.block) {
            self.block = Some(key.block);
            self.index_end = 0;
            self.labels = 0;
            self.written_block = if key.block & EXCEPTION_BLOCK == 0 {
                let block = key.block & MAX_BLOCK;
                self.plain_blocks_end = block + 1;
                block
            } else {
                self.exception_blocks += 1;
                self.plain_blocks_end + self.exception_blocks - 1
            };
        }
        let arm = match key.arm {
            BranchArm::Index(i) => {
                self.index_end = i.saturating_add(1);
                i
            }
            BranchArm::Label(_) => {
                self.labels += 1;
                self.index_end.saturating_add(self.labels - 1)
            }
        };
        (self.written_block, arm)
    }
}

/// [`write_record`] for the readers of `dialect`.
///
/// The record is formatted into one buffer and written with one call: writing each field
/// through `Write` cost 78,000 instructions per record of the benchmark's data (callgrind), and
/// the merged export after the last shard is what CI waits for.
pub fn write_record_as(
    w: &mut impl Write,
    path: &str,
    file: &FileCoverage,
    dialect: Dialect,
) -> io::Result<()> {
    let functions = file.functions();
    let branches = file.branches();
    let mut out = Text::with_capacity(
        path.len()
            + 48
            + 12 * file.lines().len() as usize
            + 24 * branches.len()
            + functions
                .iter()
                .map(|f| 2 * f.name.len() + 32)
                .sum::<usize>(),
    );
    out.text(b"SF:").text(path.as_bytes()).text(b"\n");
    for f in functions.iter().filter(|f| f.start_line > 0) {
        out.text(b"FN:").number(f.start_line);
        if f.end_line > 0 && dialect == Dialect::Lcov2 {
            out.text(b",").number(f.end_line);
        }
        out.text(b",").text(f.name.as_bytes()).text(b"\n");
    }
    for f in functions {
        out.text(b"FNDA:")
            .number(f.hits)
            .text(b",")
            .text(f.name.as_bytes())
            .text(b"\n");
    }
    let totals = file.totals();
    if !functions.is_empty() {
        out.text(b"FNF:")
            .number(totals.functions)
            .text(b"\nFNH:")
            .number(totals.functions_hit)
            .text(b"\n");
    }
    let mut lcov1 = Lcov1Branches::default();
    for (key, taken) in branches {
        out.text(b"BRDA:").number(key.line).text(b",");
        if dialect == Dialect::Lcov1 {
            let (block, arm) = lcov1.next(key);
            out.number(block).text(b",").number(arm);
        } else {
            if key.block & EXCEPTION_BLOCK != 0 {
                out.text(b"e");
            }
            // LCOV has no way to say "counted arm" (coverage.py's Cobertura): such arms are
            // written as plain ones, which every reader (covd's included) accepts.
            out.number(key.block & MAX_BLOCK).text(b",");
            match &key.arm {
                BranchArm::Index(i) => out.number(*i),
                BranchArm::Label(l) => out.text(l.as_bytes()),
            };
        }
        out.text(b",");
        match taken {
            Some(t) => out.number(*t),
            None => out.text(b"-"),
        };
        out.text(b"\n");
    }
    if !branches.is_empty() {
        out.text(b"BRF:")
            .number(totals.branches)
            .text(b"\nBRH:")
            .number(totals.branches_taken)
            .text(b"\n");
    }
    for (line, hits) in file.line_hits() {
        out.text(b"DA:")
            .number(line)
            .text(b",")
            .number(hits)
            .text(b"\n");
    }
    out.text(b"LF:")
        .number(totals.lines)
        .text(b"\nLH:")
        .number(totals.lines_covered)
        .text(b"\nend_of_record\n");
    w.write_all(&out.0)
}

/// One record's text as it is formatted.
struct Text(Vec<u8>);

impl Text {
    fn with_capacity(bytes: usize) -> Text {
        Text(Vec::with_capacity(bytes))
    }

    #[inline]
    fn text(&mut self, bytes: &[u8]) -> &mut Text {
        self.0.extend_from_slice(bytes);
        self
    }

    #[inline]
    fn number(&mut self, n: impl itoa::Integer) -> &mut Text {
        self.0
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse_all(text: &str) -> Result<Vec<Record>, ParseError> {
        let mut r = Reader::new(text.as_bytes());
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn reads_every_record_type() {
        let recs = parse_all(
            "TN:unit\nSF:src/a.c\nFN:3,9,outer, with comma\nFN:12,inner\nFNDA:4,outer, with comma\n\
             FNF:2\nFNH:1\nBRDA:4,0,0,3\nBRDA:4,0,1,-\nBRDA:5,0,jump to line 7, maybe,1\n\
             BRF:3\nBRH:2\nDA:3,4\nDA:4,4,abcdef\nDA:5,0\nDA:3,1\nLF:3\nLH:2\nVER:2\n\
             end_of_record\n",
        )
        .unwrap();
        assert_eq!(recs.len(), 1);
        let r = &recs[0];
        assert_eq!(r.test_name, "unit");
        let f = &r.file;
        assert_eq!(
            f.line_hits().collect::<Vec<_>>(),
            vec![(3, 5), (4, 4), (5, 0)]
        );
        assert_eq!(f.functions().len(), 2);
        assert_eq!(&*f.functions()[0].name, "outer, with comma");
        assert_eq!((f.functions()[0].end_line, f.functions()[0].hits), (9, 4));
        assert_eq!(f.functions()[1].hits, 0);
        let labels: Vec<_> = f
            .branches()
            .iter()
            .map(|(k, t)| (k.arm.to_string(), *t))
            .collect();
        assert_eq!(
            labels,
            vec![
                ("0".into(), Some(3)),
                ("1".into(), None),
                ("jump to line 7, maybe".into(), Some(1))
            ]
        );
    }

    #[test]
    fn a_line_beyond_the_limit_is_refused_not_gathered() {
        // A small buffer, so that the long line straddles it and is gathered.
        let mut text = b"SF:a.c\nDA:1,1\nFN:1,".to_vec();
        text.resize(text.len() + MAX_LINE_BYTES + 10, b'x');
        let mut r = Reader::new(std::io::BufReader::with_capacity(64, &text[..]));
        let e = r.next_record().unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("longer than"), "{e}");
        // Just under the limit, with or without a final newline, it is read.
        for end in ["\nend_of_record\n", ""] {
            let mut text = b"SF:a.c\nDA:1,1\nTN:".to_vec();
            text.resize(text.len() + MAX_LINE_BYTES - 3, b'x');
            text.extend_from_slice(end.as_bytes());
            let mut r = Reader::new(std::io::BufReader::with_capacity(64, &text[..]));
            let read = r.next_record();
            if end.is_empty() {
                assert!(read.unwrap_err().to_string().contains("no end_of_record"));
            } else {
                assert_eq!(read.unwrap().unwrap().path, "a.c");
            }
        }
    }

    #[test]
    fn round_trips_through_the_writer() {
        let text = "SF:x.py\nFN:1,4,f\nFNDA:2,f\nFNF:1\nFNH:1\nBRDA:2,0,jump to line 3,-\nBRF:1\nBRH:0\nDA:1,2\nDA:2,0\nLF:2\nLH:1\nend_of_record\n";
        let recs = parse_all(text).unwrap();
        let mut out = Vec::new();
        write_record(&mut out, &recs[0].path, &recs[0].file).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), text);
    }

    #[test]
    fn exception_branches_keep_their_mark() {
        let text = "SF:a.cc\nBRDA:4,e0,1,2\nBRDA:4,0,1,3\nBRF:2\nBRH:2\nDA:4,5\nLF:1\nLH:1\nend_of_record\n";
        let recs = parse_all(text).unwrap();
        assert_eq!(
            recs[0].file.branches().len(),
            2,
            "an exception branch is not the plain one"
        );
        let mut out = Vec::new();
        write_record(&mut out, &recs[0].path, &recs[0].file).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("BRDA:4,e0,1,2\n"));
    }

    #[test]
    fn the_lcov1_dialect_writes_two_field_fn() {
        let recs = parse_all("SF:x.py\nFN:1,4,f\nFNDA:2,f\nDA:1,2\nend_of_record\n").unwrap();
        let mut out = Vec::new();
        write_record_as(&mut out, &recs[0].path, &recs[0].file, Dialect::Lcov1).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("FN:1,f\nFNDA:2,f\n"), "{text}");
    }

    #[test]
    fn the_lcov1_dialect_numbers_exception_blocks_and_named_arms() {
        let recs = parse_all(
            "SF:x.py\nBRDA:3,0,0,1\nBRDA:3,2,1,0\nBRDA:3,e0,0,4\nBRDA:3,e1,0,-\n\
             BRDA:5,0,jump to line 7,1\nBRDA:5,0,return from f,0\nBRDA:6,1,0,2\n\
             BRDA:6,1,exit,3\nBRDA:8,e0,0,1\nDA:3,1\nend_of_record\n",
        )
        .unwrap();
        let mut out = Vec::new();
        write_record_as(&mut out, &recs[0].path, &recs[0].file, Dialect::Lcov1).unwrap();
        let text = String::from_utf8(out).unwrap();
        let brda: Vec<&str> = text.lines().filter(|l| l.starts_with("BRDA:")).collect();
        assert_eq!(
            brda,
            [
                "BRDA:3,0,0,1",
                "BRDA:3,2,1,0",
                "BRDA:3,3,0,4",
                "BRDA:3,4,0,-",
                "BRDA:5,0,0,1",
                "BRDA:5,0,1,0",
                "BRDA:6,1,0,2",
                "BRDA:6,1,1,3",
                "BRDA:8,0,0,1",
            ],
            "{text}"
        );
        // Read back, nothing collides: the same branches with the same counts.
        let back = parse_all(&text).unwrap();
        assert_eq!(back[0].file.totals(), recs[0].file.totals());
    }

    #[test]
    fn lcov_2_2_function_records() {
        let recs =
            parse_all("SF:a.c\nFNL:0,10,20\nFNA:0,7,main\nDA:10,7\nend_of_record\n").unwrap();
        let f = &recs[0].file.functions()[0];
        assert_eq!(
            (&*f.name, f.start_line, f.end_line, f.hits),
            ("main", 10, 20, 7)
        );
    }

    #[test]
    fn malformed_input_names_the_line() {
        let cases = [
            ("SF:a\nDA:1,1\n", 2, "ends inside the record"),
            ("SF:a\nDA:0,1\nend_of_record\n", 2, "line number 0"),
            (
                "SF:a\nDA:4294967295,1\nend_of_record\n",
                2,
                "beyond the largest",
            ),
            (
                "SF:a\nDA:99999999999999,1\nend_of_record\n",
                2,
                "beyond the largest",
            ),
            ("SF:a\nDA:12\nend_of_record\n", 2, "DA hit count is missing"),
            ("SF:a\nDA:x,1\nend_of_record\n", 2, "not a number"),
            ("SF:a\nDA:3,-1\nend_of_record\n", 2, "negative"),
            ("DA:1,1\n", 1, "outside a record"),
            ("SF:a\nSF:b\n", 2, "still open"),
            ("SF:a\nBRDA:1,0\nend_of_record\n", 2, "missing a field"),
            ("SF:a\nLF:many\nend_of_record\n", 2, "not a number"),
            ("SF:a\nBRDA:00,0,0,1\nend_of_record\n", 2, "line number 0"),
            ("SF:\n", 1, "empty path"),
            ("end_of_record\n", 1, "without a record"),
            ("SF:a\nFNA:3,1,f\nend_of_record\n", 2, "no FNL declared"),
        ];
        for (text, line, needle) in cases {
            let err = parse_all(text).expect_err(text);
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.to_string().contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn unknown_records_and_blank_lines_are_skipped() {
        let recs = parse_all(
            "\n\nVER:1\nSF:a\n  DA:1,1  \nMCDC:1,2,t,0,1,x\ngarbage line\nend_of_record\n",
        )
        .unwrap();
        assert_eq!(recs[0].file.totals().lines_covered, 1);
    }

    #[test]
    fn old_coverage_py_exit_branches_at_line_0_are_skipped() {
        let recs = parse_all("SF:a.py\nBRDA:0,0,exit,1\nDA:1,1\nend_of_record\n").unwrap();
        assert!(recs[0].file.branches().is_empty());
    }

    #[test]
    fn function_hits_match_by_name() {
        let recs = parse_all(
            "SF:a\nFN:3,f\nFN:9,f\nFN:12,g\nFNDA:2,f\nFNDA:5,f\nFNDA:7,h\n\
             FNDA:18446744073709551615,g\nFNDA:1,g\nend_of_record\n",
        )
        .unwrap();
        let mut got: Vec<_> = recs[0]
            .file
            .functions()
            .iter()
            .map(|f| (f.name.to_string(), f.start_line, f.hits))
            .collect();
        got.sort();
        // The hits of a name add up (saturating); the first FN of the name takes them; an
        // FNDA without an FN keeps its hits with the start line unknown.
        let want = [("f", 3, 7), ("f", 9, 0), ("g", 12, u64::MAX), ("h", 0, 7)];
        let want: Vec<_> = want
            .iter()
            .map(|(n, l, h)| (n.to_string(), *l, *h))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn lines_across_the_input_buffer_read_alike() {
        let text = "TN:t\r\nSF:src/a long path.c\r\nFN:3,main\nFNDA:4,main\nBRDA:4,0,0,3\n\
                    BRDA:4,0,1,-\nDA:3,4\nDA:4,12345678901\nend_of_record\nSF:b\nDA:1,1\n\
                    end_of_record";
        let whole = parse_all(text).unwrap();
        assert_eq!(whole.len(), 2, "the last line needs no newline");
        for capacity in [1, 2, 5, 7, 16] {
            let mut r = Reader::new(std::io::BufReader::with_capacity(capacity, text.as_bytes()));
            let mut pieces = Vec::new();
            while let Some(rec) = r.next_record().unwrap() {
                pieces.push(rec);
            }
            assert_eq!(r.bytes_read(), text.len() as u64, "capacity {capacity}");
            assert_eq!(pieces.len(), whole.len(), "capacity {capacity}");
            for (a, b) in pieces.iter().zip(&whole) {
                assert_eq!((&a.test_name, &a.path), (&b.test_name, &b.path));
                assert_eq!(a.file, b.file, "capacity {capacity}");
            }
        }
        // An error names the same line, wherever the buffer ended.
        let bad = "SF:a\nDA:1,1\nDA:x,1\nend_of_record\n";
        for capacity in [1, 3, 64] {
            let mut r = Reader::new(std::io::BufReader::with_capacity(capacity, bad.as_bytes()));
            let err = r.next_record().unwrap_err().to_string();
            assert!(err.contains("line 3"), "capacity {capacity}: {err}");
        }
    }

    #[test]
    fn an_interrupted_read_is_retried() {
        /// Interrupted before every read.
        struct Flaky<'a>(&'a [u8], bool);
        impl std::io::Read for Flaky<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                self.1 = !self.1;
                if self.1 {
                    return Err(std::io::ErrorKind::Interrupted.into());
                }
                self.0.read(out)
            }
        }
        let text = b"SF:a\nDA:1,2\nend_of_record\n";
        let input = std::io::BufReader::with_capacity(4, Flaky(text, false));
        let (records, error, bytes) = outcome(Reader::new(input));
        assert_eq!((records.len(), error, bytes), (1, None, text.len() as u64));
    }

    #[test]
    fn a_block_in_a_flag_bit_is_refused() {
        // 2^31 would read back as an exception block, 2^30 as a coverage.py counted arm.
        for block in ["2147483648", "1073741824", "e1073741824", "4294967295"] {
            let text = format!("SF:a\nDA:1,1\nBRDA:1,{block},0,1\nend_of_record\n");
            let err = parse_all(&text).unwrap_err().to_string();
            assert!(
                err.contains("line 3") && err.contains("beyond"),
                "{block}: {err}"
            );
        }
        let ok = parse_all("SF:a\nBRDA:1,1073741823,0,1\nBRDA:1,e1073741823,0,1\nend_of_record\n");
        let recs = ok.unwrap();
        let blocks: Vec<u32> = recs[0]
            .file
            .branches()
            .iter()
            .map(|(k, _)| k.block)
            .collect();
        assert_eq!(blocks, [1073741823, 1073741823 | EXCEPTION_BLOCK]);
    }

    #[test]
    fn huge_counts_saturate() {
        let recs = parse_all("SF:a\nDA:1,99999999999999999999999\nend_of_record\n").unwrap();
        assert_eq!(recs[0].file.hits_of(1), Some(u64::MAX));
    }

    /// Everything `next_record` gives until the end or an error, as text to compare.
    fn outcome(mut reader: Reader<impl BufRead>) -> (Vec<String>, Option<String>, u64) {
        let mut records = Vec::new();
        loop {
            match reader.next_record() {
                Ok(Some(r)) => records.push(format!("{}|{}|{:?}", r.test_name, r.path, r.file)),
                Ok(None) => return (records, None, reader.bytes_read()),
                Err(e) => return (records, Some(e.to_string()), reader.bytes_read()),
            }
        }
    }

    /// DA and BRDA values: mostly plain numbers, with the forms the fast path must leave to
    /// the general one (spaces, signs, `-`, `e` blocks, labels, zeros, long numbers).
    fn plain_entries_read_alike(da: &str, brda: &str) {
        if let Some(fast) = plain_da(da.as_bytes()) {
            assert_eq!(general_da(da.as_bytes()), Ok(fast), "DA:{da}");
        }
        if let Some(fast) = plain_brda(brda.as_bytes()) {
            assert_eq!(general_brda(brda.as_bytes()), Ok(Some(fast)), "BRDA:{brda}");
        }
    }

    /// The comparison above runs only where the one-pass reader takes an entry: it does take
    /// the plain ones (the bulk of every file), and leaves the rest to the general reader.
    #[test]
    fn the_one_pass_reader_takes_plain_entries_and_only_those() {
        assert_eq!(plain_da(b"12,3"), Some((12, 3)));
        assert_eq!(plain_da(b"1,0"), Some((1, 0)));
        let key = |line, block, arm| BranchKey {
            line,
            block,
            arm: BranchArm::Index(arm),
        };
        assert_eq!(plain_brda(b"7,0,1,4"), Some((key(7, 0, 1), Some(4))));
        assert_eq!(plain_brda(b"7,2,0,-"), Some((key(7, 2, 0), None)));
        for other in ["0,1", "1,-", "1", "1,2,abcdef", " 7,1", "1,1e3"] {
            assert_eq!(plain_da(other.as_bytes()), None, "DA:{other}");
        }
        for other in ["0,0,0,1", "1,e0,0,1", "1,0,jump,1", "1,0,0", "1,0,0,1,2"] {
            assert_eq!(plain_brda(other.as_bytes()), None, "BRDA:{other}");
        }
        for (da, brda) in [("12,3", "7,0,1,4"), ("1,0", "7,2,0,-")] {
            plain_entries_read_alike(da, brda);
        }
    }

    /// The cases proptest once found (proptest-regressions/formats/lcov.txt), pinned: the
    /// strategies have changed since, so the saved seeds no longer make them.
    #[test]
    fn plain_entries_proptest_found_read_alike() {
        // DA without a count, line 0; a BRDA of line 1 never reached.
        plain_entries_read_alike("0", "1,0,0,-");
        // DA with `-` as its count; BRDA of one field.
        plain_entries_read_alike("1,-", "0");
    }

    #[test]
    fn a_record_cut_after_its_sf_line_reads_alike_from_a_one_byte_buffer() {
        let text = "SF:src/a.c";
        let whole = outcome(Reader::new(text.as_bytes()));
        let pieces = outcome(Reader::new(std::io::BufReader::with_capacity(
            1,
            text.as_bytes(),
        )));
        assert_eq!(pieces, whole);
        assert!(
            whole
                .1
                .as_deref()
                .is_some_and(|e| e.contains("ends inside the record")),
            "{whole:?}"
        );
    }

    fn entry_value(fields: usize) -> impl Strategy<Value = String> {
        let field = prop_oneof![
            24 => (0u64..50).prop_map(|n| n.to_string()),
            1 => Just("-".to_owned()),
            1 => Just("e1".to_owned()),
            1 => Just(" 7".to_owned()),
            1 => Just("".to_owned()),
            1 => Just("jump to 3".to_owned()),
            1 => Just("4294967296".to_owned()),
            1 => Just("999999999999999999".to_owned()),
            1 => Just("99999999999999999999999".to_owned()),
            1 => Just((MAX_LINE + 1).to_string()),
            1 => Just(MAX_LINE.to_string()),
        ];
        prop::collection::vec(field, 1..=fields + 1).prop_map(|f| f.join(","))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the one-pass reader of plain DA and BRDA lines accepts, the general
        /// reader reads alike.
        #[test]
        fn plain_entries_read_as_the_general_path_reads_them(
            da in entry_value(2),
            brda in entry_value(4),
        ) {
            plain_entries_read_alike(&da, &brda);
        }

        /// Lines are read where the input buffered them, and gathered when they cross the
        /// buffer's end: the records, the error and its line number must not depend on where
        /// the buffer ends.
        #[test]
        fn reading_does_not_depend_on_the_input_buffer(
            lines in prop::collection::vec(
                prop_oneof![
                    Just("SF:src/a.c".to_owned()),
                    Just("end_of_record".to_owned()),
                    Just("TN:t".to_owned()),
                    (1u32..40, 0u64..5).prop_map(|(l, h)| format!("DA:{l},{h}")),
                    (1u32..40, 0u32..3, 0u32..3).prop_map(|(l, b, a)| format!("BRDA:{l},{b},{a},1")),
                    (1u32..40, "[a-z]{1,3}").prop_map(|(l, n)| format!("FN:{l},{n}")),
                    (0u64..9, "[a-z]{1,3}").prop_map(|(h, n)| format!("FNDA:{h},{n}")),
                    "[ -~]{0,12}",
                ],
                0..40,
            ),
            crlf in any::<bool>(),
            final_newline in any::<bool>(),
            capacity in 1usize..48,
        ) {
            let mut text = lines.join(if crlf { "\r\n" } else { "\n" });
            if final_newline {
                text.push('\n');
            }
            let whole = outcome(Reader::new(text.as_bytes()));
            let pieces = outcome(Reader::new(std::io::BufReader::with_capacity(
                capacity,
                text.as_bytes(),
            )));
            prop_assert_eq!(&pieces, &whole);
            if whole.1.is_none() {
                prop_assert_eq!(whole.2, text.len() as u64);
            }
        }
    }
}
