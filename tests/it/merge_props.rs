//! Property tests of every merge method on random inputs (proptest).

use evomerge_engine::merge::{self, BaseRole, MergeInput, MergeMethod, Params, Scope};
use proptest::prelude::*;

/// Parameters at their defaults, with `weight` and `t` (required ones) set.
fn params(m: &dyn MergeMethod, scope: Scope, weight: f64) -> Params {
    let mut p = Params::default();
    for s in m.params().into_iter().filter(|s| s.scope == scope) {
        let v = match s.name {
            "weight" => weight,
            "t" if m.name() == "nearswap" => 1e-3,
            "t" => 0.5,
            _ => s.default.unwrap_or(0.5),
        };
        p.set(s.name, v);
    }
    p
}

/// Runs `m` on `tensors` (base at index 0 when the method uses one).
fn run(m: &dyn MergeMethod, tensors: &[Vec<f32>], weights: &[f64], shape: &[usize]) -> Result<Vec<f32>, merge::MergeError> {
    let input = MergeInput {
        tensor: "model.layers.0.mlp.up_proj.weight",
        shape,
        tensors: tensors.iter().map(Vec::as_slice).collect(),
        base: (m.base_role() != BaseRole::Unused).then_some(0),
        model_params: weights.iter().map(|w| params(m, Scope::PerModel, *w)).collect(),
        params: params(m, Scope::Global, 0.0),
        seed: 1,
    };
    merge::base::merge_to_vec(m, &input)
}

fn arity(m: &dyn MergeMethod) -> usize {
    match m.name() {
        "passthrough" => 1,
        "slerp" | "nearswap" => 2,
        _ => 3,
    }
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn merging_identical_inputs_returns_the_input(x in proptest::collection::vec(-2f32..2.0, 12..64)) {
        let shape = [x.len() / 4, 4];
        let x = x[..shape[0] * 4].to_vec();
        for m in merge::registry() {
            let n = arity(m);
            let out = run(m, &vec![x.clone(); n], &vec![0.5; n], &shape).map_err(|e| TestCaseError::fail(format!("{}: {e}", m.name())))?;
            prop_assert!(close(&out, &x, 1e-5), "{}: {:?} vs {:?}", m.name(), &out[..4], &x[..4]);
        }
    }

    #[test]
    fn outputs_are_finite(v in proptest::collection::vec(-3f32..3.0, 48)) {
        let shape = [4, 4];
        let t: Vec<Vec<f32>> = v.chunks(16).map(<[f32]>::to_vec).collect();
        for m in merge::registry() {
            let n = arity(m);
            let out = run(m, &t[..n], &[0.3, 0.7, 0.5][..n], &shape).map_err(|e| TestCaseError::fail(format!("{}: {e}", m.name())))?;
            prop_assert_eq!(out.len(), 16);
            prop_assert!(out.iter().all(|y| y.is_finite()), "{}", m.name());
        }
    }

    #[test]
    fn weights_one_zero_return_the_first_model(a in proptest::collection::vec(-2f32..2.0, 16), b in proptest::collection::vec(-2f32..2.0, 16), base in proptest::collection::vec(-2f32..2.0, 16)) {
        let shape = [4, 4];
        let lin = merge::method("linear").expect("linear");
        prop_assert_eq!(run(lin, &[a.clone(), b.clone()], &[1.0, 0.0], &shape).expect("ok"), a.clone());
        for name in ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"] {
            let m = merge::method(name).expect("method");
            let out = run(m, &[base.clone(), a.clone(), b.clone()], &[0.0, 1.0, 0.0], &shape).expect("ok");
            // base + (a − base) rounds within an ulp of a; sparsifiers at density 1 keep all
            prop_assert!(close(&out, &a, 1e-6), "{}", name);
        }
    }

    #[test]
    fn slerp_endpoints(a in proptest::collection::vec(-2f32..2.0, 16), b in proptest::collection::vec(-2f32..2.0, 16)) {
        let m = merge::method("slerp").expect("slerp");
        for (t, want) in [(0.0, &a), (1.0, &b)] {
            let mut g = Params::default();
            g.set("t", t);
            let input = MergeInput { tensor: "w", shape: &[16], tensors: vec![&a, &b], base: Some(0),
                model_params: vec![Params::default(); 2], params: g, seed: 0 };
            let out = merge::base::merge_to_vec(m, &input).expect("ok");
            prop_assert!(close(&out, want, 1e-5), "t={}", t);
        }
    }
}

