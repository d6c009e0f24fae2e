//! One module per subcommand.

pub mod eval;
pub mod merge;
pub mod progress;
pub mod report;
pub mod run_model;
pub mod runs;
pub mod search;
pub mod worker;
pub mod zoo;
