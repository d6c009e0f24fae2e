//! NSGA-II (Deb, Pratap, Agarwal & Meyarivan, "A fast and elitist multiobjective genetic
//! algorithm: NSGA-II", IEEE TEC 2002), constraint-free.
//!
//! Each generation: N offspring by binary tournament (lower rank wins, then larger crowding
//! distance; contestants drawn from a shuffled population, so each meets as many tournaments
//! as the others), none a copy of a parent or of another child, then per pair **SBX** crossover (probability `crossover_prob`, each real gene
//! with probability ½, distribution index η_c, bounded form of Deb's reference code) and
//! **polynomial mutation** (each real gene with probability `1/n` by default, index η_m);
//! **binary genes** get uniform crossover and bit flips instead (on = `upper`, off = `lower`);
//! **integer genes** get SBX and polynomial mutation as reals, then are rounded.
//! Parents and offspring (2N) are ranked by fast non-dominated sort; whole fronts fill the next
//! population and the last front is cut by descending crowding distance (ties by id).
//!
//! **Failed candidates rank last:** they are given +∞ in every objective, so any scored
//! candidate dominates them.
//!
//! **NSGA-III** (Deb & Jain, "An evolutionary many-objective optimization algorithm using
//! reference-point-based nondominated sorting approach", IEEE TEC 2014) is the same loop with
//! two changes, chosen by [`Nsga2Config::nsga3`]: parents are drawn uniformly at random, and the
//! last front is cut by **reference directions** instead of crowding distance. The directions
//! are Das–Dennis's (every point of the unit simplex whose coordinates are multiples of
//! 1/p). The survivors' objectives are normalized by the ideal point (running minimum) and the
//! intercepts of the hyperplane through the extreme points (minimum achievement scalarizing
//! function per axis, kept across generations), falling back to the worst point of the front
//! when the hyperplane is degenerate — pymoo's variant of the paper's normalization. Each
//! member is associated with the direction nearest to it (perpendicular distance); the last
//! front then fills the least crowded directions first (the member nearest to an empty
//! direction, a random one otherwise). With three or more objectives crowding distance spreads
//! a front poorly; the directions keep it spread.

#![allow(clippy::needless_range_loop)] // per-gene operators index several genomes at once

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::base::{BestSoFar, Candidate, Evaluation, Optimizer, OptimizerState, StopReason, take_told};
use crate::error::SearchError;
use crate::pareto::{crowding_distance, nondominated_ranks};
use crate::rng::Rng;
use crate::space::{GeneKind, SearchSpace};

/// Settings of [`Nsga2`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Nsga2Config {
    /// Population size N (even; default 40).
    pub population: usize,
    pub objectives: usize,
    pub crossover_prob: f64,
    pub eta_c: f64,
    pub eta_m: f64,
    /// Per-gene mutation probability (default 1/n).
    pub mutation_prob: Option<f64>,
    pub seed: u64,
    /// Genomes (gene units) placed in the first population before the random ones, e.g. the
    /// start point of a search (a data-flow search starting from model A itself). Clipped to
    /// the bounds; at most `population` are used.
    #[serde(default)]
    pub initial: Vec<Vec<f64>>,
    /// NSGA-III: reference-direction survival and random mating (module doc).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nsga3: bool,
    /// NSGA-III: Das–Dennis partitions per objective (`C(M + p − 1, p)` directions). Default:
    /// the most whose directions fit in the population.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<usize>,
}

impl Default for Nsga2Config {
    fn default() -> Self {
        Self {
            population: 40,
            objectives: 2,
            crossover_prob: 0.9,
            eta_c: 15.0,
            eta_m: 20.0,
            mutation_prob: None,
            seed: 0,
            initial: vec![],
            nsga3: false,
            partitions: None,
        }
    }
}

impl Nsga2Config {
    /// NSGA-III with Deb & Jain's operator settings (SBX with probability 1 and η_c = 30,
    /// polynomial mutation η_m = 20, as pymoo's NSGA3).
    pub fn nsga3(population: usize, objectives: usize, partitions: Option<usize>, seed: u64) -> Self {
        Self { population, objectives, crossover_prob: 1.0, eta_c: 30.0, nsga3: true, partitions, seed, ..Default::default() }
    }
}

/// Matings per child before a duplicate genome is accepted.
const DUPLICATE_TRIES: usize = 20;

/// A genome's bits, for exact duplicate detection (−0 and +0 alike).
fn genome_key(g: &[f64]) -> Vec<u64> {
    g.iter().map(|x| (x + 0.0).to_bits()).collect()
}

/// Number of Das–Dennis directions for `m` objectives and `p` partitions: `C(m + p − 1, p)`.
pub fn das_dennis_count(m: usize, p: usize) -> usize {
    // C(m + p − 1, m − 1), multiplied out without overflow for the sizes that matter
    (1..m).fold(1usize, |acc, k| acc.saturating_mul(p + k) / k)
}

/// Every point of the unit simplex in `m` dimensions whose coordinates are multiples of `1/p`.
pub fn das_dennis(m: usize, p: usize) -> Vec<Vec<f64>> {
    fn fill(m: usize, left: usize, p: usize, prefix: &mut Vec<usize>, out: &mut Vec<Vec<f64>>) {
        if prefix.len() == m - 1 {
            prefix.push(left);
            out.push(prefix.iter().map(|&k| k as f64 / p as f64).collect());
            prefix.pop();
            return;
        }
        for k in 0..=left {
            prefix.push(k);
            fill(m, left - k, p, prefix, out);
            prefix.pop();
        }
    }
    let mut out = Vec::with_capacity(das_dennis_count(m, p));
    if m > 0 && p > 0 {
        fill(m, p, p, &mut Vec::with_capacity(m), &mut out);
    }
    out
}

