//! What a shard's test run reported: each test case's outcome and duration.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestStatus {
    Passed,
    Failed,
    Skipped,
    Errored,
    /// Started but did not reach a verdict of its own: PHPUnit's `markTestIncomplete`.
    Incomplete,
}

/// One test case's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestCase {
    /// The suite or class, empty when the tool gave none.
    pub suite: String,
    pub name: String,
    pub status: TestStatus,
    pub duration: Duration,
    /// The assertions it made, when the tool counts them (PHPUnit does).
    pub assertions: Option<u64>,
}
