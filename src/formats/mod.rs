//! Coverage file formats: one module per format, each with a streaming reader over
//! `impl BufRead` and a writer over `impl Write`. Formats depend on the model only; they never
//! open paths themselves.

pub mod cobertura;
pub mod json;
pub mod lcov;
pub mod markdown;

/// A malformed input: where, and what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line of the input where the problem was found.
    pub line: u64,
    pub message: String,
    #[source]
    pub source: Option<std::io::Error>,
}

impl ParseError {
    pub(crate) fn at(line: u64, message: impl Into<String>) -> ParseError {
        ParseError {
            line,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn io(line: u64, e: std::io::Error) -> ParseError {
        ParseError {
            line,
            message: format!("read error: {e}"),
            source: Some(e),
        }
    }
}
