//! `covd.v1.Delta` read straight from its bytes into validated domain types, in one pass.
//!
//! This is the ingest hot path, so it is hand-written rather than prost's generated decoder
//! followed by a conversion: on the ingest benchmark (callgrind, 16 shards × 500 files) that
//! pair cost 59,000 instructions per file record, nearly two thirds of the daemon's work, most
//! of it building and dropping the intermediate messages (a `String` per branch label and
//! function name, a `Vec` per field). The wire rules are protobuf's: fields in any order,
//! unknown fields skipped, the last value of a repeated scalar wins, packed and unpacked
//! repeated numbers both read, `uint32` taken from the low 32 bits of its varint. Groups are
//! refused (no covd message has one). The checks and their field names are the ones
//! `convert` applies elsewhere (`delta.files[3].line_gaps[17]`); the tests hold this reader
//! to prost's encoding of random deltas.

use std::sync::Arc;

use crate::model::{self, ArmName, FileBatch};
use crate::service::{Delta, Error, Limits};

/// Why a delta was refused: bytes that are not a `covd.v1.Delta`, or a field that breaks a
/// rule (its name relative to the file, and the reason).
enum Fault {
    Decode { at: usize, what: &'static str },
    Field(String, Reason),
}

impl From<(String, Reason)> for Fault {
    fn from((field, reason): (String, Reason)) -> Fault {
        Fault::Field(field, reason)
    }
}

/// The fields of each message this reader reads, by number. Each one's `match` below must
/// read them all: a test compares this list with the compiled `covd.proto`, so a field added
/// to the protocol and not read here fails the build's tests instead of being dropped.
#[cfg_attr(not(test), allow(dead_code))]
const FIELDS_READ: &[(&str, &[i32])] = &[
    ("Delta", &[1, 2, 3]),
    ("TestRef", &[1]),
    ("FileDelta", &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    ("Branch", &[1, 2, 3, 4, 5]),
    ("Function", &[1, 2, 3, 4]),
    ("TestLines", &[1, 2]),
];

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A cursor over one message's bytes; `base` is where they start in the whole delta, for
/// error offsets.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Reader<'a> {
        Reader { buf, pos: 0, base }
    }

    fn more(&self) -> bool {
        self.pos < self.buf.len()
    }

    #[cold]
    fn fail<T>(&self, what: &'static str) -> Result<T, Fault> {
        Err(Fault::Decode {
            at: self.base + self.pos,
            what,
        })
    }

