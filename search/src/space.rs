//! Search spaces: named genes with bounds, real, binary or integer.

use serde::{Deserialize, Serialize};

use crate::error::SearchError;

/// What a gene encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GeneKind {
    /// A real number in `[lower, upper]`.
    Real,
    /// On/off (a layer on a data-flow path or not). Stored as a real in `[lower, upper]`;
    /// **on iff the value > 0** (Sakana's DFS indicator), see [`SearchSpace::is_on`]. Continuous
    /// optimizers (CMA-ES) move it freely and it is thresholded at evaluation time; NSGA-II uses
    /// bit-flip operators on it.
    Binary,
    /// An integer in `[lower, upper]` (the bounds must contain one). Random search and NSGA-II
    /// round; CMA-ES with margin encodes its continuous coordinate to the nearest integer and
    /// keeps the probability of moving to a neighbour from vanishing.
    Integer,
}

/// Bounds and kinds of every gene of a genome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchSpace {
    pub names: Vec<String>,
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
    pub kinds: Vec<GeneKind>,
}

impl SearchSpace {
    /// Checks lengths, finiteness and `lower < upper` for every gene.
    pub fn new(names: Vec<String>, lower: Vec<f64>, upper: Vec<f64>, kinds: Vec<GeneKind>) -> Result<Self, SearchError> {
        let s = Self { names, lower, upper, kinds };
        s.validate()?;
        Ok(s)
    }

    /// A space of `n` real genes `x0 … x{n-1}` in `[lo, hi]`.
    pub fn uniform(n: usize, lo: f64, hi: f64) -> Result<Self, SearchError> {
        Self::new((0..n).map(|i| format!("x{i}")).collect(), vec![lo; n], vec![hi; n], vec![GeneKind::Real; n])
    }

    pub fn validate(&self) -> Result<(), SearchError> {
        let n = self.names.len();
        if n == 0 {
            return Err(SearchError::BadSpace("no genes".into()));
        }
        if self.lower.len() != n || self.upper.len() != n || self.kinds.len() != n {
            return Err(SearchError::BadSpace(format!(
                "{n} names but {} lower, {} upper, {} kinds",
                self.lower.len(),
                self.upper.len(),
                self.kinds.len()
            )));
        }
        for i in 0..n {
            let (lo, hi) = (self.lower[i], self.upper[i]);
            if !lo.is_finite() || !hi.is_finite() || lo >= hi {
                return Err(SearchError::BadSpace(format!("gene '{}': bounds [{lo}, {hi}] are not finite with lower < upper", self.names[i])));
            }
            if self.kinds[i] == GeneKind::Binary && !(lo <= 0.0 && hi > 0.0) {
                return Err(SearchError::BadSpace(format!(
                    "binary gene '{}': bounds [{lo}, {hi}] must contain off (≤ 0) and on (> 0)",
                    self.names[i]
                )));
            }
            if self.kinds[i] == GeneKind::Integer && lo.ceil() > hi.floor() {
                return Err(SearchError::BadSpace(format!("integer gene '{}': bounds [{lo}, {hi}] contain no integer", self.names[i])));
            }
        }
        Ok(())
    }

    pub fn dim(&self) -> usize {
        self.names.len()
    }

    /// Whether binary gene `i` is on in `genome`.
    pub fn is_on(&self, genome: &[f64], i: usize) -> bool {
        genome[i] > 0.0
    }

    /// The values a discrete gene takes, ascending (binary: off = `lower`, on = `upper`;
    /// integer: every integer in the bounds); `None` for a real gene.
    pub fn levels(&self, i: usize) -> Option<Vec<f64>> {
        let (lo, hi) = (self.lower[i], self.upper[i]);
        match self.kinds[i] {
            GeneKind::Real => None,
            GeneKind::Binary => Some(vec![lo, hi]),
            GeneKind::Integer => Some((lo.ceil() as i64..=hi.floor() as i64).map(|k| k as f64).collect()),
        }
    }

    /// The integer of integer gene `i` nearest to `v`, inside the bounds.
    pub fn round(&self, i: usize, v: f64) -> f64 {
        v.round().clamp(self.lower[i].ceil(), self.upper[i].floor())
    }

    /// Whether any gene is binary or integer.
    pub fn has_discrete(&self) -> bool {
        self.kinds.iter().any(|k| *k != GeneKind::Real)
    }

    /// Whether `genome` lies inside the bounds.
    pub fn contains(&self, genome: &[f64]) -> bool {
        genome.len() == self.dim() && genome.iter().zip(self.lower.iter().zip(&self.upper)).all(|(x, (lo, hi))| x >= lo && x <= hi)
    }
}

/// Whether an objective is to be minimized or maximized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Minimize,
    Maximize,
}

impl Direction {
    /// The value an optimizer minimizes — the only place a direction is applied.
    pub fn to_minimized(self, value: f64) -> f64 {
        match self {
            Direction::Minimize => value,
            Direction::Maximize => -value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bounds_are_typed_errors() {
        assert!(SearchSpace::uniform(3, 1.0, 1.0).is_err());
        assert!(SearchSpace::uniform(3, 0.0, f64::NAN).is_err());
        assert!(SearchSpace::uniform(0, 0.0, 1.0).is_err());
        let e = SearchSpace::new(vec!["a".into()], vec![2.0], vec![1.0], vec![GeneKind::Real]).expect_err("lo > hi");
        assert!(e.to_string().contains("'a'"), "{e}");
        assert!(SearchSpace::new(vec!["a".into()], vec![0.0, 1.0], vec![1.0], vec![GeneKind::Real]).is_err());
        let e = SearchSpace::new(vec!["on".into()], vec![0.5], vec![1.0], vec![GeneKind::Binary]).expect_err("always on");
        assert!(e.to_string().contains("binary gene 'on'"), "{e}");
        let e = SearchSpace::new(vec!["k".into()], vec![0.2], vec![0.8], vec![GeneKind::Integer]).expect_err("no integer");
        assert!(e.to_string().contains("integer gene 'k': bounds [0.2, 0.8] contain no integer"), "{e}");
        let s = SearchSpace::new(vec!["k".into()], vec![-1.5], vec![2.0], vec![GeneKind::Integer]).expect("one to four integers");
        assert_eq!(s.levels(0), Some(vec![-1.0, 0.0, 1.0, 2.0]));
        assert_eq!((s.round(0, -7.0), s.round(0, 0.6)), (-1.0, 1.0));
    }

    #[test]
    fn directions_convert_once() {
        assert_eq!(Direction::Maximize.to_minimized(0.7), -0.7);
        assert_eq!(Direction::Minimize.to_minimized(0.7), 0.7);
    }
}
