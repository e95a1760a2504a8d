//! `covd lines EXPR`: set algebra over covered lines. An expression combines operands with
//! `|` (union), `&` (intersection) and `-` (difference, an operator only with spaces around
//! it), left to right, grouped with parentheses:
//!
//! - `covered[:RUN]`, `measured[:RUN]`: the lines a run covered, or measured;
//! - `tests[:RUN]`: the lines any named test of a run covered;
//! - `test:NAME`, `tests-except:NAME`: the lines one test of `--run` covered, or its other
//!   tests did;
//! - `shard:ID`: the lines one shard of `--run` covered;
//! - `flag:NAME`: the lines the runs of `--commit` (of `--project`, if given) that carry the
//!   flag covered, together.
//!
//! A name with spaces, parentheses or `|&` is quoted: `test:"shard1|mod.test_x"`.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Args, ValueEnum};
use covd::service::LineSet;
use serde_json::json;

use super::attribution::ranges_of;
use super::{Failure, ServerArg, bad_input, client};

#[derive(Debug, Args)]
pub(super) struct LinesArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The run that operands without one refer to (`covered`, `test:NAME`, `shard:ID`, …).
    #[arg(long, env = "COVD_RUN")]
    run: Option<String>,
    /// The commit whose runs `flag:NAME` operands refer to.
    #[arg(long, env = "COVD_COMMIT")]
    commit: Option<String>,
    /// With --commit: only runs of this project.
    #[arg(long, env = "COVD_PROJECT")]
    project: Option<String>,
    /// The expression, e.g. `covered:integration - covered:unit`, or
    /// `test:T - tests-except:T` (the lines only test T covers).
    expr: String,
    /// Only files at or under this path.
    #[arg(long, default_value = "")]
    path: String,
    /// `text` (`path: 1-4,9` per file, then the count) or `json`.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    format: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

pub(super) async fn lines(a: LinesArgs) -> Result<ExitCode, Failure> {
    let defaults = Defaults {
        run: a.run.as_deref(),
        commit: a.commit.as_deref(),
        project: a.project.as_deref(),
    };
    let set = parse(&a.expr, &defaults).map_err(|e| bad_input(anyhow!("{e}")))?;
    let files = client(&a.server)?.lines(&set, &a.path).await?;
    let total: u64 = files.iter().map(|(_, l)| l.len()).sum();
    let mut out = io::stdout().lock();
    match a.format {
        Output::Text => {
            for (path, lines) in &files {
                let _ = writeln!(out, "{path}: {}", ranges_of(lines));
            }
            eprintln!("{total} lines in {} files", files.len());
        }
        Output::Json => {
            let files: Vec<_> = files
                .iter()
                .map(|(p, l)| json!({"path": p, "lines": l.iter().collect::<Vec<u32>>()}))
                .collect();
            let _ = writeln!(out, "{}", json!({"lines": total, "files": files}));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, PartialEq)]
enum Token {
    Open,
    Close,
    Op(char),
    Operand(String, Option<String>),
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    // What came before: a `-` is the difference only between spaces (or parentheses).
    let mut spaced = true;
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
                spaced = true;
                continue;
            }
            '(' => {
                chars.next();
                out.push(Token::Open);
            }
            ')' => {
                chars.next();
                out.push(Token::Close);
            }
            '|' | '&' => {
                chars.next();
                out.push(Token::Op(c));
            }
            '-' if spaced
                && chars
                    .clone()
                    .nth(1)
                    .is_none_or(|n| n.is_whitespace() || n == '(') =>
            {
                chars.next();
                out.push(Token::Op('-'));
            }
            _ => {
                let mut kind = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "()|&:".contains(c) {
                        break;
                    }
                    kind.push(c);
                    chars.next();
                }
                let mut arg = None;
                if chars.next_if_eq(&':').is_some() {
                    let mut value = String::new();
                    if chars.next_if_eq(&'"').is_some() {
                        loop {
                            match chars.next() {
                                None => return Err(format!("`{kind}:` has no closing quote")),
                                Some('"') => break,
                                Some('\\') => value.extend(chars.next()),
                                Some(c) => value.push(c),
                            }
                        }
                    } else {
                        while let Some(&c) = chars.peek() {
                            if c.is_whitespace() || "()|&".contains(c) {
                                break;
                            }
                            value.push(c);
                            chars.next();
                        }
                    }
                    arg = Some(value);
                }
                if kind.is_empty() {
                    return Err(format!("an operand is missing before `{c}`"));
                }
                out.push(Token::Operand(kind, arg));
            }
        }
        spaced = matches!(c, '(' | ')' | '|' | '&');
    }
    Ok(out)
}

/// What operands that do not say refer to.
#[derive(Debug, Default, Clone, Copy)]
struct Defaults<'a> {
    run: Option<&'a str>,
    commit: Option<&'a str>,
    project: Option<&'a str>,
}

/// Reads an expression; operands without a run take `defaults`' run.
fn parse(text: &str, defaults: &Defaults<'_>) -> Result<LineSet, String> {
    let tokens = tokens(text)?;
    let mut at = 0;
    let set = expression(&tokens, &mut at, defaults)?;
    match tokens.get(at) {
        None => Ok(set),
        Some(t) => Err(format!("unexpected {t:?} after a complete expression")),
    }
}

fn expression(
    tokens: &[Token],
    at: &mut usize,
    defaults: &Defaults<'_>,
) -> Result<LineSet, String> {
    let mut left = term(tokens, at, defaults)?;
    while let Some(Token::Op(op)) = tokens.get(*at) {
        *at += 1;
        let right = Box::new(term(tokens, at, defaults)?);
        let l = Box::new(left);
        left = match op {
            '|' => LineSet::Union(l, right),
            '&' => LineSet::Intersection(l, right),
            _ => LineSet::Difference(l, right),
        };
    }
    Ok(left)
}