    /// Most varints of a delta (line gaps, counts, keys, lengths) take one byte: that case
    /// is inlined, the rest read by [`Reader::long_varint`] (callgrind: 8.4 K instructions per
    /// file record on the ingest benchmark before this split).
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, Fault> {
        if let Some(&b) = self.buf.get(self.pos)
            && b < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(b));
        }
        self.long_varint()
    }

    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, Fault> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return self.fail("a varint runs past the end");
            };
            self.pos += 1;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                if i == 9 && b > 1 {
                    return self.fail("a varint overflows 64 bits");
                }
                return Ok(value);
            }
        }
        self.fail("a varint is longer than 10 bytes")
    }

    /// The next field's number and wire type.
    fn key(&mut self) -> Result<(u64, u8), Fault> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) || key >> 3 == 0 {
            return self.fail("a field key is out of range");
        }
        Ok((key >> 3, (key & 7) as u8))
    }

    fn bytes(&mut self) -> Result<(&'a [u8], usize), Fault> {
        let len = self.varint()?;
        let start = self.pos;
        match usize::try_from(len).ok().and_then(|l| start.checked_add(l)) {
            Some(end) if end <= self.buf.len() => {
                self.pos = end;
                Ok((&self.buf[start..end], self.base + start))
            }
            _ => self.fail("a length runs past the end"),
        }
    }

    fn message(&mut self) -> Result<Reader<'a>, Fault> {
        let (buf, base) = self.bytes()?;
        Ok(Reader::new(buf, base))
    }

    fn str(&mut self) -> Result<&'a str, Fault> {
        let (bytes, _) = self.bytes()?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s),
            Err(_) => self.fail("a string is not UTF-8"),
        }
    }

    fn expect(&self, wire_type: u8, expected: u8) -> Result<(), Fault> {
        if wire_type == expected {
            Ok(())
        } else {
            self.fail("a field has the wrong wire type")
        }
    }

    /// A `string` field's value.
    fn string(&mut self, wire_type: u8) -> Result<&'a str, Fault> {
        self.expect(wire_type, LEN)?;
        self.str()
    }

    /// A number field's varint.
    fn uint(&mut self, wire_type: u8) -> Result<u64, Fault> {
        self.expect(wire_type, VARINT)?;
        self.varint()
    }

    /// A message field, to read with its own cursor.
    fn submessage(&mut self, wire_type: u8) -> Result<Reader<'a>, Fault> {
        self.expect(wire_type, LEN)?;
        self.message()
    }

    fn skip(&mut self, wire_type: u8) -> Result<(), Fault> {
        let width = match wire_type {
            VARINT => return self.varint().map(drop),
            LEN => return self.bytes().map(drop),
            FIXED64 => 8,
            FIXED32 => 4,
            _ => return self.fail("groups and unknown wire types are not covd.v1"),
        };
        if self.buf.len() - self.pos < width {
            return self.fail("a fixed-width field runs past the end");
        }
        self.pos += width;
        Ok(())
    }

    /// A repeated number field, packed or not, into `out` (`narrow` keeps what the field's
    /// type keeps of each varint).
    fn numbers<T>(
        &mut self,
        wire_type: u8,
        out: &mut Vec<T>,
        narrow: impl Fn(u64) -> T,
    ) -> Result<(), Fault> {
        match wire_type {
            VARINT => out.push(narrow(self.varint()?)),
            LEN => {
                let mut packed = self.message()?;
                // Most fields hold only one-byte values (line gaps, small counts, arm numbers):
                // then every byte is a value, and the copy vectorizes. Measured with callgrind
                // on the ingest benchmark (16 × 500 files), this function went from 27.4 M to
                // 6.4 M instructions.
                if packed.buf.iter().fold(0, |any, b| any | b) < 0x80 {
                    out.extend(packed.buf.iter().map(|b| narrow(u64::from(*b))));
                    return Ok(());
                }
                out.reserve(packed.buf.len());
                while packed.more() {
                    out.push(narrow(packed.varint()?));
                }
            }
            _ => return self.fail("a field has the wrong wire type"),
        }
        Ok(())
    }
}

fn u32_of(v: u64) -> u32 {
    // protobuf's uint32 keeps the low 32 bits of the varint.
    v as u32
}

/// Reads and validates a delta.
pub(crate) fn read(wire: &[u8], limits: &Limits) -> Result<Delta, Error> {
    read_checked(wire, limits, Paths::Checked)
}

/// Reads a delta the store kept: its paths were checked when it was acknowledged, by whatever
/// rules that release had, so they are only spelled the current way; refusing them now would
/// make acknowledged data unreadable.
pub(crate) fn read_stored(wire: &[u8], limits: &Limits) -> Result<Delta, Error> {
    read_checked(wire, limits, Paths::Stored)
}

/// Whether a delta's paths are checked (a client's) or only spelled one way (a stored one).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Paths {
    Checked,
    Stored,
}

fn read_checked(wire: &[u8], limits: &Limits, paths: Paths) -> Result<Delta, Error> {
    read_delta(wire, limits, paths).map_err(|fault| match fault {
        Fault::Decode { at, what } => Error::invalid(
            "delta",
            format!("does not decode as covd.v1.Delta: {what} (byte {at})"),
        ),
        Fault::Field(field, reason) => reason.at(field),
    })
}

