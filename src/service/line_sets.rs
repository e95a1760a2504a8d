//! Set algebra over covered lines: union, intersection and difference of what runs, their
//! shards, the runs of a commit that carry a flag, or tests covered, or what runs measured
//! ("covered by the integration run but not by unit", "lines covered only by shard 7", "lines
//! only test T covers"), file by file.

use std::collections::HashMap;
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::{CoverageService, Error, Result};
use crate::aggregate::Aggregate;

/// Most operands in one expression.
pub const MAX_OPERANDS: usize = 64;

/// A set of lines, per file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineSet {
    /// The lines run `.0` covered.
    Covered(String),
    /// The lines run `.0` measured (covered or not).
    Measured(String),
    /// The lines one test of a run covered.
    Test {
        run: String,
        test: String,
    },
    /// The lines any named test of run `.0` covered.
    Tests(String),
    /// The lines one shard of a run covered (its current attempt).
    Shard {
        run: String,
        shard: String,
    },
    /// The lines the runs of a commit that carry a flag covered, together (`project` empty:
    /// of any project).
    Flag {
        project: String,
        commit: String,
        flag: String,
    },
    /// The lines tests of a run other than `test` covered.
    TestsExcept {
        run: String,
        test: String,
    },
    Union(Box<LineSet>, Box<LineSet>),
    Intersection(Box<LineSet>, Box<LineSet>),
    Difference(Box<LineSet>, Box<LineSet>),
}

type Files = HashMap<Arc<str>, RoaringBitmap>;

impl LineSet {
    /// The operands, left to right.
    fn operands(&self) -> Vec<&LineSet> {
        match self {
            LineSet::Union(a, b) | LineSet::Intersection(a, b) | LineSet::Difference(a, b) => {
                let mut all = a.operands();
                all.extend(b.operands());
                all
            }
            leaf => vec![leaf],
        }
    }

    /// Combines the operands' values (in [`LineSet::operands`] order).
    fn combine(&self, values: &mut impl Iterator<Item = Files>) -> Files {
        let (op, a, b) = match self {
            LineSet::Union(a, b) => (0, a, b),
            LineSet::Intersection(a, b) => (1, a, b),
            LineSet::Difference(a, b) => (2, a, b),
            _ => return values.next().unwrap_or_default(),
        };
        let mut left = a.combine(values);
        let mut right = b.combine(values);
        match op {
            0 => {
                for (path, lines) in right {
                    *left.entry(path).or_default() |= lines;
                }
                left
            }
            1 => {
                left.retain(|path, lines| match right.remove(path) {
                    Some(r) => {
                        *lines &= r;
                        !lines.is_empty()
                    }
                    None => false,
                });
                left
            }
            _ => {
                left.retain(|path, lines| {
                    if let Some(r) = right.get(path) {
                        *lines -= r;
                    }
                    !lines.is_empty()
                });
                left
            }
        }
    }
}

