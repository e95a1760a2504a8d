//! JaCoCo XML in (`jacoco:report`, `jacococli report --xml`), streamed package by package.
//!
//! - Files are `<package name>/<sourcefile name>` (`com/example/calc/Calculator.java`); the
//!   source root (`src/main/java`) is not in the report, so a `--map-prefix` adds it.
//! - Lines: every `<line nr mi ci mb cb>` is executable; JaCoCo records no execution counts,
//!   only whether a line's instructions ran, so a line's hits are 1 or 0.
//! - Functions: each `<method>` of the file's classes, named `Class.method`, at its first line
//!   with code, hit when its METHOD counter says so.
//! - Branches: JaCoCo gives per line how many bytecode branches were missed and covered, not
//!   which: arms are keyed by position, the covered ones first, so merged branch counts are a
//!   lower bound (as with Cobertura). Lines and methods merge exactly.

use std::collections::HashMap;
use std::io::BufRead;

use quick_xml::events::Event;

use super::{ParseError, Record, xml_attr, xml_count, xml_line};
use crate::model::FileBuilder;

/// Reads a report, calling `on_record` per source file; `false` stops early.
pub fn read(
    input: impl BufRead,
    mut on_record: impl FnMut(Record) -> bool,
) -> Result<(), ParseError> {
    let mut reader = quick_xml::Reader::from_reader(input);
    let mut buf = Vec::new();
    let mut saw_report = false;
    let mut package = String::new();
    // sourcefilename -> functions of the package's classes, until the <sourcefile> comes.
    let mut functions: HashMap<String, Vec<(String, u32, u64)>> = HashMap::new();
    // (class simple name, its source file) while inside a <class>
    let mut class: Option<(String, String)> = None;
    // (method name, first line, covered?) while inside a <method>
    let mut method: Option<(String, u32, u64)> = None;
    let mut source: Option<(String, FileBuilder)> = None;
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| ParseError::at_byte(at, format!("JaCoCo XML: {e}")))?;
        let fail = |m: String| ParseError::at_byte(at, format!("JaCoCo XML: {m}"));
        match event {
            Event::Eof => break,
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                match e.local_name().as_ref() {
                    "report" => saw_report = true,
                    "package" => package = xml_attr(e, "name").map_err(&fail)?.unwrap_or_default(),
                    "class" if !empty => {
                        let name = xml_attr(e, "name").map_err(&fail)?.unwrap_or_default();
                        let simple = name.rsplit('/').next().unwrap_or(&name).to_owned();
                        let file = xml_attr(e, "sourcefilename")
                            .map_err(&fail)?
                            .unwrap_or_default();
                        class = Some((simple, file));
                    }
                    "method" if !empty && class.is_some() => {
                        let name = xml_attr(e, "name").map_err(&fail)?.unwrap_or_default();
                        // Abstract and native methods have no line.
                        let line = match xml_attr(e, "line").map_err(&fail)? {
                            Some(_) => xml_line(e, "line").map_err(&fail)?,
                            None => 0,
                        };
                        method = Some((name, line, 0));
                    }
                    "counter" => {
                        if let Some((_, _, hits)) = &mut method
                            && xml_attr(e, "type").map_err(&fail)?.as_deref() == Some("METHOD")
                        {
                            *hits = u64::from(xml_count(e, "covered").map_err(&fail)? > 0);
                        }
                    }
                    "sourcefile" => {
                        let name = xml_attr(e, "name")
                            .map_err(&fail)?
                            .ok_or_else(|| fail("<sourcefile> without a name".into()))?;
                        let mut builder = FileBuilder::new();
                        for (f, line, hits) in functions.remove(&name).unwrap_or_default() {
                            builder.function(&f, line, 0, hits);
                        }
                        let path = if package.is_empty() {
                            name
                        } else {
                            format!("{package}/{name}")
                        };
                        if empty {
                            if !on_record(Record::built(path, builder)) {
                                return Ok(());
                            }
                        } else {
                            source = Some((path, builder));
                        }
                    }
                    "line" => {
                        if let Some((_, builder)) = &mut source {
                            let nr = xml_line(e, "nr").map_err(&fail)?;
                            let ran = xml_count(e, "ci").map_err(&fail)? > 0;
                            builder.line(nr, u64::from(ran));
                            let covered = xml_count(e, "cb").map_err(&fail)?;
                            let missed = xml_count(e, "mb").map_err(&fail)?;
                            let arms = covered.saturating_add(missed);
                            super::positional_branches(builder, nr, covered, arms, ran)
                                .map_err(&fail)?;
                        }
                    }
                    _ => {}
                }
            }
            Event::End(e) => match e.local_name().as_ref() {
                "method" => {
                    if let (Some((name, line, hits)), Some((simple, file))) =
                        (method.take(), &class)
                        && line > 0
                    {
                        let name = format!("{simple}.{}", name);
                        functions
                            .entry(file.clone())
                            .or_default()
                            .push((name, line, hits));
                    }
                }
                "class" => class = None,
                "sourcefile" => {
                    if let Some((path, builder)) = source.take()
                        && !on_record(Record::built(path, builder))
                    {
                        return Ok(());
                    }
                }
                "package" => functions.clear(),
                _ => {}
            },
            _ => {}
        }
        buf.clear();
    }
    if !saw_report {
        return Err(ParseError::at_byte(0, "JaCoCo XML: no <report> element"));
    }
    if source.is_some() {
        return Err(ParseError::at_byte(
            reader.buffer_position(),
            "JaCoCo XML: the input ends inside a <sourcefile> (truncated?)",
        ));
    }
    Ok(())
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
    fn lines_branches_and_methods() {
        let recs = read_all(
            r#"<?xml version="1.0"?><!DOCTYPE report PUBLIC "-//JACOCO//DTD Report 1.1//EN" "report.dtd"><report name="r">
            <package name="a/b"><class name="a/b/C" sourcefilename="C.java">
            <method name="f" desc="()V" line="3"><counter type="INSTRUCTION" missed="0" covered="3"/><counter type="METHOD" missed="0" covered="1"/></method>
            <method name="g" desc="()V" line="7"><counter type="METHOD" missed="1" covered="0"/></method></class>
            <sourcefile name="C.java"><line nr="3" mi="0" ci="3" mb="1" cb="1"/><line nr="7" mi="2" ci="0" mb="0" cb="0"/></sourcefile>
            </package></report>"#,
        )
        .unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].path, "a/b/C.java");
        let f = &recs[0].file;
        assert_eq!(f.line_hits().collect::<Vec<_>>(), vec![(3, 1), (7, 0)]);
        let b: Vec<_> = f.branches().iter().map(|(_, t)| *t).collect();
        assert_eq!(b, vec![Some(1), Some(0)]);
        let fns: Vec<_> = f
            .functions()
            .iter()
            .map(|x| (&*x.name, x.start_line, x.hits))
            .collect();
        assert_eq!(fns, vec![("C.f", 3, 1), ("C.g", 7, 0)]);
    }

    #[test]
    fn malformed_reports_are_errors() {
        for (xml, needle) in [
            (
                "<report><package name=\"p\"><sourcefile name=\"A.java\"><line nr=\"0\" ci=\"1\" mi=\"0\" mb=\"0\" cb=\"0\"/>",
                "out of range",
            ),
            (
                "<report><package name=\"p\"><sourcefile name=\"A.java\"><line nr=\"1\" ci=\"x\"/>",
                "not a count",
            ),
            (
                "<report><package name=\"p\"><sourcefile name=\"A.java\">",
                "truncated",
            ),
            ("<coverage/>", "no <report>"),
            (
                "<report><package><sourcefile/></package></report>",
                "without a name",
            ),
            (
                "<report><package name=\"p\"><sourcefile name=\"A\"><line nr=\"1\" ci=\"1\" mi=\"0\" mb=\"99999\" cb=\"0\"/>",
                "claims",
            ),
        ] {
            let e = read_all(xml).expect_err(xml);
            assert!(e.to_string().contains(needle), "{xml}: {e}");
        }
    }
}