/// How many reference directions NSGA-III uses for `objectives` and `population` (with
/// `partitions`, or the most that fit): an error when the population cannot hold them.
pub fn nsga3_directions(objectives: usize, population: usize, partitions: Option<usize>) -> Result<usize, SearchError> {
    Nsga2::directions(&Nsga2Config::nsga3(population, objectives, partitions, 0)).map(|d| d.len())
}

/// NSGA-III's normalization memory: the running ideal and worst points and the extreme points.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Normalization {
    ideal: Vec<f64>,
    worst: Vec<f64>,
    extremes: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Member {
    id: u64,
    genome: Vec<f64>,
    /// `None` = failed.
    objectives: Option<Vec<f64>>,
    rank: usize,
    crowding: f64,
}

/// NSGA-II state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nsga2 {
    space: SearchSpace,
    cfg: Nsga2Config,
    rng: Rng,
    parents: Vec<Member>,
    pending: BTreeMap<u64, Vec<f64>>,
    told: BTreeMap<u64, Member>,
    next_id: u64,
    generation: u64,
    evaluations: u64,
    best: BestSoFar,
    /// Driven by `ask_one` (steady state, asynchronous mode).
    #[serde(default)]
    steady: bool,
    /// Asynchronous mode: the generation count each pending candidate was asked in.
    #[serde(default)]
    asked_in: BTreeMap<u64, u64>,
    /// NSGA-III: the reference directions (empty for NSGA-II).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    directions: Vec<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    norm: Option<Normalization>,
    /// Tournament contestants not drawn yet (indices into `parents`; see `tournament`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    shuffled: Vec<usize>,
}

impl Nsga2 {
    pub fn new(space: SearchSpace, cfg: &Nsga2Config) -> Result<Self, SearchError> {
        space.validate()?;
        if cfg.population < 4 || !cfg.population.is_multiple_of(2) {
            return Err(SearchError::BadConfig(format!("population {} must be even and ≥ 4", cfg.population)));
        }
        if cfg.objectives == 0 {
            return Err(SearchError::BadConfig("at least one objective".into()));
        }
        if !(0.0..=1.0).contains(&cfg.crossover_prob) || cfg.eta_c < 0.0 || cfg.eta_m < 0.0 {
            return Err(SearchError::BadConfig("crossover_prob in [0, 1], eta_c and eta_m ≥ 0".into()));
        }
        if let Some(g) = cfg.initial.iter().find(|g| g.len() != space.dim() || g.iter().any(|v| !v.is_finite())) {
            return Err(SearchError::BadConfig(format!("initial genome of {} genes (expected {} finite values)", g.len(), space.dim())));
        }
        let directions = if cfg.nsga3 { Self::directions(cfg)? } else { vec![] };
        Ok(Self {
            space,
            cfg: cfg.clone(),
            rng: Rng::seeded(cfg.seed),
            parents: Vec::new(),
            pending: BTreeMap::new(),
            told: BTreeMap::new(),
            next_id: 0,
            generation: 0,
            evaluations: 0,
            best: BestSoFar::default(),
            steady: false,
            asked_in: BTreeMap::new(),
            norm: cfg.nsga3.then(Normalization::default),
            shuffled: vec![],
            directions,
        })
    }

    /// NSGA-III's reference directions for `cfg` (the population must hold them).
    fn directions(cfg: &Nsga2Config) -> Result<Vec<Vec<f64>>, SearchError> {
        let (m, n) = (cfg.objectives, cfg.population);
        if m < 2 {
            return Err(SearchError::BadConfig("NSGA-III needs at least 2 objectives".into()));
        }
        let p = match cfg.partitions {
            Some(0) => return Err(SearchError::BadConfig("NSGA-III: partitions must be at least 1".into())),
            Some(p) => p,
            None => (1..).take_while(|&p| das_dennis_count(m, p) <= n).last().unwrap_or(1),
        };
        let h = das_dennis_count(m, p);
        if h > n {
            let fit = (1..).take_while(|&p| das_dennis_count(m, p) <= n).last();
            return Err(SearchError::BadConfig(format!(
                "NSGA-III: {h} reference directions ({p} partitions, {m} objectives) need a population of at least {h}, not {n}; {}",
                match fit {
                    Some(q) => format!("raise the population or use at most {q} partitions ({} directions)", das_dennis_count(m, q)),
                    None => format!("raise the population to at least {}", das_dennis_count(m, 1).next_multiple_of(2).max(4)),
                }
            )));
        }
        Ok(das_dennis(m, p))
    }

    /// NSGA-III's reference directions (empty for NSGA-II).
    pub fn reference_directions(&self) -> &[Vec<f64>] {
        &self.directions
    }

    /// The current non-dominated set: `(genome, objectives)` of the rank-0 scored parents.
    pub fn front(&self) -> Vec<(&[f64], &[f64])> {
        self.parents.iter().filter(|m| m.rank == 0).filter_map(|m| m.objectives.as_deref().map(|o| (m.genome.as_slice(), o))).collect()
    }

    fn random_genome(&mut self) -> Vec<f64> {
        (0..self.space.dim())
            .map(|i| {
                let (lo, hi) = (self.space.lower[i], self.space.upper[i]);
                match self.space.kinds[i] {
                    GeneKind::Real => lo + (hi - lo) * self.rng.uniform(),
                    GeneKind::Integer => {
                        let levels = self.space.levels(i).unwrap_or_default();
                        levels[self.rng.below(levels.len())]
                    }
                    GeneKind::Binary => {
                        if self.rng.uniform() < 0.5 {
                            hi
                        } else {
                            lo
                        }
                    }
                }
            })
            .collect()
    }

    /// A binary tournament's winner. Contestants are drawn without replacement from a shuffled
    /// population, reshuffled when spent (as pymoo's tournament selection), so every member
    /// meets the same number of tournaments. NSGA-III: a random member.
    fn tournament(&mut self) -> usize {
        if self.cfg.nsga3 {
            return self.rng.below(self.parents.len());
        }
        let (a, b) = (self.contestant(), self.contestant());
        let (pa, pb) = (&self.parents[a], &self.parents[b]);
        if pa.rank != pb.rank {
            return if pa.rank < pb.rank { a } else { b };
        }
        if pa.crowding > pb.crowding { a } else { b }
    }

