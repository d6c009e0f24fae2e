//! Merge methods: one file per method, each declaring its parameters ([`ParamSpec`]).
//!
//! | method | file |
//! |---|---|
//! | linear | [`linear`] |
//! | slerp | [`slerp`] |
//! | nuslerp | [`nuslerp`] |
//! | multislerp | [`multislerp`] |
//! | karcher | [`karcher`] |
//! | task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear | [`generalized`] (presets of one method) |
//! | model_stock | [`model_stock`] |
//! | sce | [`sce`] |
//! | nearswap | [`nearswap`] |
//! | passthrough | [`passthrough`] |
//!
//! Semantics follow mergekit 0.1.5 (checked against its outputs in `tests/fixtures`); every
//! deliberate departure is stated in the method's doc comment.

pub mod base;
pub mod error;
pub mod generalized;
pub mod karcher;
pub mod linear;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod rng;
pub mod sce;
pub mod select;
pub mod slerp;
pub mod sparsify;

pub use base::{BaseRole, Kind, MergeInput, MergeMethod, ParamSpec, Params, Scope};
pub use error::MergeError;

/// Every merge method, in a stable order.
pub fn registry() -> Vec<&'static dyn MergeMethod> {
    let mut v: Vec<&'static dyn MergeMethod> = vec![
        &linear::Linear,
        &slerp::Slerp,
        &nuslerp::NuSlerp,
        &multislerp::MultiSlerp,
        &karcher::Karcher,
        &model_stock::ModelStock,
        &sce::Sce,
        &nearswap::NearSwap,
        &passthrough::Passthrough,
    ];
    v.extend(generalized::PRESETS.iter().map(|p| p as &'static dyn MergeMethod));
    v
}

/// Looks a method up by its recipe name.
pub fn method(name: &str) -> Option<&'static dyn MergeMethod> {
    registry().into_iter().find(|m| m.name() == name)
}

/// The recipe names, for messages.
pub fn method_names() -> Vec<&'static str> {
    registry().iter().map(|m| m.name()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_round_trips_by_name_and_declares_sane_params() {
        let names = method_names();
        assert_eq!(names.len(), 17);
        for m in registry() {
            assert_eq!(method(m.name()).map(|x| x.name()), Some(m.name()));
            assert_eq!(names.iter().filter(|n| **n == m.name()).count(), 1, "{} unique", m.name());
            let specs = m.params();
            for s in &specs {
                assert_eq!(specs.iter().filter(|o| o.name == s.name).count(), 1, "{}.{}", m.name(), s.name);
                if let Some(d) = s.default {
                    s.check(d).unwrap_or_else(|e| panic!("{}: default invalid: {e}", m.name()));
                }
                assert!(s.search.0 <= s.search.1, "{}.{}", m.name(), s.name);
            }
        }
        for expected in [
            "linear",
            "slerp",
            "nuslerp",
            "task_arithmetic",
            "ties",
            "dare_ties",
            "dare_linear",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della",
            "della_linear",
            "model_stock",
            "passthrough",
            "multislerp",
            "karcher",
            "sce",
            "nearswap",
        ] {
            assert!(method(expected).is_some(), "{expected}");
        }
    }
}
