//! The integration-test binary: cross-crate and CLI tests on the fixture checkpoints.

mod bad_input;
mod broker;
mod cli;
mod common;
mod estimate;
mod eval;
mod fuzz;
mod genome;
mod merge_parity;
mod merge_props;
mod model_cli;
mod model_parity;
mod model_ref;
mod resident;
mod search;
mod shared_prefix;
mod zoo;
