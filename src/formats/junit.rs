//! JUnit XML test results in (pytest, jest-junit, mocha's xunit, Maven Surefire, PHPUnit,
//! go-junit-report…): each `<testcase>` with its suite, name, status, duration and, where the
//! tool counts them (PHPUnit), assertions. The counts come from the test cases themselves, not
//! from the suites' attributes, which some writers get wrong (mocha's say `failures="0"`
//! beside `<failure>` elements; jest-junit's leave out the cases its hooks add).
//!
//! No tool among these marks an incomplete test apart: PHPUnit writes its incomplete tests
//! as `<skipped/>`, jest-junit leaves `test.todo` out. They read as the tools write them;
//! PHPUnit 9's testdox XML (`testdox`) has them.

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

/// Reads every test case, calling `on_case` for each. Returns the tools whose versions the
/// report's `<properties>` name (see [`tool_of_property`]).
pub fn read(
    input: impl BufRead,
    mut on_case: impl FnMut(TestCase),
) -> Result<super::Tools, ParseError> {
    let mut tools = super::Tools::new();
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
                    "property" => {
                        let name = super::xml_attr(e, "name").map_err(&fail)?;
                        let value = super::xml_attr(e, "value").map_err(&fail)?;
                        if let (Some(name), Some(value)) = (name, value)
                            && let Some(tool) = tool_of_property(&name, &value)
                            && !tools.contains(&tool)
                        {
                            tools.push(tool);
                        }
                    }
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
                            assertions: match super::xml_attr(e, "assertions").map_err(&fail)? {
                                Some(n) => Some(n.trim().parse().map_err(|_| {
                                    fail(format!("assertions `{n}` is not a count"))
                                })?),
                                None => None,
                            },
                        };
                        if empty {
                            on_case(case);
                        } else {
                            open = Some(case);
                        }
                    }
                    outcome @ ("failure" | "error" | "warning" | "skipped") => {
                        if let Some(case) = &mut open {
                            let status = match outcome {
                                "failure" => TestStatus::Failed,
                                // PHPUnit's `<warning>`: the test (or its class) is not usable
                                // as written; not a pass, and no assertion failed.
                                "error" | "warning" => TestStatus::Errored,
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
    Ok(tools)
}

/// The tool a `<property>` names the version of: Maven Surefire writes the test JVM's system
/// properties, `java.version` among them. Other properties are the project's own or describe
/// the machine (paths, user names) and stay out of the tags.
fn tool_of_property(name: &str, value: &str) -> Option<(String, String)> {
    let tool = match name {
        "java.version" => "java",
        _ => return None,
    };
    let version = value.trim();
    (!version.is_empty() && !version.contains(char::is_control))
        .then(|| (tool.to_owned(), version.to_owned()))
}

/// `time="0.076"` (seconds; some writers use a comma, or thousands separators).
pub(super) fn seconds(value: Option<&str>) -> Result<Duration, String> {
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
    fn assertions_and_tool_versions() {
        let xml = r#"<testsuite><properties>
            <property name="java.version" value="17.0.15"/><property name="java.version" value="17.0.15"/>
            <property name="user.home" value="/home/ci"/><property name="java.vm.version" value="17"/>
            </properties>
            <testcase name="a" assertions="3"/><testcase name="b"/></testsuite>"#;
        let mut cases = Vec::new();
        let tools = read(xml.as_bytes(), |c| cases.push(c)).unwrap();
        assert_eq!(tools, [("java".to_owned(), "17.0.15".to_owned())]);
        assert_eq!(cases[0].assertions, Some(3));
        assert_eq!(cases[1].assertions, None);
        let e = read_all(r#"<testsuite><testcase name="a" assertions="many"/></testsuite>"#)
            .unwrap_err();
        assert!(e.to_string().contains("not a count"), "{e}");
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
