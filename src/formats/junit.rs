//! JUnit XML test results in (pytest, mocha's xunit, Maven Surefire, Go's junit reporters…):
//! each `<testcase>` with its suite, name, status and duration. The counts come from the test
//! cases themselves, not from the suites' attributes, which some writers get wrong (mocha's
//! say `failures="0"` beside `<failure>` elements).

use std::io::BufRead;
use std::time::Duration;

use quick_xml::events::Event;

use super::ParseError;
pub use crate::model::{TestCase, TestStatus};

/// Whether the start of a file looks like JUnit XML.
pub fn detect(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let t = text.trim_start_matches('\u{feff}').trim_start();
    t.starts_with('<') && (t.contains("<testsuites") || t.contains("<testsuite"))
}

/// Reads every test case, calling `on_case` for each.
pub fn read(input: impl BufRead, mut on_case: impl FnMut(TestCase)) -> Result<(), ParseError> {
    let mut reader = quick_xml::Reader::from_reader(input);
    let mut buf = Vec::new();
    let mut open: Option<TestCase> = None;
    let mut saw_suite = false;
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| ParseError::at_byte(at, format!("JUnit XML: {e}")))?;
        let fail = |m: String| ParseError::at_byte(at, format!("JUnit XML: {m}"));
        match event {
            Event::Eof => break,
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                match e.local_name().as_ref() {
                    "testsuites" | "testsuite" => saw_suite = true,
                    "testcase" => {
                        let case = TestCase {
                            suite: super::xml_attr(e, "classname")
                                .map_err(&fail)?
                                .unwrap_or_default(),
                            name: super::xml_attr(e, "name")
                                .map_err(&fail)?
                                .ok_or_else(|| fail("<testcase> without a name".into()))?,
                            status: TestStatus::Passed,
                            duration: seconds(
                                super::xml_attr(e, "time").map_err(&fail)?.as_deref(),
                            )
                            .map_err(&fail)?,
                        };
                        if empty {
                            on_case(case);
                        } else {
                            open = Some(case);
                        }
                    }
                    outcome @ ("failure" | "error" | "skipped") => {
                        if let Some(case) = &mut open {
                            let status = match outcome {
                                "failure" => TestStatus::Failed,
                                "error" => TestStatus::Errored,
                                _ => TestStatus::Skipped,
                            };
                            // A failure outranks a skip; an error outranks both.
                            case.status = match (case.status, status) {
                                (TestStatus::Errored, _) | (_, TestStatus::Errored) => {
                                    TestStatus::Errored
                                }
                                (TestStatus::Failed, _) | (_, TestStatus::Failed) => {
                                    TestStatus::Failed
                                }
                                _ => TestStatus::Skipped,
                            };
                        }
                    }
                    _ => {}
                }
            }
            Event::End(e) if e.local_name().as_ref() == "testcase" => {
                if let Some(case) = open.take() {
                    on_case(case);
                }
            }
            _ => {}
        }
        buf.clear();
    }
    if !saw_suite {
        return Err(ParseError::at_byte(
            0,
            "JUnit XML: no <testsuite> or <testsuites> element",
        ));
    }
    if open.is_some() {
        return Err(ParseError::at_byte(
            reader.buffer_position(),
            "JUnit XML: the input ends inside a <testcase> (truncated?)",
        ));
    }
    Ok(())
}

/// `time="0.076"` (seconds; some writers use a comma, or thousands separators).
fn seconds(value: Option<&str>) -> Result<Duration, String> {
    let Some(v) = value else {
        return Ok(Duration::ZERO);
    };
    let v_trim = v.trim();
    // `0,076` is a decimal comma; `1,200.25` a thousands separator.
    let cleaned: String = if v_trim.contains('.') {
        v_trim.replace(',', "")
    } else {
        v_trim.replace(',', ".")
    };
    match cleaned.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(Duration::from_secs_f64(s.min(1e9))),
        _ => Err(format!("time `{v}` is not a number of seconds")),
    }
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
    fn statuses_and_durations() {
        let cases = read_all(
            r#"<testsuites><testsuite name="s" failures="0"><testcase classname="a" name="ok" time="0.5"/>
            <testcase classname="a" name="bad" time="1,200.25"><failure message="x">boom</failure></testcase>
            <testcase name="skip"><skipped/></testcase>
            <testcase name="err" time="0"><error/><system-out>out</system-out></testcase>
            </testsuite></testsuites>"#,
        )
        .unwrap();
        let got: Vec<_> = cases.iter().map(|c| (c.name.as_str(), c.status)).collect();
        assert_eq!(
            got,
            vec![
                ("ok", TestStatus::Passed),
                ("bad", TestStatus::Failed),
                ("skip", TestStatus::Skipped),
                ("err", TestStatus::Errored)
            ]
        );
        assert_eq!(cases[1].duration, Duration::from_secs_f64(1200.25));
        assert_eq!(
            seconds(Some("0,076")).unwrap(),
            Duration::from_secs_f64(0.076)
        );
        assert_eq!(cases[0].suite, "a");
    }

    #[test]
    fn malformed_results_are_errors() {
        for (xml, needle) in [
            ("<testsuite><testcase/></testsuite>", "without a name"),
            (
                "<testsuite><testcase name=\"a\" time=\"soon\"/></testsuite>",
                "not a number",
            ),
            ("<testsuite><testcase name=\"a\">", "truncated"),
            ("<coverage/>", "no <testsuite>"),
            ("<testsuite><testcase name=\"a\"></testsuite>", "JUnit XML"),
        ] {
            let e = read_all(xml).expect_err(xml);
            assert!(e.to_string().contains(needle), "{xml}: {e}");
        }
    }
}
