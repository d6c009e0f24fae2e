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
