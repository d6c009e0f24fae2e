// Link settings of the LibTorch runtime (`--features libtorch`), shared by the build scripts of
// the root crate and of `engine/` through `include!`; nothing happens without the feature.
//
// torch-sys links `torch_cuda` like any library, so the linker's `--as-needed` drops it (no
// symbol of it is named) and LibTorch then sees no GPU. It is linked here with
// `--no-as-needed` when the LibTorch has it (tch's own advice). An rpath to the LibTorch built
// against lets binaries and tests run here without `LD_LIBRARY_PATH`; a binary carried to
// another host finds that host's torch through `LD_LIBRARY_PATH`.

use std::path::PathBuf;
use std::process::Command;

/// The link settings (see the file's head); called by the build scripts of the root crate (the
/// CLI, the integration tests) and of the engine (its examples).
fn link_libtorch() {
    for v in ["LIBTORCH", "LIBTORCH_LIB", "LIBTORCH_USE_PYTORCH", "VIRTUAL_ENV"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_LIBTORCH").is_none() {
        return;
    }
    let Some(lib) = torch_lib_dir() else {
        println!("cargo:warning=libtorch: could not locate LibTorch's lib/ folder; set LD_LIBRARY_PATH at run time");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

/// Where torch-sys found LibTorch: `LIBTORCH_LIB`, `LIBTORCH/lib`, or with
/// `LIBTORCH_USE_PYTORCH` the `lib/` folder of the active Python's torch package.
fn torch_lib_dir() -> Option<PathBuf> {
    if let Some(l) = std::env::var_os("LIBTORCH_LIB") {
        return Some(PathBuf::from(l));
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
        let out = Command::new(python).args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"]).output().ok()?;
        return out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    std::env::var_os("LIBTORCH").map(|l| PathBuf::from(l).join("lib"))
}
