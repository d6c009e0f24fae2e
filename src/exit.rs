//! Exit codes (CONVENTIONS.md): 0 done, 1 finished without a valid candidate, 2 error,
//! 130 interrupted.

use std::process::ExitCode;

use evomerge_engine::EngineError;

pub const ERROR: u8 = 2;
pub const INTERRUPTED: u8 = 130;

/// Prints an error chain and maps it to an exit code.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if matches!(e.downcast_ref::<EngineError>(), Some(EngineError::Interrupted)) => {
            eprintln!("interrupted: nothing was written");
            ExitCode::from(INTERRUPTED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(ERROR)
        }
    }
}

/// A reader that stops reading (`evomerge status RUN | head -1`) is a normal end, as for any
/// Unix tool: printing to a closed stdout ends the process with exit 0, not a panic (Rust
/// ignores SIGPIPE, so `println!` panics on EPIPE). Other panics keep the default report.
pub fn end_quietly_on_a_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload().downcast_ref::<String>().map(String::as_str).or_else(|| info.payload().downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.starts_with("failed printing to stdout") && m.contains("Broken pipe")) {
            std::process::exit(0);
        }
        default(info);
    }));
}