fn term(tokens: &[Token], at: &mut usize, defaults: &Defaults<'_>) -> Result<LineSet, String> {
    let token = tokens
        .get(*at)
        .ok_or("the expression ends where an operand should be")?;
    *at += 1;
    match token {
        Token::Open => {
            let inner = expression(tokens, at, defaults)?;
            match tokens.get(*at) {
                Some(Token::Close) => {
                    *at += 1;
                    Ok(inner)
                }
                _ => Err("a `(` is not closed".into()),
            }
        }
        Token::Operand(kind, arg) => operand(kind, arg.as_deref(), defaults),
        other => Err(format!("expected an operand, found {other:?}")),
    }
}

fn operand(kind: &str, arg: Option<&str>, defaults: &Defaults<'_>) -> Result<LineSet, String> {
    let default_run = || {
        defaults
            .run
            .map(str::to_owned)
            .ok_or_else(|| format!("`{kind}` needs a run: `{kind}:RUN` or --run"))
    };
    let run_of = |arg: Option<&str>| match arg {
        Some(r) if !r.is_empty() => Ok(r.to_owned()),
        _ => default_run(),
    };
    let named = |what: &str, placeholder: &str| match arg {
        Some(t) if !t.is_empty() => Ok(t.to_owned()),
        _ => Err(format!("`{kind}` needs a {what}: `{kind}:{placeholder}`")),
    };
    let test = || named("test", "NAME");
    Ok(match kind {
        "covered" => LineSet::Covered(run_of(arg)?),
        "measured" => LineSet::Measured(run_of(arg)?),
        "tests" => LineSet::Tests(run_of(arg)?),
        "test" => LineSet::Test {
            run: default_run()?,
            test: test()?,
        },
        "tests-except" => LineSet::TestsExcept {
            run: default_run()?,
            test: test()?,
        },
        "shard" => LineSet::Shard {
            run: default_run()?,
            shard: named("shard", "ID")?,
        },
        "flag" => LineSet::Flag {
            project: defaults.project.unwrap_or_default().to_owned(),
            commit: defaults
                .commit
                .ok_or_else(|| format!("`{kind}` needs the commit of its runs: --commit"))?
                .to_owned(),
            flag: named("flag", "NAME")?,
        },
        other => {
            return Err(format!(
                "unknown operand `{other}` (covered, measured, tests, test, tests-except, \
                 shard, flag)"
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Defaults<'static> = Defaults {
        run: None,
        commit: None,
        project: None,
    };
    const RUN: Defaults<'static> = Defaults {
        run: Some("r"),
        commit: None,
        project: None,
    };

    fn covered(r: &str) -> Box<LineSet> {
        Box::new(LineSet::Covered(r.into()))
    }

    #[test]
    fn operators_go_left_to_right_and_parentheses_group() {
        assert_eq!(
            parse("covered:a | covered:b - covered:c", &NONE).unwrap(),
            LineSet::Difference(
                Box::new(LineSet::Union(covered("a"), covered("b"))),
                covered("c")
            )
        );
        assert_eq!(
            parse("covered:a|(covered:b&covered:pr-42)", &NONE).unwrap(),
            LineSet::Union(
                covered("a"),
                Box::new(LineSet::Intersection(covered("b"), covered("pr-42")))
            )
        );
    }

    #[test]
    fn operands_take_the_default_run_and_quoted_names() {
        let set = parse(
            r#"test:"shard1|m.t (x)" - tests-except:"shard1|m.t (x)""#,
            &RUN,
        );
        let t = "shard1|m.t (x)".to_owned();
        assert_eq!(
            set.unwrap(),
            LineSet::Difference(
                Box::new(LineSet::Test {
                    run: "r".into(),
                    test: t.clone()
                }),
                Box::new(LineSet::TestsExcept {
                    run: "r".into(),
                    test: t
                })
            )
        );
        assert_eq!(
            parse("measured", &RUN).unwrap(),
            LineSet::Measured("r".into())
        );
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            ("covered", "needs a run"),
            ("covered:a |", "ends where an operand"),
            ("(covered:a", "not closed"),
            ("covered:a covered:b", "unexpected"),
            ("lines:a", "unknown operand `lines`"),
            ("covered:a -covered:b", "unexpected"),
            ("test:\"x", "no closing quote"),
            ("test", "needs a run"),
        ] {
            let err = parse(text, &NONE).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
        for (text, says) in [
            ("test", "needs a test: `test:NAME`"),
            ("shard", "needs a shard: `shard:ID`"),
            ("flag:unit", "needs the commit of its runs"),
        ] {
            let err = parse(text, &RUN).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn shards_take_the_run_and_flags_the_commit() {
        let defaults = Defaults {
            run: Some("r"),
            commit: Some("abc"),
            project: None,
        };
        assert_eq!(
            parse("shard:7 - flag:unit", &defaults).unwrap(),
            LineSet::Difference(
                Box::new(LineSet::Shard {
                    run: "r".into(),
                    shard: "7".into()
                }),
                Box::new(LineSet::Flag {
                    project: String::new(),
                    commit: "abc".into(),
                    flag: "unit".into()
                })
            )
        );
        let defaults = Defaults {
            project: Some("web"),
            ..defaults
        };
        assert_eq!(
            parse("flag:integration", &defaults).unwrap(),
            LineSet::Flag {
                project: "web".into(),
                commit: "abc".into(),
                flag: "integration".into()
            }
        );
    }
}