    /// N children, none a copy of a parent or of another child (as pymoo's duplicate
    /// elimination: a child left unchanged by crossover and mutation would spend an evaluation
    /// on a known genome); after `DUPLICATE_TRIES` matings per child copies are let through
    /// (a space of a few on/off genes has few distinct genomes).
    fn offspring(&mut self) -> Vec<Vec<f64>> {
        let n = self.cfg.population;
        let mut seen: HashSet<Vec<u64>> = self.parents.iter().map(|m| genome_key(&m.genome)).collect();
        let mut kids = Vec::with_capacity(n);
        let mut matings = 0;
        while kids.len() < n {
            let (c1, c2) = self.mate();
            matings += 1;
            for c in [c1, c2] {
                if kids.len() < n && (seen.insert(genome_key(&c)) || matings > DUPLICATE_TRIES * n) {
                    kids.push(c);
                }
            }
        }
        kids
    }

    /// One child for the steady state, not a copy of a parent or of a pending candidate (at
    /// most `DUPLICATE_TRIES` matings).
    fn steady_child(&mut self) -> Vec<f64> {
        let seen: HashSet<Vec<u64>> = self.parents.iter().map(|m| &m.genome).chain(self.pending.values()).map(|g| genome_key(g)).collect();
        let mut child = self.mate().0;
        for _ in 1..DUPLICATE_TRIES {
            if !seen.contains(&genome_key(&child)) {
                break;
            }
            child = self.mate().0;
        }
        child
    }

    /// The next member of the shuffled population (shuffled again when spent).
    fn contestant(&mut self) -> usize {
        let n = self.parents.len();
        if self.shuffled.is_empty() {
            self.shuffled = (0..n).collect();
            for i in (1..n).rev() {
                let j = self.rng.below(i + 1);
                self.shuffled.swap(i, j);
            }
        }
        self.shuffled.pop().unwrap_or(0)
    }

    /// Two children of two tournament winners: crossover, then mutation.
    fn mate(&mut self) -> (Vec<f64>, Vec<f64>) {
        let n = self.space.dim();
        let pm = self.cfg.mutation_prob.unwrap_or(1.0 / n as f64);
        let (a, b) = (self.tournament(), self.tournament());
        let mut c1 = self.parents[a].genome.clone();
        let mut c2 = self.parents[b].genome.clone();
        if self.rng.uniform() < self.cfg.crossover_prob {
            for i in 0..n {
                let swap = self.rng.uniform() < 0.5;
                match self.space.kinds[i] {
                    GeneKind::Binary => {
                        if swap {
                            std::mem::swap(&mut c1[i], &mut c2[i]);
                        }
                    }
                    GeneKind::Real | GeneKind::Integer => {
                        if swap && (c1[i] - c2[i]).abs() > 1e-14 {
                            let (x, y) = self.sbx(c1[i], c2[i], i);
                            c1[i] = x;
                            c2[i] = y;
                        }
                    }
                }
            }
        }
        for c in [&mut c1, &mut c2] {
            for i in 0..n {
                if self.rng.uniform() < pm {
                    let (lo, hi) = (self.space.lower[i], self.space.upper[i]);
                    c[i] = match self.space.kinds[i] {
                        GeneKind::Binary => {
                            if c[i] > 0.0 {
                                lo
                            } else {
                                hi
                            }
                        }
                        GeneKind::Real | GeneKind::Integer => self.mutate(c[i], lo, hi),
                    };
                }
                if self.space.kinds[i] == GeneKind::Integer {
                    c[i] = self.space.round(i, c[i]);
                }
            }
        }
        (c1, c2)
    }

