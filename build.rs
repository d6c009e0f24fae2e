//! Build script of the `evomerge` binary: the LibTorch link settings (`libtorch_link.rs`).

include!("libtorch_link.rs");

fn main() {
    link_libtorch();
}
