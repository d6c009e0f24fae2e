//! Search-core benchmark (not a test): CMA-ES evaluations to f ≤ 1e-8 on the standard
//! functions, the hypervolume NSGA-II reaches on ZDT1-3 and NSGA-III on DTLZ2, and CMA-ES with
//! margin against thresholding on mixed binary–continuous functions.
//!
//! ```text
//! cargo run --release -p evomerge-search --example bench_search -- [--json] [--seeds N] [--only a,b]
//! ```
//!
//! `scripts/bench-search` runs this and the same problems through pycma and pymoo
//! (`scripts/bench_data/search_ref.py`: identical rows, budgets, seeds and JSON fields) and
//! prints both with their ratio. CMA-ES: x₀ = 3·1, σ₀ = 2 in the box [−5, 5] (reflected),
//! evaluations counted up to the first f ≤ 1e-8; Rastrigin with at most 9 IPOP restarts.
//! NSGA-II: N = 100, 250 generations (25,000 evaluations); NSGA-III: Das–Dennis directions of 12
//! partitions (91), N = 92, 434 generations (39,928 evaluations); hypervolume of the final front
//! w.r.t. 1.1 per objective. Medians over the seeds (of the solved runs, for CMA-ES).

use evomerge_search::pareto::hypervolume;
use evomerge_search::testfns::{dtlz2, ellipsoid, ellipsoid_leadingones, rastrigin, rosenbrock, sphere, sphere_onemax, zdt1, zdt2, zdt3};
use evomerge_search::{CmaEs, CmaEsConfig, Evaluation, GeneKind, Nsga2, Nsga2Config, Optimizer, SearchSpace};

const TARGET: f64 = 1e-8;

/// A single-objective test function.
type Objective = fn(&[f64]) -> f64;

struct Args {
    json: bool,
    seeds: u64,
    only: Vec<String>,
}

impl Args {
    fn parse() -> Result<Self, String> {
        let mut a = Args { json: false, seeds: 10, only: vec![] };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--json" => a.json = true,
                "--seeds" => a.seeds = it.next().and_then(|s| s.parse().ok()).filter(|&s| s > 0).ok_or("--seeds takes a positive integer")?,
                "--only" => a.only = it.next().ok_or("--only takes a comma-separated list")?.split(',').map(str::to_string).collect(),
                "-h" | "--help" => {
                    println!(
                        "bench_search [--json] [--seeds N (default 10)] [--only sphere,ellipsoid,rosenbrock,rastrigin,zdt1,zdt2,zdt3,dtlz2,mixed]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument '{other}' (see --help)")),
            }
        }
        Ok(a)
    }

    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let k = v.len();
    match k {
        0 => None,
        _ if k % 2 == 1 => Some(v[k / 2]),
        _ => Some(0.5 * (v[k / 2 - 1] + v[k / 2])),
    }
}

/// Drives `opt` on `f` until the first value ≤ `target` (its evaluation count, counted within
/// the generation in ask order) or the optimizer stops or `budget` is spent.
fn evals_to_target(opt: &mut CmaEs, f: &dyn Fn(&[f64]) -> f64, target: f64, budget: u64) -> Option<u64> {
    while opt.evaluations() < budget && opt.stop().is_none() {
        let done = opt.evaluations();
        let c = opt.ask();
        let values: Vec<f64> = c.iter().map(|c| f(&c.genome)).collect();
        if let Some(k) = values.iter().position(|v| *v <= target) {
            return Some(done + k as u64 + 1);
        }
        opt.tell(c.iter().zip(values).map(|(c, v)| Evaluation::scored(c.id, vec![v])).collect()).ok()?;
    }
    None
}

fn cma_run(n: usize, f: Objective, seed: u64, separable: bool, ipop: u32) -> Option<u64> {
    let space = SearchSpace::uniform(n, -5.0, 5.0).ok()?;
    let cfg = CmaEsConfig { x0: Some(vec![3.0; n]), sigma0: 0.2, seed, separable: Some(separable), ipop_restarts: ipop, ..Default::default() };
    evals_to_target(&mut CmaEs::new(space, &cfg).ok()?, &f, TARGET, 5_000_000)
}

fn cmaes_rows(a: &Args) {
    let rows: [(&str, usize, bool, u32); 9] = [
        ("sphere", 10, false, 0),
        ("ellipsoid", 10, false, 0),
        ("rosenbrock", 10, false, 0),
        ("rastrigin", 10, false, 9),
        ("sphere", 40, false, 0),
        ("ellipsoid", 40, false, 0),
        ("rosenbrock", 40, false, 0),
        ("rastrigin", 40, false, 9),
        ("ellipsoid", 200, true, 0),
    ];
    if !a.json {
        println!("{:<12} {:>4} {:>4} {:>14} {:>8}", "function", "n", "sep", "median evals", "solved");
    }
    for (name, n, sep, ipop) in rows {
        if !a.wants(name) {
            continue;
        }
        let f: Objective = match name {
            "sphere" => sphere,
            "ellipsoid" => ellipsoid,
            "rastrigin" => rastrigin,
            _ => rosenbrock,
        };
        let runs: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..a.seeds).map(|seed| s.spawn(move || cma_run(n, f, seed, sep, ipop))).collect();
            handles.into_iter().filter_map(|h| h.join().ok().flatten()).map(|e| e as f64).collect()
        });
        let solved = runs.len();
        let m = median(runs);
        if a.json {
            println!(
                "{{\"suite\":\"cmaes\",\"problem\":\"{name}\",\"n\":{n},\"separable\":{sep},\"median_evals\":{},\"solved\":{solved},\"runs\":{}}}",
                m.map_or("null".into(), |m| m.to_string()),
                a.seeds
            );
        } else {
            println!(
                "{name:<12} {n:>4} {:>4} {:>14} {solved:>5}/{}",
                if sep { "yes" } else { "" },
                m.map_or("-".into(), |m| format!("{m:.0}")),
                a.seeds
            );
        }
    }
}