    /// The `k`-th genome of the first population: an initial genome (clipped), else random.
    fn first_population_genome(&mut self, k: usize) -> Vec<f64> {
        match self.cfg.initial.get(k).filter(|_| k < self.cfg.population) {
            Some(x) => x
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let v = v.clamp(self.space.lower[i], self.space.upper[i]);
                    if self.space.kinds[i] == GeneKind::Integer { self.space.round(i, v) } else { v }
                })
                .collect(),
            None => self.random_genome(),
        }
    }

    /// Bounded SBX of Deb's reference implementation.
    fn sbx(&mut self, x1: f64, x2: f64, i: usize) -> (f64, f64) {
        let (lb, ub, eta) = (self.space.lower[i], self.space.upper[i], self.cfg.eta_c);
        let (y1, y2) = (x1.min(x2), x1.max(x2));
        let u = self.rng.uniform();
        let betaq = |beta: f64| {
            let alpha = 2.0 - beta.powf(-(eta + 1.0));
            if u <= 1.0 / alpha { (u * alpha).powf(1.0 / (eta + 1.0)) } else { (1.0 / (2.0 - u * alpha)).powf(1.0 / (eta + 1.0)) }
        };
        let c1 = 0.5 * ((y1 + y2) - betaq(1.0 + 2.0 * (y1 - lb) / (y2 - y1)) * (y2 - y1));
        let c2 = 0.5 * ((y1 + y2) + betaq(1.0 + 2.0 * (ub - y2) / (y2 - y1)) * (y2 - y1));
        let (c1, c2) = (c1.clamp(lb, ub), c2.clamp(lb, ub));
        if self.rng.uniform() < 0.5 { (c2, c1) } else { (c1, c2) }
    }

    /// Bounded polynomial mutation (Deb).
    fn mutate(&mut self, y: f64, lb: f64, ub: f64) -> f64 {
        let eta = self.cfg.eta_m;
        let (d1, d2) = ((y - lb) / (ub - lb), (ub - y) / (ub - lb));
        let r = self.rng.uniform();
        let p = 1.0 / (eta + 1.0);
        let dq = if r < 0.5 {
            (2.0 * r + (1.0 - 2.0 * r) * (1.0 - d1).powf(eta + 1.0)).powf(p) - 1.0
        } else {
            1.0 - (2.0 * (1.0 - r) + 2.0 * (r - 0.5) * (1.0 - d2).powf(eta + 1.0)).powf(p)
        };
        (y + dq * (ub - lb)).clamp(lb, ub)
    }

    /// Environmental selection of `pool` down to N, setting ranks and crowding distances
    /// (NSGA-III: reference-direction niching of the last front).
    fn select(&mut self, mut pool: Vec<Member>) {
        self.shuffled.clear(); // a new population, a new shuffle
        pool.sort_by_key(|m| m.id);
        let m = self.cfg.objectives;
        let objs: Vec<Vec<f64>> = pool.iter().map(|x| x.objectives.clone().unwrap_or_else(|| vec![f64::INFINITY; m])).collect();
        let ranks = nondominated_ranks(&objs);
        if self.cfg.nsga3 {
            return self.select_nsga3(pool, &objs, &ranks);
        }
        let max_rank = ranks.iter().copied().max().unwrap_or(0);
        let mut next = Vec::with_capacity(self.cfg.population);
        for r in 0..=max_rank {
            let idx: Vec<usize> = (0..pool.len()).filter(|&i| ranks[i] == r).collect();
            let refs: Vec<&[f64]> = idx.iter().map(|&i| objs[i].as_slice()).collect();
            let cd = crowding_distance(&refs);
            let mut members: Vec<(usize, f64)> = idx.into_iter().zip(cd).collect();
            if next.len() + members.len() > self.cfg.population {
                members.sort_by(|a, b| b.1.total_cmp(&a.1).then(pool[a.0].id.cmp(&pool[b.0].id)));
                members.truncate(self.cfg.population - next.len());
            }
            for (i, c) in members {
                let mut x = pool[i].clone();
                x.rank = r;
                // +∞ (boundary points) is stored as f64::MAX: same order, and JSON-safe
                x.crowding = c.min(f64::MAX);
                next.push(x);
            }
            if next.len() >= self.cfg.population {
                break;
            }
        }
        self.parents = next;
    }

    /// NSGA-III survival (module doc): whole fronts, then the last front by niching.
    fn select_nsga3(&mut self, pool: Vec<Member>, objs: &[Vec<f64>], ranks: &[usize]) {
        let n = self.cfg.population;
        let mut order: Vec<usize> = (0..pool.len()).collect();
        order.sort_by_key(|&i| (ranks[i], pool[i].id));
        // whole fronts while they fit; `last` = the rank that does not
        let mut kept: Vec<usize> = Vec::with_capacity(n);
        let mut last: Vec<usize> = Vec::new();
        for r in 0.. {
            let front: Vec<usize> = order.iter().copied().filter(|&i| ranks[i] == r).collect();
            if front.is_empty() {
                break;
            }
            if kept.len() + front.len() <= n {
                kept.extend(front);
                if kept.len() == n {
                    break;
                }
            } else {
                last = front;
                break;
            }
        }
        let scored: Vec<usize> = (0..pool.len()).filter(|&i| pool[i].objectives.is_some()).collect();
        if !scored.is_empty() {
            self.update_normalization(objs, &scored, ranks);
        }
        // failures share one last front; nothing tells them apart but their ids
        if !last.is_empty() && last.iter().all(|&i| pool[i].objectives.is_none()) {
            kept.extend(last.iter().take(n - kept.len()));
        } else if !last.is_empty() {
            let norm = self.norm.clone().unwrap_or_default();
            let nadir = self.nadir(objs, &scored, ranks, &norm);
            let (niche, dist): (Vec<usize>, Vec<f64>) = (0..pool.len())
                .map(|i| if pool[i].objectives.is_some() { self.associate(&objs[i], &norm.ideal, &nadir) } else { (0, f64::INFINITY) })
                .unzip();
            let mut count = vec![0usize; self.directions.len()];
            for &i in &kept {
                if pool[i].objectives.is_some() {
                    count[niche[i]] += 1;
                }
            }
            let mut open: Vec<usize> = last.clone();
            while kept.len() < n && !open.is_empty() {
                // the least crowded directions that a member of the last front is nearest to
                let min = open.iter().map(|&i| count[niche[i]]).min().unwrap_or(0);
                let mut niches: Vec<usize> = open.iter().map(|&i| niche[i]).filter(|&j| count[j] == min).collect();
                niches.sort_unstable();
                niches.dedup();
                let j = niches[self.rng.below(niches.len())];
                let members: Vec<usize> = open.iter().copied().filter(|&i| niche[i] == j).collect();
                let pick = if count[j] == 0 {
                    members.iter().copied().min_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(pool[a].id.cmp(&pool[b].id))).unwrap_or(members[0])
                } else {
                    members[self.rng.below(members.len())]
                };
                open.retain(|&i| i != pick);
                count[j] += 1;
                kept.push(pick);
            }
        }
        kept.sort_by_key(|&i| pool[i].id);
        self.parents = kept
            .into_iter()
            .map(|i| {
                let mut x = pool[i].clone();
                x.rank = ranks[i];
                x.crowding = 0.0;
                x
            })
            .collect();
    }

    /// Ideal and worst points (running, over scored members) and the extreme points of the
    /// first front (with the previous extremes, so that none is lost).
    fn update_normalization(&mut self, objs: &[Vec<f64>], scored: &[usize], ranks: &[usize]) {
        let m = self.cfg.objectives;
        let mut norm = self.norm.take().unwrap_or_default();
        if norm.ideal.len() != m {
            norm.ideal = vec![f64::INFINITY; m];
            norm.worst = vec![f64::NEG_INFINITY; m];
        }
        for &i in scored {
            for k in 0..m {
                norm.ideal[k] = norm.ideal[k].min(objs[i][k]);
                norm.worst[k] = norm.worst[k].max(objs[i][k]);
            }
        }
        let first_rank = scored.iter().map(|&i| ranks[i]).min().unwrap_or(0);
        let mut candidates: Vec<Vec<f64>> = std::mem::take(&mut norm.extremes);
        candidates.extend(scored.iter().filter(|&&i| ranks[i] == first_rank).map(|&i| objs[i].clone()));
        // per axis k, the point minimizing max_j (f_j − z*_j)·w_j with w_k = 1, others 1e6
        // (translated values below 1e-3 count as 0, as pymoo does)
        norm.extremes = (0..m)
            .filter_map(|k| {
                candidates
                    .iter()
                    .map(|f| {
                        let asf = (0..m)
                            .map(|j| {
                                let d = f[j] - norm.ideal[j];
                                let d = if d < 1e-3 { 0.0 } else { d };
                                d * if j == k { 1.0 } else { 1e6 }
                            })
                            .fold(f64::NEG_INFINITY, f64::max);
                        (asf, f)
                    })
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, f)| f.clone())
            })
            .collect();
        self.norm = Some(norm);
    }

    /// The nadir estimate: ideal + the intercepts of the extreme points' hyperplane (capped at
    /// the worst point seen); the worst of the first front when the hyperplane is degenerate;
    /// the worst of the population along axes still narrower than 1e-6.
    fn nadir(&self, objs: &[Vec<f64>], scored: &[usize], ranks: &[usize], norm: &Normalization) -> Vec<f64> {
        let m = self.cfg.objectives;
        let first_rank = scored.iter().map(|&i| ranks[i]).min().unwrap_or(0);
        let worst_of = |rank: Option<usize>| -> Vec<f64> {
            (0..m)
                .map(|k| scored.iter().filter(|&&i| rank.is_none_or(|r| ranks[i] == r)).map(|&i| objs[i][k]).fold(f64::NEG_INFINITY, f64::max))
                .collect()
        };
        let plane = (norm.extremes.len() == m)
            .then(|| {
                let a = nalgebra::DMatrix::from_fn(m, m, |r, c| norm.extremes[r][c] - norm.ideal[c]);
                let b = nalgebra::DVector::from_element(m, 1.0);
                a.clone().lu().solve(&b).filter(|x| (&a * x - &b).amax() < 1e-8)
            })
            .flatten();
        let mut nadir = match plane {
            Some(x) if x.iter().all(|v| 1.0 / v > 1e-6) => (0..m).map(|k| (norm.ideal[k] + 1.0 / x[k]).min(norm.worst[k])).collect::<Vec<f64>>(),
            _ => worst_of(Some(first_rank)),
        };
        let population = worst_of(None);
        for k in 0..m {
            if nadir[k] - norm.ideal[k] <= 1e-6 {
                nadir[k] = population[k];
            }
        }
        nadir
    }

    /// The direction nearest to `f` (normalized by `ideal`, `nadir`) and the perpendicular
    /// distance to it.
    fn associate(&self, f: &[f64], ideal: &[f64], nadir: &[f64]) -> (usize, f64) {
        let x: Vec<f64> = f
            .iter()
            .zip(ideal.iter().zip(nadir))
            .map(|(v, (lo, hi))| {
                let d = hi - lo;
                (v - lo) / if d == 0.0 { 1e-12 } else { d }
            })
            .collect();
        let mut best = (0, f64::INFINITY);
        for (j, w) in self.directions.iter().enumerate() {
            let ww: f64 = w.iter().map(|v| v * v).sum();
            let t = x.iter().zip(w).map(|(a, b)| a * b).sum::<f64>() / ww;
            let d2: f64 = x.iter().zip(w).map(|(a, b)| (a - t * b).powi(2)).sum();
            if d2 < best.1 {
                best = (j, d2);
            }
        }
        (best.0, best.1.sqrt())
    }
}

