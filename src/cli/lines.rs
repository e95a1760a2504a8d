//! `covd lines EXPR`: set algebra over covered lines. An expression combines operands with
//! `|` (union), `&` (intersection) and `-` (difference, an operator only with spaces around
//! it), left to right, grouped with parentheses:
//!
//! - `covered[:RUN]`, `measured[:RUN]`: the lines a run covered, or measured;
//! - `tests[:RUN]`: the lines any named test of a run covered;
//! - `test:NAME`, `tests-except:NAME`: the lines one test of `--run` covered, or its other
//!   tests did.
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
    /// The run that operands without one refer to (`covered`, `test:NAME`, …).
    #[arg(long, env = "COVD_RUN")]
    run: Option<String>,
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
    let set = parse(&a.expr, a.run.as_deref()).map_err(|e| bad_input(anyhow!("{e}")))?;
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

/// Reads an expression; operands without a run take `run`.
fn parse(text: &str, run: Option<&str>) -> Result<LineSet, String> {
    let tokens = tokens(text)?;
    let mut at = 0;
    let set = expression(&tokens, &mut at, run)?;
    match tokens.get(at) {
        None => Ok(set),
        Some(t) => Err(format!("unexpected {t:?} after a complete expression")),
    }
}

fn expression(tokens: &[Token], at: &mut usize, run: Option<&str>) -> Result<LineSet, String> {
    let mut left = term(tokens, at, run)?;
    while let Some(Token::Op(op)) = tokens.get(*at) {
        *at += 1;
        let right = Box::new(term(tokens, at, run)?);
        let l = Box::new(left);
        left = match op {
            '|' => LineSet::Union(l, right),
            '&' => LineSet::Intersection(l, right),
            _ => LineSet::Difference(l, right),
        };
    }
    Ok(left)
}

fn term(tokens: &[Token], at: &mut usize, run: Option<&str>) -> Result<LineSet, String> {
    let token = tokens
        .get(*at)
        .ok_or("the expression ends where an operand should be")?;
    *at += 1;
    match token {
        Token::Open => {
            let inner = expression(tokens, at, run)?;
            match tokens.get(*at) {
                Some(Token::Close) => {
                    *at += 1;
                    Ok(inner)
                }
                _ => Err("a `(` is not closed".into()),
            }
        }
        Token::Operand(kind, arg) => operand(kind, arg.as_deref(), run),
        other => Err(format!("expected an operand, found {other:?}")),
    }
}

fn operand(kind: &str, arg: Option<&str>, run: Option<&str>) -> Result<LineSet, String> {
    let default_run = || {
        run.map(str::to_owned)
            .ok_or_else(|| format!("`{kind}` needs a run: `{kind}:RUN` or --run"))
    };
    let run_of = |arg: Option<&str>| match arg {
        Some(r) if !r.is_empty() => Ok(r.to_owned()),
        _ => default_run(),
    };
    let test = || match arg {
        Some(t) if !t.is_empty() => Ok(t.to_owned()),
        _ => Err(format!("`{kind}` needs a test: `{kind}:NAME`")),
    };
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
        other => {
            return Err(format!(
                "unknown operand `{other}` (covered, measured, tests, test, tests-except)"
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(r: &str) -> Box<LineSet> {
        Box::new(LineSet::Covered(r.into()))
    }

    #[test]
    fn operators_go_left_to_right_and_parentheses_group() {
        assert_eq!(
            parse("covered:a | covered:b - covered:c", None).unwrap(),
            LineSet::Difference(
                Box::new(LineSet::Union(covered("a"), covered("b"))),
                covered("c")
            )
        );
        assert_eq!(
            parse("covered:a|(covered:b&covered:pr-42)", None).unwrap(),
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
            Some("r"),
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
            parse("measured", Some("r")).unwrap(),
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
            let err = parse(text, None).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
        assert!(
            parse("test", Some("r"))
                .unwrap_err()
                .contains("needs a test")
        );
    }
}