impl CoverageService {
    /// The lines of `set` in the files under `path` (a file or a directory; empty: every
    /// file), sorted by path.
    pub async fn line_set(
        &self,
        set: LineSet,
        path: &str,
    ) -> Result<Vec<(Arc<str>, RoaringBitmap)>> {
        let operands = set.operands();
        if operands.len() > MAX_OPERANDS {
            return Err(Error::invalid(
                "expression",
                format!("{} operands; at most {MAX_OPERANDS}", operands.len()),
            ));
        }
        let mut values = Vec::with_capacity(operands.len());
        for operand in operands {
            values.push(self.operand(operand).await?);
        }
        let files = set.combine(&mut values.into_iter());
        let prefix = path.trim_end_matches('/');
        let mut out: Vec<(Arc<str>, RoaringBitmap)> = files
            .into_iter()
            .filter(|(p, lines)| {
                !lines.is_empty()
                    && (prefix.is_empty()
                        || **p == *prefix
                        || p.strip_prefix(prefix).is_some_and(|r| r.starts_with('/')))
            })
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn operand(&self, operand: &LineSet) -> Result<Files> {
        match operand {
            LineSet::Shard { run, shard } => {
                let run = self.run(run)?;
                let (service, shard) = (self.clone(), shard.clone());
                let lines =
                    tokio::task::spawn_blocking(move || service.lines_of_shard(&run, &shard))
                        .await
                        .map_err(|e| {
                            Error::Unavailable(format!("reading a shard's lines failed: {e}"))
                        })??;
                return Ok(lines.into_iter().collect());
            }
            LineSet::Flag {
                project,
                commit,
                flag,
            } => return self.flag_lines(project, commit, flag).await,
            _ => {}
        }
        let run = match operand {
            LineSet::Covered(run)
            | LineSet::Measured(run)
            | LineSet::Tests(run)
            | LineSet::Test { run, .. }
            | LineSet::TestsExcept { run, .. } => run.clone(),
            _ => unreachable!("operands are leaves, shards and flags are read above"),
        };
        let leaf = operand.clone();
        let value = self
            .read(&run, "lines", move |a| leaf_value(a, &leaf))
            .await?;
        value.ok_or_else(|| match operand {
            LineSet::Test { run, test } | LineSet::TestsExcept { run, test } => {
                Error::TestNotFound {
                    run: run.clone(),
                    test: test.clone(),
                }
            }
            _ => Error::RunNotFound(run),
        })
    }
}

impl CoverageService {
    /// The lines the runs of `commit` (of `project`, if not empty) that carry `flag` covered.
    async fn flag_lines(&self, project: &str, commit: &str, flag: &str) -> Result<Files> {
        for (field, value) in [("flag.commit", commit), ("flag.flag", flag)] {
            if value.is_empty() {
                return Err(Error::invalid(field, "must not be empty"));
            }
        }
        // The runs first, then each one's state: no run lock is taken inside the map's.
        let runs: Vec<_> = self.shared.runs.iter().map(|r| r.value().clone()).collect();
        let runs: Vec<String> = runs
            .into_iter()
            .filter(|r| {
                let state = r.state();
                let p = &state.params;
                p.commit == commit
                    && p.flags.contains(flag)
                    && (project.is_empty() || p.project == project)
            })
            .map(|r| r.id.clone())
            .collect();
        if runs.is_empty() {
            return Err(Error::FlagNotFound {
                commit: commit.to_owned(),
                flag: flag.to_owned(),
            });
        }
        let mut all = Files::new();
        for run in runs {
            let leaf = LineSet::Covered(run.clone());
            let lines = match self
                .read(&run, "lines", move |a| leaf_value(a, &leaf))
                .await
            {
                Ok(lines) => lines.unwrap_or_default(),
                // Deleted since it was listed.
                Err(Error::RunNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            for (path, lines) in lines {
                *all.entry(path).or_default() |= lines;
            }
        }
        Ok(all)
    }
}

/// One operand's lines; `None` for a test the run has not seen.
fn leaf_value(a: &Aggregate, leaf: &LineSet) -> Option<Files> {
    Some(match leaf {
        LineSet::Covered(_) => a
            .all_file_lines()
            .into_iter()
            .map(|(p, (_, c))| (p, c))
            .collect(),
        LineSet::Measured(_) => a
            .all_file_lines()
            .into_iter()
            .map(|(p, (m, _))| (p, m))
            .collect(),
        LineSet::Test { test, .. } => a.lines_of_test(test)?.into_iter().collect(),
        LineSet::Tests(_) => a.tested_lines(None).into_iter().collect(),
        LineSet::TestsExcept { test, .. } => {
            a.lines_of_test(test)?;
            a.tested_lines(Some(test)).into_iter().collect()
        }
        _ => Files::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &[u32])]) -> Files {
        list.iter()
            .map(|(p, l)| (Arc::from(*p), l.iter().copied().collect()))
            .collect()
    }

    fn sorted(f: Files) -> Vec<(String, Vec<u32>)> {
        let mut v: Vec<_> = f
            .into_iter()
            .map(|(p, l)| (p.to_string(), l.iter().collect()))
            .collect();
        v.sort();
        v
    }

    /// `(a | b) & c - d`, evaluated file by file; a file left with no line is left out.
    #[test]
    fn operators_combine_file_by_file() {
        let leaf = |r: &str| Box::new(LineSet::Covered(r.into()));
        let expr = LineSet::Difference(
            Box::new(LineSet::Intersection(
                Box::new(LineSet::Union(leaf("a"), leaf("b"))),
                leaf("c"),
            )),
            leaf("d"),
        );
        assert_eq!(expr.operands().len(), 4);
        let values = vec![
            files(&[("x", &[1, 2]), ("y", &[1])]),
            files(&[("x", &[3]), ("z", &[5])]),
            files(&[("x", &[2, 3, 4]), ("y", &[1]), ("z", &[6])]),
            files(&[("x", &[3]), ("y", &[1])]),
        ];
        let got = sorted(expr.combine(&mut values.into_iter()));
        assert_eq!(got, [("x".to_owned(), vec![2])]);
    }
}
