//! JUnit XML from the real tools (fixtures in `tests/fixtures/junit/`, made by each tool; see
//! the README there for what each holds): every test case read with the outcome the tool
//! wrote, whatever the suites' own counts say.

use covd::formats::junit;
use covd::model::{TestCase, TestStatus};

use crate::cli::Served;
use crate::support::*;

fn read(rel: &str) -> (Vec<TestCase>, Vec<(String, String)>) {
    let file = std::fs::File::open(fixture(rel)).unwrap();
    let mut cases = Vec::new();
    let tools = junit::read(std::io::BufReader::new(file), |c| cases.push(c)).unwrap();
    (cases, tools)
}

/// Passed, failed, skipped, errored.
fn counts(cases: &[TestCase]) -> [usize; 4] {
    let n = |s: TestStatus| cases.iter().filter(|c| c.status == s).count();
    [
        n(TestStatus::Passed),
        n(TestStatus::Failed),
        n(TestStatus::Skipped),
        n(TestStatus::Errored),
    ]
}

fn status_of(cases: &[TestCase], name: &str) -> TestStatus {
    let found: Vec<_> = cases.iter().filter(|c| c.name == name).collect();
    assert_eq!(found.len(), 1, "{name}: {found:?}");
    found[0].status
}

#[test]
fn jest_junit() {
    let (cases, tools) = read("junit/jest/jest-junit.xml");
    // 19 cases; the suite says tests="16" failures="7" (it leaves out the hooks' cases).
    assert_eq!(counts(&cases), [10, 8, 1, 0]);
    assert!(tools.is_empty());
    // The case jest-junit adds for a failing afterAll, its name starting with a space.
    let hook: Vec<_> = cases
        .iter()
        .filter(|c| c.name.starts_with(" Test execution failure"))
        .collect();
    assert_eq!(hook.len(), 1);
    assert_eq!(hook[0].status, TestStatus::Failed);
    // With its options, a file that fails to load is a suite of its own, with an error.
    let (cases, _) = read("junit/jest/jest-junit-options.xml");
    assert_eq!(counts(&cases), [10, 9, 1, 1]);
}

#[test]
fn maven_surefire() {
    let dir = fixture("junit/surefire/reports");
    let mut all = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 6);
    for name in names {
        let (cases, tools) = read(&format!("junit/surefire/reports/{name}"));
        // Of the 50 system properties, only the Java version is a tag.
        assert_eq!(tools, [("java".to_owned(), "17.0.15".to_owned())], "{name}");
        all.extend(cases);
    }
    assert_eq!(counts(&all), [5, 4, 3, 4]);
    assert_eq!(status_of(&all, "failsAnAssumption"), TestStatus::Skipped);
    assert_eq!(status_of(&all, "throwsAnException"), TestStatus::Errored);
    assert_eq!(
        status_of(&all, "squares[2: square(3) = 10]"),
        TestStatus::Failed
    );
    // A failing @BeforeClass is one case named after the class.
    let before_class: Vec<_> = all
        .iter()
        .filter(|c| c.suite == "covd.sample.BrokenBeforeClassTest")
        .collect();
    assert_eq!(before_class.len(), 1);
    assert_eq!(before_class[0].status, TestStatus::Errored);
}

#[test]
fn go_junit_report() {
    for file in ["go-junit.xml", "go-junit-gojson.xml", "go-junit-cover.xml"] {
        let (cases, tools) = read(&format!("junit/go-junit-report/{file}"));
        assert_eq!(cases.len(), 20, "{file}");
        assert_eq!(counts(&cases), [11, 6, 2, 1], "{file}");
        assert!(tools.is_empty(), "{file}: {tools:?}");
        assert_eq!(status_of(&cases, "[build failed]"), TestStatus::Errored);
        assert_eq!(status_of(&cases, "TestAbs/negative"), TestStatus::Failed);
        assert_eq!(
            status_of(&cases, "TestAbs/nested/deep_skip"),
            TestStatus::Skipped
        );
        assert_eq!(status_of(&cases, "TestPanics"), TestStatus::Failed);
        assert!(
            cases
                .iter()
                .all(|c| c.suite.starts_with("example.com/covd/gosample/")),
            "{file}"
        );
    }
}

#[test]
fn phpunit_with_every_outcome() {
    let (cases, tools) = read("junit/phpunit-outcomes/junit.xml");
    assert!(tools.is_empty());
    // PHPUnit: 5 errors, 1 risky (an <error>), 2 warnings, 2 failures, 3 skipped and 1
    // incomplete (both <skipped/>).
    assert_eq!(counts(&cases), [9, 2, 4, 8]);
    assert_eq!(status_of(&cases, "testIsIncomplete"), TestStatus::Skipped);
    assert_eq!(status_of(&cases, "testIsRisky"), TestStatus::Errored);
    assert_eq!(status_of(&cases, "testHasWarning"), TestStatus::Errored);
    let asserted = |name: &str| cases.iter().find(|c| c.name == name).unwrap().assertions;
    assert_eq!(asserted("testPassesWithThreeAssertions"), Some(3));
    assert_eq!(asserted("testIsRisky"), Some(0));
    let total: u64 = cases.iter().filter_map(|c| c.assertions).sum();
    assert_eq!(total, 14, "the suite's assertions=\"14\"");
    // Without risky-test reports, the risky test is a plain pass.
    let (cases, _) = read("junit/phpunit-outcomes/junit-no-risky.xml");
    assert_eq!(counts(&cases), [10, 2, 4, 7]);
}