fn read_delta(wire: &[u8], limits: &Limits, paths: Paths) -> Result<Delta, Fault> {
    let mut r = Reader::new(wire, 0);
    let mut seq = 0;
    let mut files = FileBatch::recycled();
    // Scratch reused by every file of the delta.
    let mut scratch = Scratch::default();
    // A TestRef given twice merges: its last name wins.
    let mut test: Option<&str> = None;
    while r.more() {
        let (field, wire_type) = r.key()?;
        match field {
            1 => seq = r.uint(wire_type)?,
            2 => {
                let mut m = r.submessage(wire_type)?;
                let i = files.len();
                read_file(&mut m, limits, paths, &mut files, &mut scratch).map_err(
                    |f| match f {
                        Fault::Field(field, reason) => {
                            Fault::Field(format!("delta.files[{i}].{field}"), reason)
                        }
                        decode => decode,
                    },
                )?;
            }
            3 => {
                let mut m = r.submessage(wire_type)?;
                let name = test.get_or_insert("");
                while m.more() {
                    match m.key()? {
                        (1, wire_type) => *name = m.string(wire_type)?,
                        (_, wire_type) => m.skip(wire_type)?,
                    }
                }
            }
            _ => r.skip(wire_type)?,
        }
    }
    if let Some(name) = test {
        check_name(name, limits).map_err(|r| Fault::Field("delta.test.name".into(), r))?;
        files.set_test(name.into());
    }
    Ok(Delta {
        seq,
        files,
        wire: None,
    })
}

/// Vectors a delta's files are read through, kept between files.
#[derive(Default)]
struct Scratch {
    gaps: Vec<u32>,
    lines: Vec<u32>,
    hits: Vec<u64>,
    arms: ArmColumns,
}

/// `FileDelta`'s branch arm columns (fields 7 to 10).
#[derive(Default)]
struct ArmColumns {
    line_gaps: Vec<u32>,
    blocks: Vec<u32>,
    numbers: Vec<u32>,
    taken: Vec<u64>,
}

impl ArmColumns {
    fn clear(&mut self) {
        self.line_gaps.clear();
        self.blocks.clear();
        self.numbers.clear();
        self.taken.clear();
    }

    /// Checks the columns and adds their arms to the open file of `batch`.
    fn push_into(&self, limits: &Limits, batch: &mut FileBatch) -> Result<(), Fault> {
        let columns = [
            ("arm_line_gaps", self.line_gaps.len()),
            ("arm_blocks", self.blocks.len()),
            ("arm_numbers", self.numbers.len()),
            ("arm_taken", self.taken.len()),
        ];
        let arms = columns.iter().map(|(_, len)| *len).max().unwrap_or(0);
        if let Some((field, len)) = columns.iter().find(|(_, len)| *len < arms) {
            return Err(Fault::Field(
                (*field).into(),
                format!(
                    "has {len} values where another arm column has {arms}; every arm has one value in each column"
                )
                .into(),
            ));
        }
        let mut line = 0u64;
        for (j, gap) in self.line_gaps.iter().enumerate() {
            line += u64::from(*gap);
            let checked = match u32::try_from(line) {
                Ok(line) => check_line(line, limits).map(|()| line),
                Err(_) => Err(beyond(line, limits)),
            };
            let line = checked.map_err(|e| Fault::Field(format!("arm_line_gaps[{j}]"), e))?;
            let taken = self.taken[j].checked_sub(1);
            batch.push_arm(line, self.blocks[j], ArmName::Index(self.numbers[j]), taken);
        }
        Ok(())
    }
}

fn read_file(
    r: &mut Reader<'_>,
    limits: &Limits,
    paths: Paths,
    batch: &mut FileBatch,
    scratch: &mut Scratch,
) -> Result<(), Fault> {
    let mut path = "";
    let Scratch {
        gaps,
        lines,
        hits,
        arms: arm_columns,
    } = scratch;
    gaps.clear();
    hits.clear();
    arm_columns.clear();
    let (mut arms, mut functions, mut tests) = (0, 0, 0);
    batch.begin_file();
    while r.more() {
        let (field, wire_type) = r.key()?;
        match field {
            1 => path = r.string(wire_type)?,
            2 => r.numbers(wire_type, gaps, u32_of)?,
            3 => r.numbers(wire_type, hits, |v| v)?,
            4 => {
                read_branch(&mut r.submessage(wire_type)?, arms, limits, batch)?;
                arms += 1;
            }
            5 => {
                read_function(&mut r.submessage(wire_type)?, functions, limits, batch)?;
                functions += 1;
            }
            6 => {
                let (name, lines) = read_test_lines(&mut r.submessage(wire_type)?, tests, limits)?;
                batch.push_test(name, lines);
                tests += 1;
            }
            7 => r.numbers(wire_type, &mut arm_columns.line_gaps, u32_of)?,
            8 => r.numbers(wire_type, &mut arm_columns.blocks, u32_of)?,
            9 => r.numbers(wire_type, &mut arm_columns.numbers, u32_of)?,
            10 => r.numbers(wire_type, &mut arm_columns.taken, |v| v)?,
            _ => r.skip(wire_type)?,
        }
    }
    arm_columns.push_into(limits, batch)?;
    // Spelled as the CLI spells it, so that a raw client's `./a.c` is the same file as `a.c`.
    let path = model::path::normalize(path);
    if paths == Paths::Checked {
        model::path::check(&path).map_err(|e| Fault::Field("path".into(), e.to_string().into()))?;
    }
    if hits.len() != gaps.len() {
        return Err(Fault::Field(
            "hits".into(),
            format!(
                "has {} counts for {} lines; there must be one per line",
                hits.len(),
                gaps.len()
            )
            .into(),
        ));
    }
    lines_from_gaps_into(gaps, limits, "line_gaps", lines)?;
    batch
        .end_file(&path, lines, hits)
        .map_err(|e| Fault::Field("line_gaps".into(), e.to_string().into()))
}

