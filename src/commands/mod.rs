//! One module per subcommand.

pub mod merge;
pub mod progress;
