//! The records the data directory keeps: the protobuf messages of
//! `proto/covd/store/v1/records.proto`, generated into `OUT_DIR`.
//!
//! Protobuf because records must outlive releases: a reader skips fields it does not know and
//! gives absent fields their default, so a later release adds a field without a new format
//! and without making any existing directory unreadable, and an earlier release still reads
//! what a later one wrote (it only loses the fields it does not know). The project already
//! builds its protocol with prost; the positional postcard bodies of the first release had
//! neither property (see `legacy`). This breaks STYLE.md's "prost only at the gRPC edge" on
//! purpose: these messages are a storage schema of their own, not the protocol's types.

use std::time::Duration;

use crate::model::{TestCase, TestStatus as ModelStatus};

#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/covd.store.v1.rs"));
}

pub use generated::{
    AttemptRecord, BranchRecord, FileLinesRecord, FileListRecord, FileRecord, FilesRecord,
    FunctionRecord, MonthRecord, RunRecord, ShardLinesRecord, ShardRecord, StatRecord,
    SummaryRecord, TelemetryRecord, TestCaseRecord, TestHistoryRecord, TestLinesRecord,
    TestOutcome, TestRunOutcome, TestStatus, TokenRecord,
};

impl From<&TestCase> for TestCaseRecord {
    fn from(t: &TestCase) -> TestCaseRecord {
        let status = match t.status {
            ModelStatus::Passed => TestStatus::Passed,
            ModelStatus::Failed => TestStatus::Failed,
            ModelStatus::Skipped => TestStatus::Skipped,
            ModelStatus::Errored => TestStatus::Errored,
            ModelStatus::Incomplete => TestStatus::Incomplete,
        };
        TestCaseRecord {
            suite: t.suite.clone(),
            name: t.name.clone(),
            status: status as i32,
            duration_ns: u64::try_from(t.duration.as_nanos()).unwrap_or(u64::MAX),
            assertions: t.assertions,
        }
    }
}

impl TestCaseRecord {
    /// The test case. A status this release does not know (or none) reads as errored: a
    /// result nobody can name is not a pass.
    pub fn to_model(&self) -> TestCase {
        let status = match TestStatus::try_from(self.status) {
            Ok(TestStatus::Passed) => ModelStatus::Passed,
            Ok(TestStatus::Failed) => ModelStatus::Failed,
            Ok(TestStatus::Skipped) => ModelStatus::Skipped,
            Ok(TestStatus::Incomplete) => ModelStatus::Incomplete,
            Ok(TestStatus::Errored | TestStatus::Unspecified) | Err(_) => ModelStatus::Errored,
        };
        TestCase {
            suite: self.suite.clone(),
            name: self.name.clone(),
            status,
            duration: Duration::from_nanos(self.duration_ns),
            assertions: self.assertions,
        }
    }
}