fn read_branch(
    r: &mut Reader<'_>,
    j: usize,
    limits: &Limits,
    batch: &mut FileBatch,
) -> Result<(), Fault> {
    let (mut line, mut block, mut index, mut label, mut taken) = (0, 0, 0, "", None);
    while r.more() {
        let (field, wire_type) = r.key()?;
        match field {
            1 => line = u32_of(r.uint(wire_type)?),
            2 => block = u32_of(r.uint(wire_type)?),
            3 => index = u32_of(r.uint(wire_type)?),
            4 => label = r.string(wire_type)?,
            5 => taken = Some(r.uint(wire_type)?),
            _ => r.skip(wire_type)?,
        }
    }
    check_line(line, limits).map_err(|e| Fault::Field(format!("branches[{j}].line"), e))?;
    let arm = if label.is_empty() {
        ArmName::Index(index)
    } else {
        let field = || format!("branches[{j}].label");
        check_name(label, limits).map_err(|e| Fault::Field(field(), e))?;
        if label.bytes().all(|c| c.is_ascii_digit()) {
            // Written to LCOV, it would read back as a numbered branch.
            return Err(Fault::Field(
                field(),
                "a label of digits only is ambiguous; send it as `branch`".into(),
            ));
        }
        ArmName::Label(label)
    };
    batch.push_arm(line, block, arm, taken);
    Ok(())
}

fn read_function(
    r: &mut Reader<'_>,
    j: usize,
    limits: &Limits,
    batch: &mut FileBatch,
) -> Result<(), Fault> {
    let (mut name, mut start_line, mut end_line, mut hits) = ("", 0, 0, 0);
    while r.more() {
        let (field, wire_type) = r.key()?;
        match field {
            1 => name = r.string(wire_type)?,
            2 => start_line = u32_of(r.uint(wire_type)?),
            3 => end_line = u32_of(r.uint(wire_type)?),
            4 => hits = r.uint(wire_type)?,
            _ => r.skip(wire_type)?,
        }
    }
    check_name(name, limits).map_err(|e| Fault::Field(format!("functions[{j}].name"), e))?;
    for (what, line) in [("start_line", start_line), ("end_line", end_line)] {
        if line > limits.max_line {
            return Err(Fault::Field(
                format!("functions[{j}].{what}"),
                beyond(u64::from(line), limits),
            ));
        }
    }
    batch.push_function(name, start_line, end_line, hits);
    Ok(())
}

fn read_test_lines(
    r: &mut Reader<'_>,
    j: usize,
    limits: &Limits,
) -> Result<(Arc<str>, roaring::RoaringBitmap), Fault> {
    let mut name = "";
    let mut gaps: Vec<u32> = Vec::new();
    while r.more() {
        let (field, wire_type) = r.key()?;
        match field {
            1 => name = r.string(wire_type)?,
            2 => r.numbers(wire_type, &mut gaps, u32_of)?,
            _ => r.skip(wire_type)?,
        }
    }
    check_name(name, limits).map_err(|e| Fault::Field(format!("tests[{j}].test"), e))?;
    let field = format!("tests[{j}].line_gaps");
    let lines = lines_from_gaps(&gaps, limits, &field)?;
    let bitmap = roaring::RoaringBitmap::from_sorted_iter(lines)
        .map_err(|_| Fault::Field(field, "lines are not ascending".into()))?;
    Ok((Arc::from(name), bitmap))
}

