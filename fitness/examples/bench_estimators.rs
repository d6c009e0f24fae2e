//! Estimator fidelity on simulated IRT data (a benchmark, not a test).
//!
//! `cargo run --release -p evomerge-fitness --example bench_estimators [TRAIN_MODELS] [DIMS]`
//!
//! A 2PL population (1,000 items) gives training models (to fit IRT / anchors) and 100 test
//! "candidates" scored on 5 % and 10 % of the items. Prints the mean absolute error of the
//! estimated full-set accuracy (points, ×100) and Kendall's τ of the candidates' ranking for
//! random subsets, anchor points, IRT, p-IRT (on the random subset), gp-IRT (random subset)
//! and gp-IRT/a (anchor points). Reference (tinyBenchmarks): 1.5–2.9
//! points MAE at 100 items on real benchmarks; target gp-IRT ≤ 2 points and τ ≥ 0.9 at 10 %.

use evomerge_fitness::estimators::sim::{random_items, simulate};
use evomerge_fitness::estimators::{kendall_tau, weighted_mean, AnchorPoints, Irt, IrtConfig, Responses};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let train_models: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(300);
    let dims: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let (n_items, n_test) = (1000, 100);
    let all = simulate(train_models + n_test, n_items, dims, 7);
    let rows = |from: usize, to: usize| Responses::new(to - from, n_items, all.responses.data[from * n_items..to * n_items].to_vec());
    let (train, test) = (rows(0, train_models), rows(train_models, train_models + n_test));
    let fit = Irt::fit(&train, &IrtConfig { dims, ..Default::default() });
    // diagnostic: the simulation's own item parameters (what a perfect IRT fit would give)
    let oracle = Irt { dims, alpha: all.alpha.clone(), beta: all.beta.clone(), theta: vec![] };
    let truth: Vec<f64> = (0..n_test).map(|m| test.mean(m)).collect();
    println!("{train_models} training models, {dims}-D 2PL, {n_items} items, {n_test} test candidates");
    println!("{:<8} {:>8} {:>10} {:>8}", "budget", "method", "MAE (pts)", "tau");
    for k in [50usize, 100] {
        let rand_items = random_items(n_items, k, 11);
        let w = vec![1.0 / k as f64; k];
        let anchors = AnchorPoints::fit(&train, k, 13);
        let lam_rand = fit.choose_lambda(&train, &rand_items, &w);
        let lam_anchor = fit.choose_lambda(&train, &anchors.items, &anchors.weights);
        let mut est: Vec<(&str, Vec<f64>)> =
            vec![("random", vec![]), ("anchor", vec![]), ("IRT", vec![]), ("p-IRT", vec![]), ("gp-IRT", vec![]), ("gp-IRT/a", vec![]), ("p-IRT*", vec![])];
        for m in 0..n_test {
            let yr: Vec<f64> = rand_items.iter().map(|&i| test.get(m, i)).collect();
            let ya: Vec<f64> = anchors.items.iter().map(|&i| test.get(m, i)).collect();
            let naive_a = anchors.estimate(&ya);
            est[0].1.push(weighted_mean(&yr, &w).value);
            est[1].1.push(naive_a.value);
            est[2].1.push(fit.estimate(&rand_items, &yr).value);
            est[3].1.push(fit.estimate_p(&rand_items, &yr).value);
            est[4].1.push(fit.estimate_gp(&rand_items, &yr, weighted_mean(&yr, &w), lam_rand).value);
            est[5].1.push(fit.estimate_gp(&anchors.items, &ya, naive_a, lam_anchor).value);
            est[6].1.push(oracle.estimate_p(&rand_items, &yr).value);
        }
        for (name, e) in &est {
            let mae = e.iter().zip(&truth).map(|(a, b)| (a - b).abs()).sum::<f64>() / n_test as f64 * 100.0;
            println!("{:<8} {name:>8} {mae:>10.2} {:>8.3}", format!("{k} ({}%)", k * 100 / n_items), kendall_tau(e, &truth));
        }
        println!("         (p-IRT*: p-IRT with the true item parameters, the floor of the ability estimate)");
        println!("         (gp-IRT on the random subset λ = {lam_rand:.2}; gp-IRT/a on anchor points λ = {lam_anchor:.2})");
    }
}