/// Final-front hypervolume of NSGA-II (`partitions` = None) or NSGA-III.
fn moo_hv(f: fn(&[f64]) -> Vec<f64>, n: usize, m: usize, pop: usize, evals: usize, partitions: Option<usize>, seed: u64) -> f64 {
    let Ok(space) = SearchSpace::uniform(n, 0.0, 1.0) else { return 0.0 };
    let cfg = match partitions {
        None => Nsga2Config { population: pop, objectives: m, seed, ..Default::default() },
        Some(p) => Nsga2Config::nsga3(pop, m, Some(p), seed),
    };
    let Ok(mut opt) = Nsga2::new(space, &cfg) else { return 0.0 };
    for _ in 0..evals / pop {
        let c = opt.ask();
        if opt.tell(c.iter().map(|c| Evaluation::scored(c.id, f(&c.genome))).collect()).is_err() {
            return 0.0;
        }
    }
    let pts: Vec<Vec<f64>> = opt.front().into_iter().map(|(_, o)| o.to_vec()).collect();
    hypervolume(&pts, &vec![1.1; m])
}

#[allow(clippy::type_complexity)]
fn moo_rows(a: &Args) {
    let rows: [(&str, fn(&[f64]) -> Vec<f64>, usize, usize, usize, usize, Option<usize>); 4] = [
        ("zdt1", zdt1, 30, 2, 100, 25_000, None),
        ("zdt2", zdt2, 30, 2, 100, 25_000, None),
        ("zdt3", zdt3, 30, 2, 100, 25_000, None),
        ("dtlz2", dtlz2, 12, 3, 92, 40_000, Some(12)),
    ];
    if !a.json {
        println!("\n{:<8} {:<8} {:>6} {:>8} {:>10}", "problem", "method", "genes", "evals", "median HV");
    }
    for (name, f, n, m, pop, evals, partitions) in rows {
        if !a.wants(name) {
            continue;
        }
        let hv: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..a.seeds).map(|seed| s.spawn(move || moo_hv(f, n, m, pop, evals, partitions, seed))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).collect()
        });
        let used = evals / pop * pop;
        let med = median(hv).unwrap_or(0.0);
        let method = if partitions.is_some() { "nsga3" } else { "nsga2" };
        if a.json {
            println!(
                "{{\"suite\":\"moo\",\"problem\":\"{name}\",\"method\":\"{method}\",\"n\":{n},\"evals\":{used},\"median_hv\":{med},\"runs\":{}}}",
                a.seeds
            );
        } else {
            println!("{name:<8} {method:<8} {n:>6} {used:>8} {med:>10.4}");
        }
    }
}

fn main() {
    let a = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_search: {e}");
            std::process::exit(2);
        }
    };
    cmaes_rows(&a);
    moo_rows(&a);
    if a.wants("mixed") {
        mixed_rows(&a);
    }
}

/// Evaluations of CMA-ES (with margin, or thresholding with `margin = 0`) to f ≤ 1e-8 on a
/// mixed function of `n` genes: continuous in [−5, 5] from 3, binary in [−1, 1] from 0 (the
/// threshold), σ₀ = 0.2 of each range.
fn mixed_run(f: Objective, n: usize, margin: Option<f64>, seed: u64) -> Option<u64> {
    let h = n / 2;
    let kinds = (0..n).map(|i| if i < h { GeneKind::Real } else { GeneKind::Binary }).collect();
    let lower = (0..n).map(|i| if i < h { -5.0 } else { -1.0 }).collect();
    let upper = (0..n).map(|i| if i < h { 5.0 } else { 1.0 }).collect();
    let space = SearchSpace::new((0..n).map(|i| format!("x{i}")).collect(), lower, upper, kinds).ok()?;
    let x0 = (0..n).map(|i| if i < h { 3.0 } else { 0.0 }).collect();
    let cfg = CmaEsConfig { x0: Some(x0), sigma0: 0.2, margin, seed, ..Default::default() };
    evals_to_target(&mut CmaEs::new(space, &cfg).ok()?, &f, TARGET, 200_000)
}

fn mixed_rows(a: &Args) {
    if !a.json {
        println!("\n{:<22} {:>4} {:<12} {:>14} {:>8}", "mixed function", "n", "discrete", "median evals", "solved");
    }
    let rows: [(&str, Objective, usize); 4] = [
        ("sphere_onemax", sphere_onemax, 20),
        ("sphere_onemax", sphere_onemax, 40),
        ("ellipsoid_leadingones", ellipsoid_leadingones, 20),
        ("ellipsoid_leadingones", ellipsoid_leadingones, 40),
    ];
    for (name, f, n) in rows {
        for (method, margin) in [("margin", None), ("threshold", Some(0.0))] {
            let runs: Vec<f64> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..a.seeds).map(|seed| s.spawn(move || mixed_run(f, n, margin, seed))).collect();
                handles.into_iter().filter_map(|h| h.join().ok().flatten()).map(|e| e as f64).collect()
            });
            let solved = runs.len();
            let m = median(runs);
            if a.json {
                println!(
                    "{{\"suite\":\"mixed\",\"problem\":\"{name}\",\"method\":\"{method}\",\"n\":{n},\"median_evals\":{},\"solved\":{solved},\"runs\":{}}}",
                    m.map_or("null".into(), |m| m.to_string()),
                    a.seeds
                );
            } else {
                println!("{name:<22} {n:>4} {method:<12} {:>14} {solved:>5}/{}", m.map_or("-".into(), |m| format!("{m:.0}")), a.seeds);
            }
        }
    }
}
