//! One module per subcommand.

pub mod merge;
pub mod progress;
pub mod run_model;
