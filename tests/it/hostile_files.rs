//! Coverage files made to hurt a reader: XML that declares entities (the billion laughs,
//! an external entity), JSON nested deeper than any tool writes, paths that are not UTF-8. Each
//! is refused with the place and the reason, or read without expanding anything, and the
//! CLI says so and sends nothing.

use std::process::Command;

use covd::formats::{self, Format};
use covd::model::Coverage;

use crate::cli::{COVD, Served};
use crate::support::*;

fn read(format: Format, text: &[u8]) -> Result<Coverage, formats::ParseError> {
    let mut c = Coverage::default();
    formats::read(format, text, |r| {
        c.add(&r.path, &r.file);
        true
    })
    .map(|_| c)
}

/// Nine levels of ten: expanded, `&lol9;` would be a billion `lol`s.
const LAUGHS: &str = r#"<!DOCTYPE coverage [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
  <!ENTITY xxe SYSTEM "file:///etc/passwd">
]>"#;

fn cobertura(filename: &str, source: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>{LAUGHS}<coverage line-rate="1" branch-rate="0" version="1" timestamp="1">
<sources><source>{source}</source></sources><packages><package name="p"><classes>
<class name="a" filename="{filename}" line-rate="1" branch-rate="0"><methods/><lines>
<line number="1" hits="2"/></lines></class></classes></package></packages></coverage>"#
    )
}

#[test]
fn xml_entities_are_never_expanded_and_an_undeclared_use_is_refused() {
    // The declarations alone change nothing: read as if they were not there.
    let c = read(Format::Cobertura, cobertura("a.py", "/src").as_bytes()).unwrap();
    assert_eq!(c.files.keys().collect::<Vec<_>>(), ["/src/a.py"]);
    assert_eq!(c.files["/src/a.py"].hits_of(1), Some(2));
    // Using one is refused, by name and place: neither the laughs nor the file are read.
    for entity in ["lol9", "xxe"] {
        let text = cobertura(&format!("&{entity};"), "/src");
        let e = read(Format::Cobertura, text.as_bytes()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("unrecognized entity `{entity}`")),
            "{e}"
        );
        assert!(e.offset > 0, "{e:?}");
        let text = cobertura("a.py", &format!("/src/&{entity};"));
        let e = read(Format::Cobertura, text.as_bytes()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("unrecognized entity `{entity}`")),
            "{e}"
        );
    }
    // XML's own entities and character references are text, in attributes and in <source>.
    let text = cobertura("b&amp;c.py", "/srv/r&amp;d/&#x61;pp");
    let c = read(Format::Cobertura, text.as_bytes()).unwrap();
    assert_eq!(c.files.keys().collect::<Vec<_>>(), ["/srv/r&d/app/b&c.py"]);

    // JaCoCo's reports name their DTD, which is never fetched.
    let jacoco = format!(
        r#"<?xml version="1.0"?>{}<report name="r"><package name="p"><sourcefile name="A.java"><line nr="3" mi="0" ci="2" mb="0" cb="0"/></sourcefile></package></report>"#,
        LAUGHS.replace("coverage [", "report [")
    );
    let c = read(Format::JaCoCo, jacoco.as_bytes()).unwrap();
    assert_eq!(c.files.keys().collect::<Vec<_>>(), ["p/A.java"]);
    let bad = jacoco.replace("name=\"A.java\"", "name=\"&lol9;\"");
    let e = read(Format::JaCoCo, bad.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("unrecognized entity `lol9`"), "{e}");
}

#[test]
fn json_nested_deeper_than_any_tool_writes_is_refused_not_overflowed() {
    let deep = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // Where the reader expects values (llvm-cov segments): refused at serde_json's depth
    // limit, with the line.
    let text = format!(
        r#"{{"data":[{{"files":[{{"filename":"a.c","segments":{},"branches":[],"expansions":[]}}]}}],"type":"llvm.coverage.json.export","version":"2.0.1"}}"#,
        deep(200)
    );
    let e = read(Format::LlvmCov, text.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("recursion limit exceeded"), "{e}");
    assert_eq!(e.line, 1, "{e:?}");
    // Under a key no reader looks at, a million levels are skipped without recursion.
    let text = format!(
        r#"{{"meta":{{"version":"7.6.1"}},"ignored":{},"files":{{"a.py":{{"executed_lines":[1],"missing_lines":[2]}}}}}}"#,
        deep(1_000_000)
    );
    let c = read(Format::CoveragePyJson, text.as_bytes()).unwrap();
    let a = &c.files["a.py"];
    assert_eq!(a.line_hits().collect::<Vec<_>>(), [(1, 1), (2, 0)]);
}

#[test]
fn a_path_that_is_not_utf8_is_refused_by_line_and_the_shard_sends_nothing() {
    let text = b"SF:src/ok.c\nDA:1,1\nend_of_record\nSF:src/caf\xe9.c\nDA:1,1\nend_of_record\n";
    let e = read(Format::Lcov, &text[..]).unwrap_err();
    assert_eq!(e.line, 4, "{e:?}");
    assert!(e.to_string().contains("not valid UTF-8"), "{e}");

    let served = Served::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.info");
    std::fs::write(&path, text).unwrap();
    let r = served
        .covd(&["push", "--run", "r", "--shard", "0", "--fail-on-error"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 4") && stderr.contains("not valid UTF-8"),
        "{stderr}"
    );
    // Not even the file before it: a shard is sent whole or not at all.
    let status = served.covd(&["status", "--run", "r"]).output().unwrap();
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(!out.contains("finished"), "{out}");
    assert!(!out.contains("files 1"), "{out}");
}

/// Path rules and filters given to `covd push`, as a user types them.
#[test]
fn push_path_rules_and_filters_choose_and_rename_the_files_sent() {
    let served = Served::start();
    let shard = fixture("gcc-lcov/shard1.info");
    let paths = |run: &str| -> Vec<String> {
        let r = served
            .covd(&["fetch", "--run", run, "--format", "lcov"])
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        String::from_utf8_lossy(&r.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("SF:"))
            .map(str::to_owned)
            .collect()
    };
    let push = |run: &str, args: &[&str]| {
        let r = served
            .covd(&["push", "--run", run, "--shard", "0", "--fail-on-error"])
            .args(args)
            .arg(&shard)
            .output()
            .unwrap();
        (
            r.status.code(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    };
    let (code, err) = push(
        "mapped",
        &[
            "--map-prefix",
            "/builds/shard-1/=repo/",
            "--include",
            "repo/**",
            "--exclude",
            "**/main.c",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(paths("mapped"), ["repo/src/calc.c"]);

    let (code, err) = push("rooted", &["--root", "/builds/shard-1"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(paths("rooted"), ["src/calc.c", "src/main.c"]);

    // Nothing matches: the shard is sent empty, and says so.
    let (code, err) = push(
        "none",
        &["--root", "/builds/shard-1", "--include", "lib/**"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(paths("none").is_empty());

    for (args, says) in [
        (&["--include", "["][..], "--include/--exclude"),
        (&["--map-prefix", "no-equals-sign"][..], "is not FROM=TO"),
    ] {
        let (code, err) = push("bad", args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let r = Command::new(COVD)
        .args(["status", "--run", "bad", "--server", &served.url])
        .output()
        .unwrap();
    assert!(!r.status.success(), "a refused push opened no run");
}