#[test]
fn slerp_midpoint_of_orthogonal_unit_vectors_stays_on_the_sphere() {
    let m = merge::method("slerp").expect("slerp");
    let (a, b) = (vec![1.0f32, 0.0], vec![0.0f32, 1.0]);
    let mut g = Params::default();
    g.set("t", 0.5);
    let input =
        MergeInput { tensor: "w", shape: &[2], tensors: vec![&a, &b], base: Some(0), model_params: vec![Params::default(); 2], params: g, seed: 0 };
    let out = merge::base::merge_to_vec(m, &input).expect("ok");
    let h = std::f32::consts::FRAC_1_SQRT_2;
    assert!((out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6, "{out:?}");
}

#[test]
fn linear_with_weights_summing_to_zero_does_not_divide_by_zero() {
    let m = merge::method("linear").expect("linear");
    let out = run(m, &[vec![1.0; 4], vec![3.0; 4]], &[1.0, -1.0], &[4]).expect("ok");
    assert_eq!(out, vec![-2.0; 4], "Σw·x without normalization");
}

#[test]
fn karcher_of_two_orthogonal_vectors_is_their_geodesic_midpoint() {
    let m = merge::method("karcher").expect("karcher");
    let out = run(m, &[vec![2.0, 0.0], vec![0.0, 2.0]], &[0.0, 0.0], &[2]).expect("ok");
    let want = 2.0 * std::f32::consts::FRAC_1_SQRT_2;
    assert!((out[0] - want).abs() < 1e-4 && (out[1] - want).abs() < 1e-4, "{out:?}");
}

#[test]
fn nearswap_moves_only_close_weights() {
    let m = merge::method("nearswap").expect("nearswap");
    let mut g = Params::default();
    g.set("t", 0.1);
    let (v0, v1) = (vec![0.0f32, 0.0], vec![0.05f32, 1.0]);
    let input =
        MergeInput { tensor: "w", shape: &[2], tensors: vec![&v0, &v1], base: Some(0), model_params: vec![Params::default(); 2], params: g, seed: 0 };
    let out = merge::base::merge_to_vec(m, &input).expect("ok");
    // |diff| 0.05 < t -> fully swapped; |diff| 1 -> λ = 0.1
    assert_eq!(out[0], 0.05);
    assert!((out[1] - 0.1).abs() < 1e-6, "{out:?}");
}

#[test]
fn sce_select_topk_keeps_high_variance_elements() {
    let m = merge::method("sce").expect("sce");
    let base = vec![0.0f32; 4];
    let (a, b) = (vec![1.0f32, 0.1, 0.0, 0.0], vec![-1.0f32, 0.1, 0.0, 0.0]);
    let mut g = Params::default();
    g.set("select_topk", 0.5);
    let input = MergeInput {
        tensor: "w",
        shape: &[4],
        tensors: vec![&base, &a, &b],
        base: Some(0),
        model_params: vec![Params::default(); 3],
        params: g,
        seed: 0,
    };
    let out = merge::base::merge_to_vec(m, &input).expect("ok");
    // one element has non-zero variance, so k = ⌊0.5·1⌋ = 0 elements survive selection
    assert_eq!(out, vec![0.0; 4]);
    let mut g = Params::default();
    g.set("select_topk", 1.0);
    let input = MergeInput { params: g, ..input };
    let out = merge::base::merge_to_vec(m, &input).expect("ok");
    // element 0: signs cancel, majority + (sum 0 ≥ 0) keeps a: weights equal -> 1.0
    assert_eq!(out[0], 1.0);
    assert!((out[1] - 0.1).abs() < 1e-7);
}