impl Optimizer for Nsga2 {
    fn name(&self) -> &'static str {
        if self.cfg.nsga3 { "nsga3" } else { "nsga2" }
    }

    fn space(&self) -> &SearchSpace {
        &self.space
    }

    fn ask(&mut self) -> Vec<Candidate> {
        if self.pending.is_empty() && self.told.is_empty() {
            let genomes: Vec<Vec<f64>> =
                if self.parents.is_empty() { (0..self.cfg.population).map(|k| self.first_population_genome(k)).collect() } else { self.offspring() };
            for g in genomes {
                self.pending.insert(self.next_id, g);
                self.next_id += 1;
            }
        }
        self.in_flight()
    }

    /// Steady-state NSGA-II (asynchronous mode): the first population's genomes, then one
    /// child at a time of the current population (two tournaments, SBX and mutation as in a
    /// generation; the first child is kept, unless it copies a parent or a pending candidate).
    fn ask_one(&mut self) -> Option<Candidate> {
        self.steady = true;
        let genome = if self.parents.is_empty() { self.first_population_genome(self.next_id as usize) } else { self.steady_child() };
        let id = self.next_id;
        self.pending.insert(id, genome.clone());
        self.asked_in.insert(id, self.generation);
        self.next_id += 1;
        Some(Candidate { id, generation: self.generation, genome })
    }

    fn in_flight(&self) -> Vec<Candidate> {
        let generation = |id: u64| self.asked_in.get(&id).copied().unwrap_or(self.generation);
        self.pending.iter().map(|(&id, g)| Candidate { id, generation: generation(id), genome: g.clone() }).collect()
    }

    /// In asynchronous mode each told candidate is selected against the population at once
    /// (N + 1 → N, the (μ+1) form of the same ranking and crowding); before the first
    /// population is complete, told candidates wait for it.
    fn tell(&mut self, evaluations: Vec<Evaluation>) -> Result<(), SearchError> {
        for (id, genome, objectives) in take_told(&mut self.pending, &evaluations, self.cfg.objectives)? {
            self.evaluations += 1;
            self.asked_in.remove(&id);
            if let Some(o) = &objectives {
                self.best.offer(o[0], || genome.clone());
            }
            self.told.insert(id, Member { id, genome, objectives, rank: 0, crowding: 0.0 });
            if self.steady && (!self.parents.is_empty() || self.told.len() >= self.cfg.population) {
                let mut pool: Vec<Member> = std::mem::take(&mut self.parents);
                pool.extend(std::mem::take(&mut self.told).into_values());
                self.select(pool);
                self.generation = self.evaluations / self.cfg.population as u64;
            }
        }
        if self.pending.is_empty() && !self.steady {
            let mut pool: Vec<Member> = std::mem::take(&mut self.parents);
            pool.extend(std::mem::take(&mut self.told).into_values());
            self.select(pool);
            self.generation += 1;
        }
        Ok(())
    }

    fn stop(&self) -> Option<StopReason> {
        None
    }

    /// Best value of the first objective (for logs); use [`Nsga2::front`] for the front.
    fn best(&self) -> Option<(&[f64], f64)> {
        self.best.get()
    }

    fn evaluations(&self) -> u64 {
        self.evaluations
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn state(&self) -> OptimizerState {
        OptimizerState::Nsga2(Box::new(self.clone()))
    }
}

