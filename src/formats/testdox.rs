//! PHPUnit 9's testdox XML (`phpunit --testdox-xml FILE`): a `<test>` per test with its class,
//! method (with the data set's name) and PHPUnit's own status code, the one input that tells
//! an incomplete test (`markTestIncomplete`) from a skipped one; its JUnit log writes both as
//! `<skipped/>`. It has no assertion counts and no suites. PHPUnit 10 removed it.
//!
//! A test reads as the JUnit log of the same run names it (the class with dots, as JUnit's
//! `classname`; the method with its data set), so that a push with both reports counts each
//! test once (see `cli::push`) and a project's history is one whichever it pushes.
//!
//! PHPUnit 9.6's writer leaves the file empty when it fails (a data provider that throws, is
//! empty, or skips): that reads as an error, never as a run without tests.

use std::io::BufRead;

use quick_xml::events::Event;

use super::ParseError;
use crate::model::{TestCase, TestStatus};

/// Whether the start of a file looks like testdox XML: its root element is `<tests>`.
pub fn detect(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let mut t = text.trim_start_matches('\u{feff}').trim_start();
    if t.starts_with("<?xml") {
        match t.find("?>") {
            Some(end) => t = t[end + 2..].trim_start(),
            None => return false,
        }
    }
    t.strip_prefix("<tests")
        .and_then(|rest| rest.chars().next())
        .is_some_and(|c| c == '>' || c == '/' || c.is_whitespace())
}

/// PHPUnit 9's `BaseTestRunner::STATUS_*` codes, as the status covd keeps. A risky test (5:
/// no assertion, unexpected output…) passed as far as PHPUnit is concerned: it does not fail
/// the run unless asked to (`--fail-on-risky`), though its JUnit log writes it as an
/// `<error>`. A warning (6: a deprecated assertion, a missing `@depends`) fails the run, and
/// no assertion failed: errored, as the JUnit log has it. Unknown (-1): PHPUnit kept no
/// outcome, so the test did not pass.
fn status(code: &str) -> Option<TestStatus> {
    Some(match code.trim() {
        "0" | "5" => TestStatus::Passed,
        "1" => TestStatus::Skipped,
        "2" => TestStatus::Incomplete,
        "3" => TestStatus::Failed,
        "4" | "6" | "-1" => TestStatus::Errored,
        _ => return None,
    })
}

/// Reads every test, calling `on_case` for each.
pub fn read(input: impl BufRead, mut on_case: impl FnMut(TestCase)) -> Result<(), ParseError> {
    let mut reader = quick_xml::Reader::from_reader(input);
    let mut buf = Vec::new();
    let mut root = false;
    let mut closed = false;
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| ParseError::at_byte(at, format!("testdox XML: {e}")))?;
        let fail = |m: String| ParseError::at_byte(at, format!("testdox XML: {m}"));
        match event {
            Event::Eof => break,
            Event::Start(ref e) | Event::Empty(ref e) => match e.local_name().as_ref() {
                "tests" => {
                    root = true;
                    closed = matches!(event, Event::Empty(_));
                }
                "test" => {
                    let attr = |name: &str| super::xml_attr(e, name).map_err(&fail);
                    let class = attr("className")?
                        .ok_or_else(|| fail("<test> without a className".into()))?;
                    let name = attr("methodName")?
                        .ok_or_else(|| fail("<test> without a methodName".into()))?;
                    let code = attr("status")?
                        .ok_or_else(|| fail(format!("test `{name}` has no status")))?;
                    let status = status(&code).ok_or_else(|| {
                        fail(format!(
                            "test `{name}` has status `{code}`, not one of PHPUnit 9's (-1 to 6)"
                        ))
                    })?;
                    let duration =
                        super::junit::seconds(attr("time")?.as_deref()).map_err(&fail)?;
                    on_case(TestCase {
                        suite: class.replace('\\', "."),
                        name,
                        status,
                        duration,
                        assertions: None,
                    });
                }
                _ => {}
            },
            Event::End(e) if e.local_name().as_ref() == "tests" => closed = true,
            _ => {}
        }
        buf.clear();
    }
    if !root {
        return Err(ParseError::at_byte(
            0,
            "testdox XML: no <tests> element (PHPUnit 9 leaves the file empty when its testdox \
             writer fails, as it does on a data provider that throws, is empty or skips)",
        ));
    }
    if !closed {
        return Err(ParseError::at_byte(
            reader.buffer_position(),
            "testdox XML: the input ends before </tests> (truncated?)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(xml: &str) -> Result<Vec<TestCase>, ParseError> {
        let mut out = Vec::new();
        read(xml.as_bytes(), |c| out.push(c))?;
        Ok(out)
    }

    #[test]
    fn every_status_code_and_the_names_junit_gives() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<tests>
  <test className="App\FooTest" methodName="testA with data set #0" status="0" time="7.8377E-5"/>
  <test className="App\FooTest" methodName="b" status="1" time="0"/>
  <test className="App\FooTest" methodName="c" status="2" time="0"/>
  <test className="App\FooTest" methodName="d" status="3" time="0.5"><group name="default"/></test>
  <test className="App\FooTest" methodName="e" status="4"/>
  <test className="App\FooTest" methodName="f" status="5"/>
  <test className="App\FooTest" methodName="g" status="6"/>
  <test className="App\FooTest" methodName="h" status="-1"/>
</tests>
"#;
        assert!(detect(xml.as_bytes()));
        let cases = read_all(xml).unwrap();
        use TestStatus::*;
        let got: Vec<_> = cases.iter().map(|c| c.status).collect();
        assert_eq!(
            got,
            [
                Passed, Skipped, Incomplete, Failed, Errored, Passed, Errored, Errored
            ]
        );
        assert_eq!(
            (&*cases[0].suite, &*cases[0].name),
            ("App.FooTest", "testA with data set #0")
        );
        assert_eq!(
            cases[0].duration,
            std::time::Duration::from_secs_f64(7.8377e-5)
        );
        assert!(cases.iter().all(|c| c.assertions.is_none()));
        // A run without tests is not an error.
        assert!(
            read_all("<?xml version=\"1.0\"?>\n<tests/>\n")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn other_files_and_broken_reports_are_refused() {
        for other in [
            "<testsuites>",
            "<?xml version=\"1.0\"?><coverage generated=\"1\">",
            "<testsuite name=\"tests\">",
            "",
        ] {
            assert!(!detect(other.as_bytes()), "{other}");
        }
        for (xml, needle) in [
            ("", "no <tests> element"),
            (
                "<tests><test className=\"A\" methodName=\"m\" status=\"7\"/></tests>",
                "status `7`",
            ),
            (
                "<tests><test className=\"A\" status=\"0\"/></tests>",
                "without a methodName",
            ),
            (
                "<tests><test className=\"A\" methodName=\"m\"/></tests>",
                "has no status",
            ),
            (
                "<tests><test className=\"A\" methodName=\"m\" status=\"0\"/>",
                "truncated",
            ),
            (
                "<tests><test className=\"A\" methodName=\"m\" status=\"0\" time=\"x\"/></tests>",
                "not a number",
            ),
        ] {
            let e = read_all(xml).expect_err(xml);
            assert!(e.to_string().contains(needle), "{xml}: {e}");
        }
    }
}
