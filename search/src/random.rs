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
        })
    }
}

impl RandomSearch {
    /// One uniform genome, pending under a new id.
    fn draw(&mut self) -> u64 {
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