/// Gap-encoded lines from the wire, checked: ascending, distinct, within the line limit.
fn lines_from_gaps(
    gaps: &[u32],
    limits: &Limits,
    field: &str,
) -> Result<Vec<u32>, (String, Reason)> {
    let mut lines = Vec::with_capacity(gaps.len());
    lines_from_gaps_into(gaps, limits, field, &mut lines)?;
    Ok(lines)
}

/// [`lines_from_gaps`] into `lines` (cleared first), to reuse its allocation.
fn lines_from_gaps_into(
    gaps: &[u32],
    limits: &Limits,
    field: &str,
    lines: &mut Vec<u32>,
) -> Result<(), (String, Reason)> {
    lines.clear();
    lines.reserve(gaps.len());
    // The common case in one pass without branches: no gap of 0, and (since the lines ascend)
    // only the sum of the gaps to compare with the limit.
    let sum: u64 = gaps.iter().map(|g| u64::from(*g)).sum();
    if sum <= u64::from(limits.max_line) && !gaps.iter().fold(false, |any, g| any | (*g == 0)) {
        let mut line = 0u32;
        lines.extend(gaps.iter().map(|g| {
            line += g;
            line
        }));
        return Ok(());
    }
    let mut line: u64 = 0;
    for (j, gap) in gaps.iter().enumerate() {
        if *gap == 0 {
            let reason = if j == 0 {
                "line 0 is not a line (lines start at 1)"
            } else {
                "a gap of 0 repeats a line (lines must be ascending and distinct)"
            };
            return Err((format!("{field}[{j}]"), reason.into()));
        }
        line += u64::from(*gap);
        if line > u64::from(limits.max_line) {
            return Err((format!("{field}[{j}]"), beyond(line, limits)));
        }
        lines.push(line as u32);
    }
    Ok(())
}

/// Why a value is refused: malformed (INVALID_ARGUMENT), or beyond one of the daemon's limits
/// (RESOURCE_EXHAUSTED, naming it).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reason {
    Invalid(String),
    Limit(String),
}

impl From<String> for Reason {
    fn from(why: String) -> Reason {
        Reason::Invalid(why)
    }
}

impl From<&str> for Reason {
    fn from(why: &str) -> Reason {
        Reason::Invalid(why.to_owned())
    }
}

impl Reason {
    /// The refusal of a value in `field`.
    fn at(self, field: impl Into<String>) -> Error {
        match self {
            Reason::Invalid(why) => Error::invalid(field, why),
            Reason::Limit(why) => Error::ResourceExhausted(format!("{}: {why}", field.into())),
        }
    }
}

#[cold]
fn beyond(line: u64, limits: &Limits) -> Reason {
    Reason::Limit(format!(
        "line {line} is beyond the limit --max-line ({})",
        limits.max_line
    ))
}

fn check_line(line: u32, limits: &Limits) -> Result<(), Reason> {
    if line == 0 {
        return Err("line 0 is not a line (lines start at 1)".into());
    }
    if line > limits.max_line {
        return Err(beyond(u64::from(line), limits));
    }
    Ok(())
}