#[cfg(test)]
mod seeded_tests {
    use super::*;
    use crate::Optimizer;

    #[test]
    fn initial_genomes_open_the_first_population() {
        let space =
            SearchSpace::new(vec!["a".into(), "b".into()], vec![0.0, -1.0], vec![1.0, 1.0], vec![GeneKind::Real, GeneKind::Binary]).expect("space");
        let cfg = Nsga2Config { population: 4, initial: vec![vec![0.25, 0.5], vec![7.0, -3.0]], ..Default::default() };
        let mut o = Nsga2::new(space.clone(), &cfg).expect("nsga2");
        let first: Vec<Vec<f64>> = o.ask().into_iter().map(|c| c.genome).collect();
        assert_eq!(first[0], vec![0.25, 0.5]);
        assert_eq!(first[1], vec![1.0, -1.0], "clipped to the bounds");
        assert_eq!(first.len(), 4);
        let bad = Nsga2Config { initial: vec![vec![0.0]], ..cfg };
        assert!(Nsga2::new(space, &bad).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pareto::hypervolume;
    use crate::testfns::{dtlz2, zdt1, zdt2, zdt3};

    fn optimize(f: fn(&[f64]) -> Vec<f64>, n: usize, m: usize, pop: usize, gens: usize, seed: u64) -> Nsga2 {
        let space = SearchSpace::uniform(n, 0.0, 1.0).expect("space");
        let mut opt = Nsga2::new(space, &Nsga2Config { population: pop, objectives: m, seed, ..Default::default() }).expect("nsga2");
        for _ in 0..gens {
            let c = opt.ask();
            opt.tell(c.iter().map(|c| Evaluation::scored(c.id, f(&c.genome))).collect()).expect("tell");
        }
        opt
    }

    /// Hypervolume of the true ZDT front (g = 1), from a dense sample of f₁ ∈ [0, 1].
    fn zdt_optimum(f: fn(&[f64]) -> Vec<f64>, r: &[f64]) -> f64 {
        let pts: Vec<Vec<f64>> = (0..=20_000)
            .map(|i| {
                let mut x = vec![0.0; 2];
                x[0] = i as f64 / 20_000.0;
                f(&x)
            })
            .collect();
        hypervolume(&pts, r)
    }

    fn front_hv(opt: &Nsga2, r: &[f64]) -> f64 {
        let pts: Vec<Vec<f64>> = opt.front().into_iter().map(|(_, o)| o.to_vec()).collect();
        hypervolume(&pts, r)
    }

    // Reference: NSGA-II (pymoo, N = 100, 200 generations) reaches ≥ 97–99 % of the optimal
    // hypervolume on ZDT1-3 with 30 genes; the tests require 95 % with the same budget.
    #[test]
    fn zdt_fronts_reach_95_percent_of_the_optimal_hypervolume() {
        let r = [1.1, 1.1];
        for (name, f) in [("zdt1", zdt1 as fn(&[f64]) -> Vec<f64>), ("zdt2", zdt2), ("zdt3", zdt3)] {
            let opt = optimize(f, 30, 2, 100, 200, 1);
            let (got, best) = (front_hv(&opt, &r), zdt_optimum(f, &r));
            assert!(got >= 0.95 * best, "{name}: hypervolume {got:.4} of optimal {best:.4}");
        }
    }

    /// Steady-state NSGA-II as an asynchronous run drives it: `workers` candidates in flight,
    /// results told in a scrambled order (the one that finished first), one new ask per tell.
    fn optimize_async(f: fn(&[f64]) -> Vec<f64>, n: usize, pop: usize, evaluations: usize, workers: usize, seed: u64) -> Nsga2 {
        let space = SearchSpace::uniform(n, 0.0, 1.0).expect("space");
        let mut opt = Nsga2::new(space, &Nsga2Config { population: pop, objectives: 2, seed, ..Default::default() }).expect("nsga2");
        let mut rng = Rng::seeded(seed + 99);
        let mut flight: Vec<Candidate> = (0..workers).map(|_| opt.ask_one().expect("ask_one")).collect();
        let mut asked = workers;
        while !flight.is_empty() {
            let c = flight.swap_remove(rng.below(flight.len()));
            opt.tell(vec![Evaluation::scored(c.id, f(&c.genome))]).expect("tell");
            if asked < evaluations {
                flight.push(opt.ask_one().expect("ask_one"));
                asked += 1;
            }
        }
        opt
    }

    // Steady-state (μ+1) NSGA-II with 8 candidates in flight, told out of order, against the
    // generational one on the same budget (population 40, 8,000 evaluations, 30 genes).
    // Measured before duplicate elimination and shuffled tournaments, steady vs generational,
    // of the optimal hypervolume: ZDT1 97.4 vs 97.1 %, ZDT2 95.2 vs 94.5 %, ZDT3 98.6 vs 98.2 %.
    #[test]
    fn steady_state_zdt_fronts_are_as_good_as_generational_ones() {
        let r = [1.1, 1.1];
        for (name, f) in [("zdt1", zdt1 as fn(&[f64]) -> Vec<f64>), ("zdt2", zdt2), ("zdt3", zdt3)] {
            let opt = optimize_async(f, 30, 40, 8_000, 8, 1);
            assert_eq!(opt.evaluations(), 8_000);
            assert!(opt.in_flight().is_empty());
            let (got, best) = (front_hv(&opt, &r), zdt_optimum(f, &r));
            let generational = front_hv(&optimize(f, 30, 2, 40, 200, 1), &r);
            assert!(
                got >= 0.94 * best && got >= generational - 0.01 * best,
                "{name}: hypervolume {got:.4}, generational {generational:.4}, optimal {best:.4}"
            );
        }
    }

    #[test]
    fn steady_state_save_restore_continues_bit_for_bit() {
        let space = SearchSpace::uniform(5, 0.0, 1.0).expect("space");
        let mut a = Nsga2::new(space, &Nsga2Config { population: 8, objectives: 2, seed: 3, ..Default::default() }).expect("nsga2");
        let mut flight: Vec<Candidate> = (0..3).map(|_| a.ask_one().expect("ask")).collect();
        for _ in 0..30 {
            let c = flight.remove(1);
            a.tell(vec![Evaluation::scored(c.id, zdt1(&c.genome))]).expect("tell");
            flight.push(a.ask_one().expect("ask"));
        }
        let mut b = a.state().restore("nsga2").expect("restore");
        assert_eq!(b.in_flight(), a.in_flight());
        for _ in 0..10 {
            let c = flight.remove(0);
            let e = Evaluation::scored(c.id, zdt1(&c.genome));
            a.tell(vec![e.clone()]).expect("tell");
            b.tell(vec![e]).expect("tell");
            let (x, y) = (a.ask_one().expect("ask"), b.ask_one().expect("ask"));
            assert_eq!(x, y);
            flight.push(x);
        }
        assert_eq!(a.state(), b.state());
    }

    // NSGA-II's crowding distance spreads 3-objective fronts poorly (the reason NSGA-III
    // exists); measured here: 87 % of the optimal hypervolume after 200 generations of 100.
    #[test]
    fn dtlz2_three_objectives() {
        let r = [1.1, 1.1, 1.1];
        let opt = optimize(dtlz2, 12, 3, 100, 200, 2);
        let optimal = 1.1f64.powi(3) - std::f64::consts::PI / 6.0;
        let got = front_hv(&opt, &r);
        assert!(got >= 0.85 * optimal, "hypervolume {got:.4} of optimal {optimal:.4}");
    }

    #[test]
    fn save_restore_continues_bit_for_bit() {
        let mut a = optimize(zdt1, 10, 2, 20, 5, 3);
        let mut b = OptimizerState::from_json(&a.state().to_json()).expect("json").restore("nsga2").expect("nsga2");
        // a checkpoint taken halfway through telling a generation (with a failure) too
        let half = a.ask();
        let (first, _) = half.split_at(half.len() / 2);
        let tell = |c: &Candidate| if c.id.is_multiple_of(7) { Evaluation::failed(c.id, "x") } else { Evaluation::scored(c.id, zdt1(&c.genome)) };
        assert_eq!(b.ask(), half);
        a.tell(first.iter().map(tell).collect()).expect("tell");
        b.tell(first.iter().map(tell).collect()).expect("tell");
        let mut b = OptimizerState::from_json(&b.state().to_json()).expect("json").restore("nsga2").expect("nsga2");
        let rest_a = a.ask();
        a.tell(rest_a.iter().map(tell).collect()).expect("tell");
        let rest_b = b.ask();
        assert_eq!(rest_a, rest_b);
        b.tell(rest_b.iter().map(tell).collect()).expect("tell");
        for _ in 0..5 {
            let (ca, cb) = (a.ask(), b.ask());
            assert_eq!(ca, cb);
            a.tell(ca.iter().map(|c| Evaluation::scored(c.id, zdt1(&c.genome))).collect()).expect("tell");
            b.tell(cb.iter().map(|c| Evaluation::scored(c.id, zdt1(&c.genome))).collect()).expect("tell");
        }
    }

    #[test]
    fn binary_genes_stay_binary_and_failures_rank_last() {
        let space =
            SearchSpace::new(vec!["on".into(), "x".into()], vec![-1.0, 0.0], vec![1.0, 1.0], vec![GeneKind::Binary, GeneKind::Real]).expect("space");
        let mut opt = Nsga2::new(space.clone(), &Nsga2Config { population: 8, objectives: 2, seed: 4, ..Default::default() }).expect("nsga2");
        for _ in 0..10 {
            let c = opt.ask();
            assert!(c.iter().all(|c| (c.genome[0] == 1.0 || c.genome[0] == -1.0) && space.contains(&c.genome)));
            // genomes with the bit off fail
            opt.tell(
                c.iter()
                    .map(|c| {
                        if space.is_on(&c.genome, 0) {
                            Evaluation::scored(c.id, vec![c.genome[1], 1.0 - c.genome[1]])
                        } else {
                            Evaluation::failed(c.id, "off")
                        }
                    })
                    .collect(),
            )
            .expect("tell");
        }
        assert!(!opt.front().is_empty());
        assert!(opt.front().iter().all(|(g, _)| g[0] == 1.0));
    }

    fn nsga3(n: usize, m: usize, pop: usize, seed: u64) -> Nsga2 {
        Nsga2::new(SearchSpace::uniform(n, 0.0, 1.0).expect("space"), &Nsga2Config::nsga3(pop, m, None, seed)).expect("nsga3")
    }

    #[test]
    fn das_dennis_directions_cover_the_simplex() {
        for (m, p, count) in [(3, 12, 91), (2, 99, 100), (5, 4, 70), (3, 1, 3)] {
            let d = das_dennis(m, p);
            assert_eq!((d.len(), das_dennis_count(m, p)), (count, count), "m = {m}, p = {p}");
            assert!(d.iter().all(|w| w.len() == m && (w.iter().sum::<f64>() - 1.0).abs() < 1e-12 && w.iter().all(|x| *x >= 0.0)));
            let mut keys: Vec<Vec<i64>> = d.iter().map(|w| w.iter().map(|x| (x * p as f64).round() as i64).collect()).collect();
            keys.sort();
            keys.dedup();
            assert_eq!(keys.len(), count, "distinct");
        }
        // the default partitions: the most whose directions fit in the population
        assert_eq!(nsga3(12, 3, 92, 0).reference_directions().len(), 91);
        assert_eq!(nsga3(12, 3, 16, 0).reference_directions().len(), 15);
    }

    #[test]
    fn too_small_a_population_for_the_directions_is_a_clear_error() {
        let space = SearchSpace::uniform(4, 0.0, 1.0).expect("space");
        let e = Nsga2::new(space.clone(), &Nsga2Config::nsga3(16, 3, Some(12), 0)).expect_err("91 > 16").to_string();
        assert!(e.contains("91 reference directions (12 partitions, 3 objectives) need a population of at least 91, not 16"), "{e}");
        assert!(e.contains("at most 4 partitions (15 directions)"), "{e}");
        let e = Nsga2::new(space.clone(), &Nsga2Config::nsga3(4, 5, None, 0)).expect_err("5 > 4").to_string();
        assert!(e.contains("raise the population to at least 6"), "{e}");
        assert!(Nsga2::new(space, &Nsga2Config::nsga3(8, 1, None, 0)).is_err(), "one objective");
    }

    // Deb & Jain (2014) / pymoo: NSGA-III puts one member on each reference direction of
    // DTLZ2's front. 91 directions cover at most 0.7449 of hypervolume (the directions
    // themselves, projected on the sphere); NSGA-II on the same budget reaches 0.69.
    #[test]
    fn nsga3_spreads_dtlz2_over_its_reference_directions() {
        let r = [1.1, 1.1, 1.1];
        let mut opt = nsga3(12, 3, 92, 1);
        for _ in 0..150 {
            let c = opt.ask();
            opt.tell(c.iter().map(|c| Evaluation::scored(c.id, dtlz2(&c.genome))).collect()).expect("tell");
        }
        let ideal: Vec<Vec<f64>> = das_dennis(3, 12)
            .into_iter()
            .map(|w| {
                let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
                w.iter().map(|x| x / norm).collect()
            })
            .collect();
        let (got, best) = (front_hv(&opt, &r), hypervolume(&ideal, &r));
        let nsga2 = front_hv(&optimize(dtlz2, 12, 3, 92, 150, 1), &r);
        assert!(got >= 0.99 * best && got > nsga2 + 0.02, "NSGA-III {got:.4}, NSGA-II {nsga2:.4}, the directions {best:.4}");
        assert_eq!(opt.name(), "nsga3");
    }

    #[test]
    fn nsga3_save_restore_continues_bit_for_bit_generational_and_steady() {
        let mut a = nsga3(5, 3, 16, 3);
        let tell = |c: &Candidate| if c.id % 9 == 4 { Evaluation::failed(c.id, "x") } else { Evaluation::scored(c.id, dtlz2(&c.genome)) };
        for _ in 0..4 {
            let c = a.ask();
            a.tell(c.iter().map(tell).collect()).expect("tell");
        }
        let mut b = OptimizerState::from_json(&a.state().to_json()).expect("json").restore("nsga3").expect("nsga3");
        for _ in 0..4 {
            let (ca, cb) = (a.ask(), b.ask());
            assert_eq!(ca, cb);
            a.tell(ca.iter().map(tell).collect()).expect("tell");
            b.tell(cb.iter().map(tell).collect()).expect("tell");
        }
        let mut s = nsga3(5, 3, 16, 4);
        let mut flight: Vec<Candidate> = (0..3).map(|_| s.ask_one().expect("ask")).collect();
        for _ in 0..40 {
            let c = flight.remove(1);
            s.tell(vec![tell(&c)]).expect("tell");
            flight.push(s.ask_one().expect("ask"));
        }
        let mut t = OptimizerState::from_json(&s.state().to_json()).expect("json").restore("nsga3").expect("nsga3");
        for _ in 0..20 {
            let c = flight.remove(0);
            s.tell(vec![tell(&c)]).expect("tell");
            t.tell(vec![tell(&c)]).expect("tell");
            let (x, y) = (s.ask_one().expect("ask"), t.ask_one().expect("ask"));
            assert_eq!(x, y);
            flight.push(x);
        }
        assert!(OptimizerState::from_json(&s.state().to_json()).expect("json").restore("nsga2").is_err(), "an NSGA-III checkpoint is not NSGA-II's");
    }

    #[test]
    fn nsga3_ranks_failures_last() {
        let mut opt = nsga3(4, 3, 16, 5);
        for _ in 0..10 {
            let c = opt.ask();
            opt.tell(
                c.iter()
                    .map(|c| if c.genome[0] < 0.3 { Evaluation::failed(c.id, "x") } else { Evaluation::scored(c.id, dtlz2(&c.genome)) })
                    .collect(),
            )
            .expect("tell");
        }
        assert!(opt.parents.iter().all(|m| m.objectives.is_some()), "scored candidates outnumber the population, so no failure survives");
        assert!(!opt.front().is_empty());
    }
}
