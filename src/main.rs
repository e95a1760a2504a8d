//! The `covd` binary: parse the command line, run it, map failures to exit codes.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COVD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // A log that cannot be written is lost, and the daemon goes on: the default reports it
        // with `eprintln!`, which panics once standard error is a closed pipe (a supervisor
        // gone, `covd serve 2>&1 | head`), and so stopped the daemon at its next warning.
        .log_internal_errors(false);
    match cli.log_format {
        cli::LogFormat::Text => logs.init(),
        cli::LogFormat::Json => logs.json().init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("covd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("covd: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}
