//! covd's JSON report, written one file at a time. The schema (version 1):
//!
//! ```text
//! {
//!   "format": "covd", "version": 1,
//!   "complete": bool, "missing_shards": [string],   // completeness when exported
//!   "totals": Totals,
//!   "files": [ {
//!     "path": string, "totals": Totals,
//!     "lines": [[line, hits], …],                   // every executable line, ascending
//!     "branches": [ {"line": n, "block": n, "branch": n | string, "taken": n | null}, … ],
//!     "functions": [ {"name": string, "start_line": n, "end_line": n, "hits": n}, … ],
//!     "tests": { "<test name>": [line, …], … }      // per-test attribution; {} without
//!   } … ]
//! }
//! Totals = {"files", "lines", "lines_covered", "branches", "branches_taken",
//!           "functions", "functions_hit"}: counts; percentages are the reader's to compute.
//! `taken: null` is a branch whose block never ran; `end_line`/`start_line` 0 mean unknown.
//! ```

use std::io::{self, Write};

use serde::Serialize;

use crate::model::{BranchArm, FileCoverage, Totals};

#[derive(Serialize)]
struct TotalsJson {
    files: u64,
    lines: u64,
    lines_covered: u64,
    branches: u64,
    branches_taken: u64,
    functions: u64,
    functions_hit: u64,
}

impl From<Totals> for TotalsJson {
    fn from(t: Totals) -> TotalsJson {
        TotalsJson {
            files: t.files,
            lines: t.lines,
            lines_covered: t.lines_covered,
            branches: t.branches,
            branches_taken: t.branches_taken,
            functions: t.functions,
            functions_hit: t.functions_hit,
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum ArmJson<'a> {
    Index(u32),
    Label(&'a str),
}

#[derive(Serialize)]
struct BranchJson<'a> {
    line: u32,
    block: u32,
    branch: ArmJson<'a>,
    taken: Option<u64>,
}

#[derive(Serialize)]
struct FunctionJson<'a> {
    name: &'a str,
    start_line: u32,
    end_line: u32,
    hits: u64,
}

#[derive(Serialize)]
struct FileJson<'a> {
    path: &'a str,
    totals: TotalsJson,
    lines: Vec<(u32, u64)>,
    branches: Vec<BranchJson<'a>>,
    functions: Vec<FunctionJson<'a>>,
    tests: std::collections::BTreeMap<&'a str, Vec<u32>>,
}

/// Streams the report: `begin`, `file` for each file, `finish`.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    first: bool,
}

impl<W: Write> Writer<W> {
    pub fn begin(
        mut out: W,
        totals: Totals,
        complete: bool,
        missing: &[String],
    ) -> io::Result<Writer<W>> {
        write!(
            out,
            r#"{{"format":"covd","version":1,"complete":{complete},"missing_shards":"#
        )?;
        serde_json::to_writer(&mut out, missing)?;
        out.write_all(br#","totals":"#)?;
        serde_json::to_writer(&mut out, &TotalsJson::from(totals))?;
        out.write_all(br#","files":["#)?;
        Ok(Writer { out, first: true })
    }

    pub fn file(&mut self, path: &str, f: &FileCoverage) -> io::Result<()> {
        if !self.first {
            self.out.write_all(b",")?;
        }
        self.first = false;
        let record = FileJson {
            path,
            totals: f.totals().into(),
            lines: f.line_hits().collect(),
            branches: f
                .branches()
                .iter()
                .map(|(k, taken)| BranchJson {
                    line: k.line,
                    block: k.block,
                    branch: match &k.arm {
                        BranchArm::Index(i) => ArmJson::Index(*i),
                        BranchArm::Label(l) => ArmJson::Label(l),
                    },
                    taken: *taken,
                })
                .collect(),
            functions: f
                .functions()
                .iter()
                .map(|x| FunctionJson {
                    name: &x.name,
                    start_line: x.start_line,
                    end_line: x.end_line,
                    hits: x.hits,
                })
                .collect(),
            tests: f
                .tests()
                .iter()
                .map(|(name, lines)| (&**name, lines.iter().collect()))
                .collect(),
        };
        serde_json::to_writer(&mut self.out, &record)?;
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(b"]}\n")?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BranchKey, FileBuilder};

    #[test]
    fn writes_the_documented_schema() {
        let mut b = FileBuilder::new();
        b.line(3, 7);
        b.branch(
            BranchKey {
                line: 3,
                block: 0,
                arm: BranchArm::Label("jump to line 5".into()),
            },
            None,
        );
        b.function("f", 3, 9, 7);
        let f = b.build();
        let mut w = Writer::begin(Vec::new(), f.totals(), false, &["2".into()]).unwrap();
        w.file("a.py", &f).unwrap();
        w.file("b.py", &f).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&w.finish().unwrap()).unwrap();
        assert_eq!(v["format"], "covd");
        assert_eq!(v["missing_shards"][0], "2");
        assert_eq!(v["totals"]["lines_covered"], 1);
        assert_eq!(v["files"][1]["path"], "b.py");
        assert_eq!(v["files"][0]["lines"][0], serde_json::json!([3, 7]));
        assert_eq!(v["files"][0]["branches"][0]["branch"], "jump to line 5");
        assert!(v["files"][0]["branches"][0]["taken"].is_null());
        assert_eq!(v["files"][0]["functions"][0]["end_line"], 9);
    }
}