/// Pushed with coverage, the results of several tools add up in the shard's telemetry: the
/// counts, PHPUnit's assertions, and Surefire's Java version as a tag.
#[test]
fn pushed_results_carry_assertions_and_the_tools() {
    let served = Served::start();
    let mut push = served.covd(&["push", "--run", "t", "--shard", "0"]);
    push.arg(fixture("junit/phpunit-outcomes/clover.xml"))
        .arg(fixture("junit/phpunit-outcomes/junit.xml"));
    for entry in std::fs::read_dir(fixture("junit/surefire/reports")).unwrap() {
        push.arg(entry.unwrap().path());
    }
    let r = push.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let s = served.covd(&["status", "--run", "t"]).output().unwrap();
    let out = String::from_utf8_lossy(&s.stdout);
    assert!(
        out.contains("tests 14 passed, 6 failed, 7 skipped, 12 errored, 14 assertions"),
        "{out}"
    );
    assert!(out.contains("java=17.0.15"), "{out}");
}

/// PHPUnit 9's testdox XML (`phpunit-testdox/`, one run that wrote it and its JUnit log):
/// incomplete tests apart from skipped ones, risky ones as PHPUnit judges them (passed). Pushed
/// with the JUnit log of the same run, each test counts once, with the testdox outcome and the
/// JUnit log's assertions. An empty report (the writer crashed) is refused, saying so.
#[test]
fn phpunit_testdox_tells_incomplete_tests_apart() {
    let file = std::fs::File::open(fixture("junit/phpunit-testdox/testdox.xml")).unwrap();
    let mut cases = Vec::new();
    covd::formats::testdox::read(std::io::BufReader::new(file), |c| cases.push(c)).unwrap();
    // The README's table: 5 passed and 1 risky, 2 failures, 2 skipped, 1 error and 2
    // warnings, 2 incomplete.
    assert_eq!(counts(&cases), [6, 2, 2, 3]);
    let incomplete: Vec<_> = cases
        .iter()
        .filter(|c| c.status == TestStatus::Incomplete)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        incomplete,
        ["testIsIncomplete", "testIsIncompleteAfterAnAssertion"]
    );
    assert_eq!(status_of(&cases, "testIsRisky"), TestStatus::Passed);
    assert_eq!(
        status_of(&cases, "testCountsBooks with data set #2"),
        TestStatus::Failed
    );
    let (junit, _) = read("junit/phpunit-testdox/junit.xml");
    let key = |c: &TestCase| (c.suite.clone(), c.name.clone());
    let mut named: Vec<_> = cases.iter().map(key).collect();
    let mut junit_named: Vec<_> = junit.iter().map(key).collect();
    named.sort();
    junit_named.sort();
    assert_eq!(named, junit_named, "both reports name the tests alike");

    let served = Served::start();
    let push = |shard: &str, files: &[&str]| {
        let mut push = served.covd(&["push", "--run", "t", "--shard", shard]);
        push.args(
            files
                .iter()
                .map(|f| fixture(&format!("junit/phpunit-testdox/{f}"))),
        );
        push.output().unwrap()
    };
    for (shard, files) in [
        ("testdox", &["testdox.xml"][..]),
        ("junit", &["junit.xml"]),
        ("both", &["junit.xml", "testdox.xml"]),
    ] {
        let r = push(shard, files);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let out = served.ok(&["status", "--run", "t"]);
    let tests = |shard: &str| {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("shard {shard} ")))
            .unwrap_or_else(|| panic!("{shard}: {out}"));
        let from = line.find("tests ").unwrap_or_else(|| panic!("{line}"));
        line[from..].split("  ").next().unwrap().to_owned()
    };
    assert_eq!(
        tests("testdox"),
        "tests 6 passed, 2 failed, 2 skipped, 3 errored, 2 incomplete"
    );
    assert_eq!(
        tests("junit"),
        "tests 5 passed, 2 failed, 4 skipped, 4 errored, 21 assertions"
    );
    assert_eq!(
        tests("both"),
        "tests 6 passed, 2 failed, 2 skipped, 3 errored, 2 incomplete, 21 assertions"
    );

    let r = push("crashed", &["testdox-crashed.xml"]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("testdox-crashed.xml is empty") && err.contains("PHPUnit 9"),
        "{err}"
    );
}
