//! Build script of `evomerge-engine`: the LibTorch link settings for its examples
//! (`../libtorch_link.rs`).

include!("../libtorch_link.rs");

fn main() {
    link_libtorch();
}
