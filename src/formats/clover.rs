//! Clover XML in (PHPUnit's `--coverage-clover`, nyc's `clover` reporter), streamed file by
//! file.
//!
//! - Files: a `<file>`'s `path` when given (nyc), else its `name` (PHPUnit's absolute path).
//! - Lines: `type="stmt"` and `type="cond"` lines with their `count`. PHPUnit's count is the
//!   number of tests that ran the line, nyc's the number of executions; either way, shards add.
//! - Functions: `type="method"` lines (name, line, count).
//! - Branches: a `cond` line says how many of its branch points were taken (`truecount`) and
//!   how many not (`falsecount`), not which: arms are keyed by position, the taken first, so
//!   merged branch counts are a lower bound. Lines and methods merge exactly.

use std::io::BufRead;

use quick_xml::events::Event;

use super::{ParseError, Record, xml_attr, xml_count, xml_line};
use crate::model::FileBuilder;

/// Reads a report, calling `on_record` per file; `false` stops early.
pub fn read(
    input: impl BufRead,
    mut on_record: impl FnMut(Record) -> bool,
) -> Result<(), ParseError> {
    let mut reader = quick_xml::Reader::from_reader(input);
    let mut buf = Vec::new();
    let mut saw_coverage = false;
    let mut file: Option<(String, FileBuilder)> = None;
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| ParseError::at_byte(at, format!("Clover XML: {e}")))?;
        let fail = |m: String| ParseError::at_byte(at, format!("Clover XML: {m}"));
        match event {
            Event::Eof => break,
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                match e.local_name().as_ref() {
                    "coverage" => saw_coverage = true,
                    "file" => {
                        let path = match xml_attr(e, "path").map_err(&fail)? {
                            Some(p) => p,
                            None => xml_attr(e, "name")
                                .map_err(&fail)?
                                .ok_or_else(|| fail("<file> without a name".into()))?,
                        };
                        if empty {
                            if !on_record(Record::built(path, FileBuilder::new())) {
                                return Ok(());
                            }
                        } else {
                            file = Some((path, FileBuilder::new()));
                        }
                    }
                    "line" => {
                        let Some((_, b)) = &mut file else { continue };
                        let num = xml_line(e, "num").map_err(&fail)?;
                        let count = xml_count(e, "count").map_err(&fail)?;
                        match xml_attr(e, "type").map_err(&fail)?.as_deref() {
                            Some("method") => {
                                let name = xml_attr(e, "name").map_err(&fail)?.unwrap_or_default();
                                if !name.is_empty() {
                                    b.function(&name, num, 0, count);
                                }
                            }
                            Some("cond") => {
                                b.line(num, count);
                                let taken = optional_count(e, "truecount").map_err(&fail)?;
                                let not_taken = optional_count(e, "falsecount").map_err(&fail)?;
                                let arms = taken.saturating_add(not_taken);
                                super::positional_branches(b, num, taken, arms, count > 0)
                                    .map_err(&fail)?;
                            }
                            _ => b.line(num, count),
                        }
                    }
                    _ => {}
                }
            }
            Event::End(e) if e.local_name().as_ref() == "file" => {
                if let Some((path, b)) = file.take()
                    && !on_record(Record::built(path, b))
                {
                    return Ok(());
                }
            }
            _ => {}
        }
        buf.clear();
    }
    if !saw_coverage {
        return Err(ParseError::at_byte(0, "Clover XML: no <coverage> element"));
    }
    if file.is_some() {
        return Err(ParseError::at_byte(
            reader.buffer_position(),
            "Clover XML: the input ends inside a <file> (truncated?)",
        ));
    }
    Ok(())
}

fn optional_count(e: &quick_xml::events::BytesStart<'_>, name: &str) -> Result<u64, String> {
    match xml_attr(e, name)? {
        Some(_) => xml_count(e, name),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(xml: &str) -> Result<Vec<Record>, ParseError> {
        let mut out = Vec::new();
        read(xml.as_bytes(), |r| {
            out.push(r);
            true
        })?;
        Ok(out)
    }

    #[test]
    fn statements_conditions_and_methods() {
        let recs = read_all(
            r#"<coverage generated="1"><project><file name="/x/a.php"><class name="A"/>
            <line num="3" type="method" name="f" count="2"/><line num="4" type="stmt" count="2"/>
            <line num="5" type="cond" count="1" truecount="1" falsecount="1"/><line num="9" type="stmt" count="0"/>
            </file><package name="p"><file name="b.js" path="/x/b.js"/></package></project></coverage>"#,
        )
        .unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(
            (recs[0].path.as_str(), recs[1].path.as_str()),
            ("/x/a.php", "/x/b.js")
        );
        let f = &recs[0].file;
        assert_eq!(
            f.line_hits().collect::<Vec<_>>(),
            vec![(4, 2), (5, 1), (9, 0)]
        );
        assert_eq!(
            f.branches().iter().map(|(_, t)| *t).collect::<Vec<_>>(),
            vec![Some(1), Some(0)]
        );
        assert_eq!((&*f.functions()[0].name, f.functions()[0].hits), ("f", 2));
    }

    #[test]
    fn malformed_reports_are_errors() {
        for (xml, needle) in [
            (
                "<coverage><project><file name=\"a\"><line num=\"0\" type=\"stmt\" count=\"1\"/>",
                "out of range",
            ),
            (
                "<coverage><project><file name=\"a\"><line num=\"1\" type=\"stmt\"/>",
                "without `count`",
            ),
            ("<coverage><project><file name=\"a\">", "truncated"),
            ("<report/>", "no <coverage>"),
            ("<coverage><file/></coverage>", "without a name"),
        ] {
            let e = read_all(xml).expect_err(xml);
            assert!(e.to_string().contains(needle), "{xml}: {e}");
        }
    }
}
