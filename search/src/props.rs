//! Property tests over every optimizer: asked genomes stay in bounds (integer genes integral),
//! ids are unique, and a checkpoint restores exactly.

mod tests {
    use proptest::prelude::*;

    use crate::base::{Evaluation, Optimizer, OptimizerState};
    use crate::space::{GeneKind, SearchSpace};
    use crate::{CmaEs, CmaEsConfig, Nsga2, Nsga2Config, RandomSearch};

    fn optimizers(space: &SearchSpace, seed: u64) -> Vec<Box<dyn Optimizer>> {
        vec![
            Box::new(RandomSearch::new(space.clone(), 6, 2, seed).expect("random")),
            Box::new(RandomSearch::new(space.clone(), 6, 2, seed).expect("random").with_start(space.upper.clone()).expect("start")),
            Box::new(CmaEs::new(space.clone(), &CmaEsConfig { seed, sigma0: 0.8, ..Default::default() }).expect("cmaes")),
            Box::new(Nsga2::new(space.clone(), &Nsga2Config { population: 6, objectives: 2, seed, ..Default::default() }).expect("nsga2")),
            Box::new(Nsga2::new(space.clone(), &Nsga2Config::nsga3(6, 2, None, seed)).expect("nsga3")),
        ]
    }

    /// Two objectives for every optimizer (CMA-ES takes only the first).
    fn eval(opt: &dyn Optimizer, id: u64, g: &[f64]) -> Evaluation {
        let f = g.iter().map(|x| (x - 0.3).powi(2)).sum::<f64>();
        let v = if opt.name() == "cmaes" { vec![f] } else { vec![f, g.iter().sum::<f64>()] };
        if id % 11 == 5 { Evaluation::failed(id, "x") } else { Evaluation::scored(id, v) }
    }

    fn space_strategy() -> impl Strategy<Value = SearchSpace> {
        // kind 0: real, 1: binary, 2: integer (its range widened to hold an integer)
        proptest::collection::vec((-5.0f64..5.0, 0.01f64..10.0, 0u8..3), 1..6).prop_map(|genes| {
            let names = (0..genes.len()).map(|i| format!("g{i}")).collect();
            let lower: Vec<f64> = genes.iter().map(|(lo, _, k)| if *k == 1 { -1.0 } else { *lo }).collect();
            let upper: Vec<f64> = genes
                .iter()
                .map(|(lo, w, k)| match k {
                    1 => 1.0,
                    2 => lo + w.max(1.0),
                    _ => lo + w,
                })
                .collect();
            let kinds = genes.iter().map(|(_, _, k)| [GeneKind::Real, GeneKind::Binary, GeneKind::Integer][*k as usize]).collect();
            SearchSpace::new(names, lower, upper, kinds).expect("space")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        #[test]
        fn in_bounds_unique_ids_and_exact_restore(space in space_strategy(), seed in 0u64..1000, cut in 0usize..6) {
            for mut opt in optimizers(&space, seed) {
                let mut seen = std::collections::BTreeSet::new();
                let mut restored: Option<Box<dyn Optimizer>> = None;
                for generation in 0..6 {
                    if generation == cut {
                        let name = opt.name();
                        restored = Some(OptimizerState::from_json(&opt.state().to_json()).expect("json").restore(name).expect("restore"));
                    }
                    let cands = opt.ask();
                    if let Some(r) = restored.as_mut() {
                        prop_assert_eq!(&r.ask(), &cands, "{} restored at generation {}", opt.name(), cut);
                    }
                    for c in &cands {
                        prop_assert!(space.contains(&c.genome), "{} asked {:?}", opt.name(), c.genome);
                        let integral = c.genome.iter().zip(&space.kinds).all(|(x, k)| *k != GeneKind::Integer || x.fract() == 0.0);
                        prop_assert!(integral, "{} asked a non-integer {:?}", opt.name(), c.genome);
                        prop_assert!(seen.insert(c.id), "{} repeated id {}", opt.name(), c.id);
                    }
                    let evals: Vec<Evaluation> = cands.iter().map(|c| eval(opt.as_ref(), c.id, &c.genome)).collect();
                    if let Some(r) = restored.as_mut() {
                        r.tell(evals.clone()).expect("tell restored");
                    }
                    opt.tell(evals).expect("tell");
                }
            }
        }
    }
}
