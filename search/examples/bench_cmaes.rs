//! Evaluations-to-1e-8 of CMA-ES on the standard functions (a benchmark, not a test).
//!
//! `cargo run --release -p evomerge-search --example bench_cmaes`
//!
//! Reference (pycma / Hansen's published figures for default CMA-ES, to 1e-8): n = 10 sphere
//! ≈ 1.5e3, ellipsoid ≈ 6e3, Rosenbrock ≈ 5.5e3; n = 40 sphere ≈ 4.5e3, ellipsoid ≈ 5.5e4,
//! Rosenbrock ≈ 4.5e4; IPOP-CMA-ES on Rastrigin (Auger & Hansen 2005) ≈ 1e5 at n = 10,
//! ≈ 1.5e6 at n = 40.

use evomerge_search::testfns::{ellipsoid, rastrigin, rosenbrock, sphere};
use evomerge_search::{CmaEs, CmaEsConfig, Evaluation, Optimizer, SearchSpace};

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
}
