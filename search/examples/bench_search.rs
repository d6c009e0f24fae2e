//! Search-core benchmark (not a test): CMA-ES evaluations to 1e-8 on the standard functions,
//! and the hypervolume NSGA-II reaches on ZDT1-3 and DTLZ2.
//!
//! `cargo run --release -p evomerge-search --example bench_search`
//!
//! Reference (pycma / Hansen's published figures for default CMA-ES, to 1e-8): n = 10 sphere
//! ≈ 1.5e3, ellipsoid ≈ 6e3, Rosenbrock ≈ 5.5e3; n = 40 sphere ≈ 4.5e3, ellipsoid ≈ 5.5e4,
//! Rosenbrock ≈ 4.5e4; IPOP-CMA-ES on Rastrigin (Auger & Hansen 2005) ≈ 1e5 at n = 10,
//! ≈ 1.5e6 at n = 40.

use evomerge_search::pareto::hypervolume;
use evomerge_search::testfns::{dtlz2, ellipsoid, rastrigin, rosenbrock, sphere, zdt1, zdt2, zdt3};
use evomerge_search::{CmaEs, CmaEsConfig, Evaluation, Nsga2, Nsga2Config, Optimizer, SearchSpace};

fn run(n: usize, f: fn(&[f64]) -> f64, seed: u64, separable: bool, ipop: u32) -> Option<u64> {
    let space = SearchSpace::uniform(n, -5.0, 5.0).ok()?;
    let cfg = CmaEsConfig { x0: Some(vec![3.0; n]), sigma0: 0.2, seed, separable: Some(separable), ipop_restarts: ipop, ..Default::default() };
    let mut opt = CmaEs::new(space, &cfg).ok()?;
    while opt.evaluations() < 5_000_000 {
        let c = opt.ask();
        opt.tell(c.iter().map(|c| Evaluation::scored(c.id, vec![f(&c.genome)])).collect()).ok()?;
        if opt.best().is_some_and(|(_, v)| v < 1e-8) {
            return Some(opt.evaluations());
        }
        if opt.stop().is_some() {
            return None;
        }
    }
    None
}

fn main() {
    let refs = [
        ("sphere", 10, 1500.0),
        ("ellipsoid", 10, 6000.0),
        ("rosenbrock", 10, 5500.0),
        ("rastrigin", 10, 1.0e5),
        ("sphere", 40, 4500.0),
        ("ellipsoid", 40, 55000.0),
        ("rosenbrock", 40, 45000.0),
        ("rastrigin", 40, 1.5e6),
    ];
    println!("{:<12} {:>4} {:>14} {:>10} {:>8}", "function", "n", "median evals", "reference", "ratio");
    for (name, n, reference) in refs {
        let f: fn(&[f64]) -> f64 = match name {
            "sphere" => sphere,
            "ellipsoid" => ellipsoid,
            "rastrigin" => rastrigin,
            _ => rosenbrock,
        };
        let ipop = if name == "rastrigin" { 9 } else { 0 };
        let mut runs: Vec<u64> = (0..5).filter_map(|s| run(n, f, s, false, ipop)).collect();
        runs.sort_unstable();
        let solved = runs.len();
        let median = runs.get(solved / 2).copied().unwrap_or(0);
        println!("{name:<12} {n:>4} {median:>10} ({solved}/5) {reference:>10} {:>8.2}", median as f64 / reference);
    }
    let mut sep: Vec<u64> = (0..3).filter_map(|s| run(200, ellipsoid, s, true, 0)).collect();
    sep.sort_unstable();
    println!("sep-CMA ellipsoid n=200: median {} evaluations ({}/3 solved)", sep.get(sep.len() / 2).copied().unwrap_or(0), sep.len());
    nsga2_table();
}

/// NSGA-II front hypervolume after `gens` generations of 100.
fn nsga2_hv(f: fn(&[f64]) -> Vec<f64>, n: usize, m: usize, gens: usize, seed: u64, r: &[f64]) -> f64 {
    let Ok(space) = SearchSpace::uniform(n, 0.0, 1.0) else { return 0.0 };
    let Ok(mut opt) = Nsga2::new(space, &Nsga2Config { population: 100, objectives: m, seed, ..Default::default() }) else { return 0.0 };
    for _ in 0..gens {
        let c = opt.ask();
        if opt.tell(c.iter().map(|c| Evaluation::scored(c.id, f(&c.genome))).collect()).is_err() {
            return 0.0;
        }
    }
    let pts: Vec<Vec<f64>> = opt.front().into_iter().map(|(_, o)| o.to_vec()).collect();
    hypervolume(&pts, r)
}

/// Optimal hypervolume of a ZDT front (g = 1, dense sample of f1).
fn zdt_optimum(f: fn(&[f64]) -> Vec<f64>, r: &[f64]) -> f64 {
    let pts: Vec<Vec<f64>> = (0..=20_000).map(|i| f(&[i as f64 / 20_000.0, 0.0])).collect();
    hypervolume(&pts, r)
}

#[allow(clippy::type_complexity)]
fn nsga2_table() {
    println!("\n{:<8} {:>6} {:>10} {:>10} {:>8}", "problem", "genes", "HV", "optimal", "ratio");
    let r2 = [1.1, 1.1];
    let problems: [(&str, fn(&[f64]) -> Vec<f64>); 3] = [("zdt1", zdt1), ("zdt2", zdt2), ("zdt3", zdt3)];
    for (name, f) in problems {
        let mut hv: Vec<f64> = (0..5).map(|s| nsga2_hv(f, 30, 2, 200, s, &r2)).collect();
        hv.sort_by(f64::total_cmp);
        let opt = zdt_optimum(f, &r2);
        println!("{name:<8} {:>6} {:>10.4} {opt:>10.4} {:>8.3}", 30, hv[2], hv[2] / opt);
    }
    let r3 = [1.1, 1.1, 1.1];
    let mut hv: Vec<f64> = (0..5).map(|s| nsga2_hv(dtlz2, 12, 3, 200, s, &r3)).collect();
    hv.sort_by(f64::total_cmp);
    let opt = 1.1f64.powi(3) - std::f64::consts::PI / 6.0;
    println!("{:<8} {:>6} {:>10.4} {opt:>10.4} {:>8.3}", "dtlz2", 12, hv[2], hv[2] / opt);
    println!("(median of 5 seeds, N = 100, 200 generations = 20,100 evaluations, reference point 1.1 per objective)");
}
