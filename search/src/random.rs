//! Random search: every gene uniform in its bounds (integer genes: uniform over their integers) — the baseline every experiment can be
//! compared with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::base::{BestSoFar, Candidate, Evaluation, Optimizer, OptimizerState, StopReason, take_told};
use crate::error::SearchError;
use crate::rng::Rng;
use crate::space::SearchSpace;

/// Uniform sampling in batches of `batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RandomSearch {
    space: SearchSpace,
    batch: usize,
    objectives: usize,
    rng: Rng,
    next_id: u64,
    generation: u64,
    pending: BTreeMap<u64, Vec<f64>>,
    told: u64,
    best: BestSoFar,
    /// Driven by `ask_one` (asynchronous mode).
    #[serde(default)]
    steady: bool,
    /// The genome asked first (a run's start point), in the genes' units; checkpoints written
    /// before it have none.
    #[serde(default)]
    start: Option<Vec<f64>>,
}

impl RandomSearch {
    pub fn new(space: SearchSpace, batch: usize, objectives: usize, seed: u64) -> Result<Self, SearchError> {
        space.validate()?;
        if batch == 0 || objectives == 0 {
            return Err(SearchError::BadConfig("batch and objective count must be positive".into()));
        }
        Ok(Self {
            space,
            batch,
            objectives,
            rng: Rng::seeded(seed),
            next_id: 0,
            generation: 0,
            pending: BTreeMap::new(),
            told: 0,
            best: BestSoFar::default(),
            steady: false,
            start: None,
        })
    }

    /// Asks `x` (clamped into the bounds, integer genes rounded) as candidate 0, before the uniform draws: a run's
    /// start point is then always scored, as CMA-ES's mean and NSGA-II's first population are.
    pub fn with_start(mut self, x: Vec<f64>) -> Result<Self, SearchError> {
        if x.len() != self.space.dim() {
            return Err(SearchError::BadConfig(format!("start point has {} genes, the space {}", x.len(), self.space.dim())));
        }
        let space = &self.space;
        self.start = Some(
            x.iter()
                .enumerate()
                .map(|(i, v)| if space.kinds[i] == crate::GeneKind::Integer { space.round(i, *v) } else { v.clamp(space.lower[i], space.upper[i]) })
                .collect(),
        );
        Ok(self)
    }
}

impl RandomSearch {
    /// One uniform genome, pending under a new id.
    fn draw(&mut self) -> u64 {
        if self.next_id == 0
            && let Some(x) = self.start.clone()
        {
            self.pending.insert(0, x);
            self.next_id = 1;
            return 0;
        }
        let g: Vec<f64> = (0..self.space.dim())
            .map(|i| match (self.space.kinds[i], self.space.levels(i)) {
                (crate::GeneKind::Integer, Some(levels)) => levels[self.rng.below(levels.len())],
                _ => self.space.lower[i] + (self.space.upper[i] - self.space.lower[i]) * self.rng.uniform(),
            })
            .collect();
        let id = self.next_id;
        self.pending.insert(id, g);
        self.next_id += 1;
        id
    }
}

impl Optimizer for RandomSearch {
    fn name(&self) -> &'static str {
        "random"
    }

    fn space(&self) -> &SearchSpace {
        &self.space
    }

    fn ask(&mut self) -> Vec<Candidate> {
        if self.pending.is_empty() {
            for _ in 0..self.batch {
                self.draw();
            }
        }
        self.in_flight()
    }

    fn ask_one(&mut self) -> Option<Candidate> {
        self.steady = true;
        let id = self.draw();
        // "generations" of `batch` candidates, for reports
        self.generation = id / self.batch as u64;
        Some(Candidate { id, generation: self.generation, genome: self.pending[&id].clone() })
    }

    fn in_flight(&self) -> Vec<Candidate> {
        // asynchronous mode numbers a candidate's generation by its id
        let generation = |id: u64| if self.steady { id / self.batch as u64 } else { self.generation };
        self.pending.iter().map(|(&id, g)| Candidate { id, generation: generation(id), genome: g.clone() }).collect()
    }

    fn tell(&mut self, evaluations: Vec<Evaluation>) -> Result<(), SearchError> {
        for (_, g, v) in take_told(&mut self.pending, &evaluations, self.objectives)? {
            self.told += 1;
            if let Some(v) = v {
                self.best.offer(v[0], || g);
            }
        }
        if self.pending.is_empty() && !self.steady {
            self.generation += 1;
        }
        Ok(())
    }

    fn stop(&self) -> Option<StopReason> {
        None
    }

    fn best(&self) -> Option<(&[f64], f64)> {
        self.best.get()
    }

    fn evaluations(&self) -> u64 {
        self.told
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn state(&self) -> OptimizerState {
        OptimizerState::Random(Box::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_point_is_candidate_zero_then_the_same_draws_follow() {
        let space = SearchSpace::uniform(3, 0.0, 1.0).expect("space");
        let mut plain = RandomSearch::new(space.clone(), 4, 1, 7).expect("random");
        let mut started = RandomSearch::new(space, 4, 1, 7).expect("random").with_start(vec![0.5, 2.0, -1.0]).expect("start");
        let (a, b) = (plain.ask(), started.ask());
        assert_eq!(b[0].genome, vec![0.5, 1.0, 0.0], "clamped into the bounds");
        assert_eq!(b[1..].iter().map(|c| &c.genome).collect::<Vec<_>>(), a[..3].iter().map(|c| &c.genome).collect::<Vec<_>>());
        assert!(RandomSearch::new(SearchSpace::uniform(3, 0.0, 1.0).expect("space"), 4, 1, 7).expect("random").with_start(vec![0.5]).is_err());
    }
}