fn check_name(name: &str, limits: &Limits) -> Result<(), Reason> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    // A newline in a name would forge records in every line-based export. The check is a
    // fold over every byte (the compiler vectorizes it); the search for the culprit only runs
    // when it fails.
    if name
        .bytes()
        .fold(false, |any, c| any | c.is_ascii_control())
        && let Some(c) = name.bytes().find(|c| c.is_ascii_control())
    {
        return Err(format!("contains a control character (byte {c:#04x})").into());
    }
    if name.len() > limits.max_name_bytes {
        return Err(Reason::Limit(format!(
            "is {} bytes long, beyond the limit --max-name-bytes ({})",
            name.len(),
            limits.max_name_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    #[test]
    fn the_reader_reads_every_field_the_protocol_defines() {
        let set =
            prost_types::FileDescriptorSet::decode(crate::rpc::proto::FILE_DESCRIPTOR_SET).unwrap();
        let file = set.file.iter().find(|f| f.package() == "covd.v1").unwrap();
        for (message, read) in FIELDS_READ {
            let m = file
                .message_type
                .iter()
                .find(|m| m.name() == *message)
                .unwrap_or_else(|| panic!("covd.v1.{message} is not in covd.proto"));
            let mut defined: Vec<i32> = m.field.iter().map(|f| f.number()).collect();
            defined.sort_unstable();
            assert_eq!(
                &defined, read,
                "covd.v1.{message} defines fields {defined:?}; rpc/delta.rs reads {read:?}: \
                 read the new field in its reader, then list it in FIELDS_READ"
            );
        }
    }
    use crate::model::{BranchArm, BranchKey, FileBuilder, FileCoverage};
    use crate::rpc::proto;

    fn branch() -> impl Strategy<Value = proto::Branch> {
        (
            1u32..50,
            0u32..3,
            0u32..4,
            prop_oneof![Just(String::new()), "[a-z][a-z ]{0,8}"],
            prop::option::of(0u64..1 << 40),
        )
            .prop_map(|(line, block, branch, label, taken)| proto::Branch {
                line,
                block,
                branch,
                label,
                taken,
            })
    }

    fn file() -> impl Strategy<Value = proto::FileDelta> {
        (
            "[a-z]{1,6}(/[a-z]{1,6}){0,2}\\.c",
            prop::collection::vec((1u32..300, 0u64..u64::MAX), 0..40),
            prop::collection::vec(branch(), 0..10),
            prop::collection::vec(("[a-z_]{1,10}", 0u32..50, 0u32..50, 0u64..9), 0..5),
            prop::collection::vec(("[a-z:]{1,10}", prop::collection::vec(1u32..9, 0..6)), 0..3),
            // Arm columns: (line gap, block, number, taken + 1); the first gap is at least 1.
            prop::collection::vec((0u32..4, 0u32..3, 0u32..4, 0u64..1 << 40), 0..10),
        )
            .prop_map(|(path, lines, branches, functions, tests, arms)| {
                let (line_gaps, hits) = lines.into_iter().unzip();
                let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (j, (gap, block, number, taken)) in arms.into_iter().enumerate() {
                    columns.0.push(if j == 0 { gap + 1 } else { gap });
                    columns.1.push(block);
                    columns.2.push(number);
                    columns.3.push(taken);
                }
                proto::FileDelta {
                    path,
                    line_gaps,
                    hits,
                    arm_line_gaps: columns.0,
                    arm_blocks: columns.1,
                    arm_numbers: columns.2,
                    arm_taken: columns.3,
                    branches,
                    functions: functions
                        .into_iter()
                        .map(|(name, start_line, end_line, hits)| proto::Function {
                            name,
                            start_line,
                            end_line,
                            hits,
                        })
                        .collect(),
                    tests: tests
                        .into_iter()
                        .map(|(test, line_gaps)| proto::TestLines { test, line_gaps })
                        .collect(),
                }
            })
    }

    fn delta() -> impl Strategy<Value = proto::Delta> {
        (
            1u64..1 << 50,
            prop::collection::vec(file(), 0..5),
            prop::option::of("[a-z]{1,8}"),
        )
            .prop_map(|(seq, files, test)| proto::Delta {
                seq,
                files,
                test: test.map(|name| proto::TestRef { name }),
            })
    }

    /// What the delta means, built the plain way.
    fn expected(d: &proto::Delta) -> Vec<(String, FileCoverage)> {
        d.files
            .iter()
            .map(|f| {
                let mut b = FileBuilder::new();
                let mut line = 0;
                for (gap, hits) in f.line_gaps.iter().zip(&f.hits) {
                    line += gap;
                    b.line(line, *hits);
                }
                for br in &f.branches {
                    let arm = match br.label.as_str() {
                        "" => BranchArm::Index(br.branch),
                        l => BranchArm::Label(l.into()),
                    };
                    let key = BranchKey {
                        line: br.line,
                        block: br.block,
                        arm,
                    };
                    b.branch(key, br.taken);
                }
                let mut arm_line = 0;
                for (j, gap) in f.arm_line_gaps.iter().enumerate() {
                    arm_line += gap;
                    let key = BranchKey {
                        line: arm_line,
                        block: f.arm_blocks[j],
                        arm: BranchArm::Index(f.arm_numbers[j]),
                    };
                    b.branch(key, f.arm_taken[j].checked_sub(1));
                }
                for func in &f.functions {
                    b.function(&func.name, func.start_line, func.end_line, func.hits);
                }
                let mut file = b.build();
                let mut tests: Vec<(Arc<str>, roaring::RoaringBitmap)> = f
                    .tests
                    .iter()
                    .map(|t| {
                        let mut line = 0;
                        let lines = t.line_gaps.iter().map(|g| {
                            line += g;
                            line
                        });
                        (Arc::from(t.test.as_str()), lines.collect())
                    })
                    .collect();
                if let Some(t) = &d.test {
                    tests.push((Arc::from(t.name.as_str()), file.covered().clone()));
                }
                file.set_tests(tests);
                (f.path.clone(), file)
            })
            .collect()
    }

    fn read_default(bytes: &[u8]) -> Result<Delta, Error> {
        read(bytes, &Limits::default())
    }

    #[test]
    fn both_arm_forms_read_back_as_the_file_and_columns_are_smaller() {
        use crate::rpc::convert::{ArmForm, file_to_proto};
        let mut b = FileBuilder::new();
        b.line(3, 1);
        b.line(9, 0);
        let arm = |line, block, arm| BranchKey { line, block, arm };
        for (n, taken) in [(0, Some(5)), (1, Some(0)), (2, None)] {
            b.branch(arm(3, 0, BranchArm::Index(n)), taken);
        }
        // An exception arm, an arm whose count leaves no room for the columns' +1, labels.
        b.branch(arm(3, 1 << 31, BranchArm::Index(0)), Some(2));
        b.branch(arm(9, 0, BranchArm::Index(0)), Some(u64::MAX));
        b.branch(
            arm(9, 0, BranchArm::Label("jump to line 12".into())),
            Some(1),
        );
        for line in 20..60 {
            b.branch(arm(line, 0, BranchArm::Index(line % 3)), Some(1));
        }
        let file = b.build();
        let mut sizes = Vec::new();
        for form in [ArmForm::Columns, ArmForm::Messages] {
            let delta = proto::Delta {
                seq: 1,
                files: vec![file_to_proto("a.c".into(), &file, form)],
                test: None,
            };
            let bytes = delta.encode_to_vec();
            sizes.push(bytes.len());
            let files = read_default(&bytes).unwrap().files.to_files();
            assert_eq!(files, vec![("a.c".to_string(), file.clone())], "{form:?}");
        }
        assert!(
            sizes[0] * 3 < sizes[1] * 2,
            "columns {} vs messages {}",
            sizes[0],
            sizes[1]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn reads_what_prost_encodes(d in delta()) {
            let bytes = d.encode_to_vec();
            let read = read_default(&bytes).unwrap();
            prop_assert_eq!(read.seq, d.seq);
            prop_assert_eq!(read.files.to_files(), expected(&d));
        }

        #[test]
        fn damaged_bytes_are_refused_or_read_as_prost_reads_them(
            d in delta(),
            cut in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let mut bytes = d.encode_to_vec();
            for (at, byte) in flips {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            let keep = if bytes.is_empty() { 0 } else { cut.index(bytes.len() + 1) };
            bytes.truncate(keep);
            // Never a panic; whatever this reader accepts, prost decodes too.
            if let Ok(read) = read_default(&bytes) {
                let theirs = proto::Delta::decode(&bytes[..]);
                prop_assert!(theirs.is_ok(), "accepted what prost refuses");
                prop_assert_eq!(read.seq, theirs.unwrap().seq);
            }
        }
    }

    /// The comparison above runs only for damaged bytes this reader accepts: here are some
    /// that it must accept, and read as prost does (a count changed in place, a delta cut
    /// between two files, a file's path changed to another valid one).
    #[test]
    fn damaged_bytes_that_are_still_a_delta_are_read_as_prost_reads_them() {
        let file = |path: &str, hits: u64| proto::FileDelta {
            path: path.into(),
            line_gaps: vec![1, 2],
            hits: vec![hits, 1],
            ..Default::default()
        };
        let d = proto::Delta {
            seq: 3,
            files: vec![file("a.c", 5), file("b.c", 6)],
            test: None,
        };
        let bytes = d.encode_to_vec();
        let at = |needle: &[u8]| {
            bytes
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap()
        };
        let mut count = bytes.clone();
        let five = at(&[2, 5, 1]) + 1;
        count[five] = 9;
        let cut = bytes[..at(b"b.c") - 4].to_vec();
        let mut renamed = bytes.clone();
        renamed[at(b"b.c")] = b'z';
        for damaged in [count, cut, renamed] {
            let read = read_default(&damaged).expect("still a delta");
            let theirs = proto::Delta::decode(&damaged[..]).unwrap();
            assert_eq!(read.seq, theirs.seq);
            let paths: Vec<String> = read.files.to_files().into_iter().map(|(p, _)| p).collect();
            let their_paths: Vec<String> = theirs.files.iter().map(|f| f.path.clone()).collect();
            assert_eq!(paths, their_paths);
            let hits: Vec<u64> = read
                .files
                .to_files()
                .iter()
                .flat_map(|(_, f)| f.line_hits().map(|(_, h)| h).collect::<Vec<_>>())
                .collect();
            let their_hits: Vec<u64> = theirs.files.iter().flat_map(|f| f.hits.clone()).collect();
            assert_eq!(hits, their_hits);
        }
    }

    #[test]
    fn unpacked_numbers_unknown_fields_and_repeats_follow_protobuf() {
        // FileDelta by hand: path twice (the last wins), line gaps 3 and 2 unpacked, hits
        // packed, an unknown varint field 11, an unknown fixed64 field 12, and one arm with its
        // columns unpacked (line 4, block 1, number 2, taken 6).
        let mut file = vec![0x0a, 1, b'x', 0x0a, 3, b'a', b'.', b'c'];
        file.extend([0x10, 3, 0x10, 2]);
        file.extend([0x1a, 2, 5, 0]);
        file.extend([0x58, 0x7f]);
        file.extend([0x61, 1, 2, 3, 4, 5, 6, 7, 8]);
        file.extend([0x38, 4, 0x40, 1, 0x48, 2, 0x50, 7]);
        let mut delta = vec![0x08, 7, 0x12, file.len() as u8];
        delta.extend(&file);
        let read = read_default(&delta).unwrap();
        assert_eq!(read.seq, 7);
        let files = read.files.to_files();
        assert_eq!(files[0].0, "a.c");
        assert_eq!(
            files[0].1.line_hits().collect::<Vec<_>>(),
            vec![(3, 5), (5, 0)]
        );
        let arm = BranchKey {
            line: 4,
            block: 1,
            arm: BranchArm::Index(2),
        };
        assert_eq!(files[0].1.branches(), &[(arm, Some(6))]);
        // What prost makes of the same bytes.
        let theirs = proto::Delta::decode(&delta[..]).unwrap();
        assert_eq!(files, expected(&theirs));
    }

    #[test]
    fn refusals_name_the_byte_or_the_field() {
        let cases: [(&[u8], &str, &str); 6] = [
            (
                &[0x12, 0x05, 0x0a],
                "delta",
                "a length runs past the end (byte 2)",
            ),
            (&[0x08], "delta", "a varint runs past the end"),
            (&[0x4b], "delta", "groups"),
            (&[0x0a, 0x00], "delta", "wrong wire type"),
            (&[0x12, 0x03, 0x0a, 0x01, 0xff], "delta", "not UTF-8"),
            (
                &[0x12, 0x07, 0x0a, 0x01, b'a', 0x10, 0x00, 0x18, 0x01],
                "delta.files[0].line_gaps[0]",
                "line 0",
            ),
        ];
        for (bytes, field, needle) in cases {
            let e = read_default(bytes).expect_err(needle).to_string();
            assert!(e.contains(field) && e.contains(needle), "{bytes:?}: {e}");
        }
    }
}
