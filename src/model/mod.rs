//! The pure domain: what coverage is and how it merges. No I/O, no async, no wire types.
//!
//! - [`FileCoverage`]: one file's executable and covered lines (roaring bitmaps), summed hits,
//!   branches and functions, and [`FileCoverage::merge`], the one merge every layer uses
//!   ([`FileCoverage::merge_part`] adds a file of a batch the same way, in place when it can).
//! - [`FileBuilder`]: accumulates a file from records in any order (parsers use it).
//! - [`FileBatch`]: many files in flat columns, as a delta arrives; merged into an aggregate
//!   with [`FileCoverage::merge_part`].
//! - [`Coverage`]: many files by path, e.g. everything one input file held.
//! - [`path`]: path rules (strip, map, relative-to-root) and the check of hostile paths.

mod batch;
mod builder;
mod file;
pub mod path;
mod testrun;

use std::collections::BTreeMap;

pub use batch::{ArmName, ArmRef, BatchError, FileBatch, FilePart, FunctionRef};
pub use builder::FileBuilder;
pub use file::{FileCoverage, Function, Taken, add_taken, counted_arms};
pub use testrun::{TestCase, TestStatus};

/// Which branch of a block: numbered (gcc, llvm) or named (coverage.py's "jump to line 27").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BranchArm {
    Index(u32),
    Label(Box<str>),
}

impl std::fmt::Display for BranchArm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BranchArm::Index(i) => write!(f, "{i}"),
            BranchArm::Label(l) => f.write_str(l),
        }
    }
}

/// The flag in [`BranchKey::block`] that marks a line whose arms a tool reported only by
/// count, naming at most the arms it did not take (Cobertura's
/// `condition-coverage="50% (1/2)" missing-branches="27"`, from coverage.py). Such a line's
/// arms are `Index(0..taken)` for the taken ones and `Label` (the destination) for each missing
/// one, and they do not merge by sum: the same taken arm would be counted once per shard, since
/// nothing says which arm was taken. They merge by coverage.py's own rule instead: an arm is
/// missing iff every shard that reported the line missed it (see [`FileCoverage::merge`]).
/// Coverage of the toolz corpus' Cobertura shards merges to exactly coverage.py's combine.
pub const COUNTED_BLOCK: u32 = 1 << 30;

/// The flag in [`BranchKey::block`] that marks an exception branch (LCOV's `BRDA:12,e0,…`, from
/// lcov 2 and gcovr): blocks are small numbers, so the top bit is free, and the mark survives
/// merges and the writers.
pub const EXCEPTION_BLOCK: u32 = 1 << 31;

/// The largest block number a tool may give (a block id, or the column llvm-cov and Istanbul
/// key branches by): the bits above it are covd's flags.
pub const MAX_BLOCK: u32 = COUNTED_BLOCK - 1;

/// A block number as a reader found it, refused when it would set one of the flags (read back,
/// `BRDA:10,1073741824,0,1` would be a counted arm, and a column beyond 2^31 an exception).
pub fn block_number(n: u64, what: &str) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(b) if b <= MAX_BLOCK => Ok(b),
        _ => Err(format!(
            "{what} {n} is beyond the largest accepted ({MAX_BLOCK})"
        )),
    }
}

/// The function c8 (`--all`) names in the record it writes for a file no test process loaded:
/// every line 0, this one function at line 1, one untaken branch. Not a JavaScript identifier,
/// so no real function has it. Such a placeholder merges as istanbul's own merge does
/// (istanbul-lib-coverage's `FileCoverage.merge`, on its `all` flag): it gives way to any real
/// record of the file, and two of them are one (see `tests/fixtures/c8-placeholders`).
pub const PLACEHOLDER_FUNCTION: &str = "(empty-report)";

/// The identity of a branch within a file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BranchKey {
    pub line: u32,
    pub block: u32,
    pub arm: BranchArm,
}

/// Coverage counts of a file, a directory or a run. Percentages are computed by readers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub files: u64,
    pub lines: u64,
    pub lines_covered: u64,
    pub branches: u64,
    pub branches_taken: u64,
    pub functions: u64,
    pub functions_hit: u64,
}

impl Totals {
    /// `self - earlier`, field by field (for counts that only grow; saturates at 0).
    pub fn minus(&self, earlier: &Totals) -> Totals {
        Totals {
            files: self.files.saturating_sub(earlier.files),
            lines: self.lines.saturating_sub(earlier.lines),
            lines_covered: self.lines_covered.saturating_sub(earlier.lines_covered),
            branches: self.branches.saturating_sub(earlier.branches),
            branches_taken: self.branches_taken.saturating_sub(earlier.branches_taken),
            functions: self.functions.saturating_sub(earlier.functions),
            functions_hit: self.functions_hit.saturating_sub(earlier.functions_hit),
        }
    }
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Totals) {
        self.files += o.files;
        self.lines += o.lines;
        self.lines_covered += o.lines_covered;
        self.branches += o.branches;
        self.branches_taken += o.branches_taken;
        self.functions += o.functions;
        self.functions_hit += o.functions_hit;
    }
}

/// Coverage of many files, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    pub files: BTreeMap<String, FileCoverage>,
}

impl Coverage {
    /// Merges one file's coverage in (several records for one path are summed).
    pub fn add(&mut self, path: &str, file: &FileCoverage) {
        match self.files.get_mut(path) {
            Some(existing) => existing.merge(file),
            None => {
                self.files.insert(path.to_owned(), file.clone());
            }
        }
    }

    pub fn merge(&mut self, other: &Coverage) {
        for (path, file) in &other.files {
            self.add(path, file);
        }
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for f in self.files.values() {
            t += f.totals();
        }
        t
    }
}

/// The largest line number accepted anywhere. Real sources stay far below it; a larger number
/// is a corrupt or hostile input, and refusing it keeps bitmaps and hit vectors bounded.
pub const MAX_LINE: u32 = 10_000_000;
