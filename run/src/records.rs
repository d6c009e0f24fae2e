//! Typed records of a run directory, with the field names the files have always had (so run
//! directories written by earlier releases keep loading): one [`EvaluationRecord`] per line of
//! `evaluations.jsonl`, the [`Reference`]s of `references.json`, the [`CalibrationHeader`] and
//! [`CalibrationRow`]s of `calibration.jsonl`, and the [`LogEvent`]s of `log.jsonl`.
//!
//! JSON has no NaN: serde_json writes a non-finite `f64` as `null`, and these records read a
//! `null` number back as NaN (a perplexity objective has no standard error, for instance).

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// An `f64` that reads `null` as NaN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
struct Lenient(#[serde(deserialize_with = "nan_if_null")] f64);

fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn lenient_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Lenient>::deserialize(d)?.into_iter().map(|x| x.0).collect())
}

/// Objective values by name, in the estimators' order (a JSON object in the files).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Objectives(pub Vec<(String, f64)>);

impl Objectives {
    /// The value of objective `name` (`None` when absent or not a number).
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v).filter(|v| !v.is_nan())
    }

    /// Objective names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Objectives {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Objectives {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Objectives;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of objective values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Objectives, A::Error> {
                let mut out = vec![];
                while let Some((k, v)) = map.next_entry::<String, Lenient>()? {
                    out.push((k, v.0));
                }
                Ok(Objectives(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// What a scored candidate's record holds besides its identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// Objective values in the objectives' own direction.
    pub objectives: Objectives,
    /// Standard errors of the estimates (NaN where an estimator gives none).
    pub std_errors: Vec<f64>,
    /// The values the optimizer minimized (`Direction::to_minimized`).
    pub minimized: Vec<f64>,
    /// Items and tokens scored for this candidate (0 for a repeat of an earlier genome):
    /// tokens really run through the model, and what they would have been with no prefix
    /// shared (0 in records written before prefix sharing, which do not have the key).
    pub items: usize,
    pub tokens: usize,
    pub tokens_unshared: usize,
    /// Seconds spent merging (or routing) the candidate.
    pub materialize_seconds: f64,
    /// A data-flow candidate's path in words.
    pub path: Option<String>,
}

/// How a candidate's evaluation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordOutcome {
    Scored(Scores),
    /// Candidate-scoped failure (NaN logits, an unmergeable point, ...): the message.
    Failed(String),
}

/// One line of `evaluations.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationRecord {
    pub id: u64,
    pub generation: u64,
    pub genome: Vec<f64>,
    pub outcome: RecordOutcome,
    /// Wall seconds of the evaluation.
    pub seconds: f64,
}

impl EvaluationRecord {
    /// The scores, `None` for a failure.
    pub fn scores(&self) -> Option<&Scores> {
        match &self.outcome {
            RecordOutcome::Scored(s) => Some(s),
            RecordOutcome::Failed(_) => None,
        }
    }

    /// The failure message, `None` when scored.
    pub fn failure(&self) -> Option<&str> {
        match &self.outcome {
            RecordOutcome::Failed(f) => Some(f),
            RecordOutcome::Scored(_) => None,
        }
    }

    /// Minimized objective values that are numbers (`None` for a failure).
    pub fn minimized(&self) -> Option<Vec<f64>> {
        self.scores().map(|s| s.minimized.iter().copied().filter(|x| !x.is_nan()).collect())
    }

    /// Mean of the minimized objectives (`None` for a failure).
    pub fn mean_minimized(&self) -> Option<f64> {
        let m = self.minimized()?;
        (!m.is_empty()).then(|| m.iter().sum::<f64>() / m.len() as f64)
    }

    /// Objective `name`'s value (`None` for a failure or when absent).
    pub fn objective(&self, name: &str) -> Option<f64> {
        self.scores()?.objectives.get(name)
    }
}

impl Serialize for EvaluationRecord {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Key order as the files have it: scored and failed records differ in their keys.
        match &self.outcome {
            RecordOutcome::Scored(sc) => {
                let mut m = s.serialize_map(Some(12 + usize::from(sc.tokens_unshared > 0)))?;
                m.serialize_entry("id", &self.id)?;
                m.serialize_entry("generation", &self.generation)?;
                m.serialize_entry("genome", &self.genome)?;
                m.serialize_entry("objectives", &sc.objectives)?;
                m.serialize_entry("std_errors", &sc.std_errors)?;
                m.serialize_entry("minimized", &sc.minimized)?;
                m.serialize_entry("items", &sc.items)?;
                m.serialize_entry("tokens", &sc.tokens)?;
                if sc.tokens_unshared > 0 {
                    m.serialize_entry("tokens_unshared", &sc.tokens_unshared)?;
                }
                m.serialize_entry("seconds", &self.seconds)?;
                m.serialize_entry("materialize_seconds", &sc.materialize_seconds)?;
                m.serialize_entry("path", &sc.path)?;
                m.serialize_entry("failure", &None::<String>)?;
                m.end()
            }
            RecordOutcome::Failed(f) => {
                let mut m = s.serialize_map(Some(5))?;
                m.serialize_entry("id", &self.id)?;
                m.serialize_entry("generation", &self.generation)?;
                m.serialize_entry("genome", &self.genome)?;
                m.serialize_entry("failure", f)?;
                m.serialize_entry("seconds", &self.seconds)?;
                m.end()
            }
        }
    }
}

/// Every field a record line may have (the files' names).
#[derive(Deserialize)]
struct RawRecord {
    id: u64,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    genome: Vec<f64>,
    #[serde(default)]
    objectives: Option<Objectives>,
    #[serde(default, deserialize_with = "lenient_vec")]
    std_errors: Vec<f64>,
    #[serde(default, deserialize_with = "lenient_opt_vec")]
    minimized: Option<Vec<f64>>,
    #[serde(default)]
    items: usize,
    #[serde(default)]
    tokens: usize,
    #[serde(default)]
    tokens_unshared: usize,
    #[serde(default, deserialize_with = "nan_if_null")]
    seconds: f64,
    #[serde(default, deserialize_with = "nan_if_null")]
    materialize_seconds: f64,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    failure: Option<String>,
}

fn lenient_opt_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
    Ok(Option::<Vec<Lenient>>::deserialize(d)?.map(|v| v.into_iter().map(|x| x.0).collect()))
}

impl<'de> Deserialize<'de> for EvaluationRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = RawRecord::deserialize(d)?;
        let outcome = match r.failure {
            Some(f) => RecordOutcome::Failed(f),
            None => RecordOutcome::Scored(Scores {
                minimized: r.minimized.ok_or_else(|| serde::de::Error::missing_field("minimized"))?,
                objectives: r.objectives.unwrap_or_default(),
                std_errors: r.std_errors,
                items: r.items,
                tokens: r.tokens,
                tokens_unshared: r.tokens_unshared,
                materialize_seconds: r.materialize_seconds,
                path: r.path,
            }),
        };
        Ok(Self { id: r.id, generation: r.generation, genome: r.genome, outcome, seconds: r.seconds })
    }
}

/// The record with the lowest mean minimized objective (ties: the earliest): the best
/// candidate with one objective, the run's pick with several.
pub fn best_by_mean(recs: &[EvaluationRecord]) -> Option<&EvaluationRecord> {
    recs.iter()
        .filter_map(|r| r.mean_minimized().map(|m| (r, m)))
        .fold(None, |acc: Option<(&EvaluationRecord, f64)>, (r, m)| match acc {
            Some((_, b)) if b <= m => acc,
            _ => Some((r, m)),
        })
        .map(|x| x.0)
}

/// Scored records ordered best first (one objective) or the Pareto front (several), sorted by
/// the first minimized objective. A point is listed once: a genome scored again (an optimizer
/// may propose it twice) and, on a front, candidates with identical values appear as their
/// earliest record.
pub fn ranked(recs: &[EvaluationRecord]) -> Vec<&EvaluationRecord> {
    let mut seen = std::collections::HashSet::new();
    let multi = recs.iter().filter_map(EvaluationRecord::minimized).find(|m| !m.is_empty()).is_some_and(|m| m.len() > 1);
    let scored: Vec<(&EvaluationRecord, Vec<f64>)> = recs
        .iter()
        .filter_map(|r| r.minimized().map(|m| (r, m)))
        .filter(|(_, m)| !m.is_empty())
        .filter(|(r, m)| {
            seen.insert(if multi { m.iter().map(|x| x.to_bits()).collect::<Vec<_>>() } else { r.genome.iter().map(|x| x.to_bits()).collect() })
        })
        .collect();
    let mut out: Vec<(&EvaluationRecord, Vec<f64>)> = if multi {
        let points: Vec<Vec<f64>> = scored.iter().map(|p| p.1.clone()).collect();
        let ranks = evomerge_search::pareto::nondominated_ranks(&points);
        scored.into_iter().zip(ranks).filter(|(_, r)| *r == 0).map(|(x, _)| x).collect()
    } else {
        scored
    };
    out.sort_by(|a, b| a.1[0].total_cmp(&b.1[0]));
    out.into_iter().map(|(r, _)| r).collect()
}

/// A reference point of `references.json`: a source model or the method at its default
/// parameters, scored on the candidates' items (also the `report --references` format, where
/// only `name` and `objectives` are needed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    pub name: String,
    /// `source`, `baseline`, or a user's own label.
    #[serde(default)]
    pub kind: String,
    /// The model reference of a source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub objectives: Objectives,
    #[serde(default, deserialize_with = "lenient_vec")]
    pub minimized: Vec<f64>,
}

impl Reference {
    /// Mean of the minimized objectives that are numbers.
    pub fn mean_minimized(&self) -> Option<f64> {
        let m: Vec<f64> = self.minimized.iter().copied().filter(|x| !x.is_nan()).collect();
        (!m.is_empty()).then(|| m.iter().sum::<f64>() / m.len() as f64)
    }
}

/// First line of `calibration.jsonl`: what the rows were computed for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationHeader {
    /// Hash of everything the rows depend on.
    pub key: String,
    /// Items per objective (0 for objectives without calibration).
    pub items: Vec<usize>,
}

/// One calibration row: a source model or calibration merge scored on every item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRow {
    pub row: usize,
    /// Per objective, every item's score (empty for objectives without calibration).
    pub scores: Vec<Vec<f64>>,
}

/// A line of `log.jsonl` (and of `--progress jsonl` on stdout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LogEvent {
    /// A stage starts (or resumes) with this many evaluations replayed.
    Start { evaluations_done: usize },
    /// A generation was told to the optimizer.
    Generation {
        generation: u64,
        evaluations: u64,
        failures: u64,
        /// The stage's pick so far: lowest mean minimized objective (with one objective, the
        /// best value, negated when maximized).
        best_minimized: Option<f64>,
        /// That pick's objectives in their own units.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        best: Option<Objectives>,
        /// This generation's mean of the candidates' mean minimized objectives.
        mean_minimized: Option<f64>,
        candidates_per_hour: f64,
        eta_seconds: Option<f64>,
        seconds: f64,
    },
    /// A stage ended (not by interruption).
    Finished { termination: String, evaluations: u64, best_minimized: Option<f64> },
    /// A checkpoint could not be read and the previous one was used.
    CheckpointFallback { reason: String },
    /// The reference points, once scored (stdout only).
    References { references: Vec<Reference> },
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as the release before the `run` crate wrote them.
    const SCORED: &str = r#"{"id":3,"generation":1,"genome":[0.5,0.25],"objectives":{"ppl":12.5,"acc":0.75},"std_errors":[null,0.1],"minimized":[12.5,-0.75],"items":8,"tokens":120,"seconds":0.02,"materialize_seconds":0.01,"path":null,"failure":null}"#;
    const FAILED: &str = r#"{"id":4,"generation":1,"genome":[0.5,0.3],"failure":"NaN logits","seconds":0.5}"#;

    #[test]
    fn records_round_trip_byte_for_byte() {
        for line in [SCORED, FAILED] {
            let r: EvaluationRecord = serde_json::from_str(line).expect("parse");
            assert_eq!(serde_json::to_string(&r).expect("write"), line);
        }
        let r: EvaluationRecord = serde_json::from_str(SCORED).expect("parse");
        assert!(r.scores().expect("scored").std_errors[0].is_nan());
        assert_eq!(r.scores().expect("scored").objectives.names().collect::<Vec<_>>(), vec!["ppl", "acc"]);
        assert_eq!(r.objective("acc"), Some(0.75));
        assert_eq!(r.mean_minimized(), Some((12.5 - 0.75) / 2.0));
        let f: EvaluationRecord = serde_json::from_str(FAILED).expect("parse");
        assert_eq!(f.failure(), Some("NaN logits"));
        assert_eq!(f.mean_minimized(), None);
    }

    #[test]
    fn a_scored_line_without_minimized_values_is_refused() {
        assert!(serde_json::from_str::<EvaluationRecord>(r#"{"id":1,"genome":[],"failure":null}"#).is_err());
    }

    #[test]
    fn best_by_mean_takes_the_earliest_of_equals_and_skips_failures() {
        let rec = |id: u64, m: Option<f64>| {
            let outcome = match m {
                Some(v) => RecordOutcome::Scored(Scores {
                    objectives: Objectives(vec![("x".into(), v)]),
                    std_errors: vec![f64::NAN],
                    minimized: vec![v],
                    items: 1,
                    tokens: 1,
                    tokens_unshared: 0,
                    materialize_seconds: 0.0,
                    path: None,
                }),
                None => RecordOutcome::Failed("no".into()),
            };
            EvaluationRecord { id, generation: 0, genome: vec![id as f64], outcome, seconds: 0.0 }
        };
        let mut recs = vec![rec(0, Some(2.0)), rec(1, None), rec(2, Some(1.0)), rec(3, Some(1.0))];
        // candidate 4 repeats candidate 2's genome: listed once
        recs.push(EvaluationRecord { id: 4, ..recs[2].clone() });
        assert_eq!(best_by_mean(&recs).map(|r| r.id), Some(2));
        assert_eq!(ranked(&recs).iter().map(|r| r.id).collect::<Vec<_>>(), vec![2, 3, 0]);
        // on a front, identical points are one member (the earliest)
        let two = |id: u64, a: f64, b: f64| {
            let mut r = rec(id, Some(a));
            if let RecordOutcome::Scored(s) = &mut r.outcome {
                s.objectives.0.push(("y".into(), b));
                s.minimized.push(b);
            }
            r
        };
        let front = vec![two(0, 1.0, 2.0), two(1, 2.0, 1.0), two(2, 1.0, 2.0), two(3, 3.0, 3.0)];
        assert_eq!(ranked(&front).iter().map(|r| r.id).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn log_events_keep_their_wire_format() {
        let e = LogEvent::Finished { termination: "Evaluations".into(), evaluations: 4, best_minimized: None };
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"event":"finished","termination":"Evaluations","evaluations":4,"best_minimized":null}"#
        );
        let line = r#"{"event":"generation","generation":2,"evaluations":8,"failures":0,"best_minimized":1.5,"mean_minimized":null,"candidates_per_hour":3600.0,"eta_seconds":null,"seconds":8.0}"#;
        let g: LogEvent = serde_json::from_str(line).expect("parse");
        assert_eq!(serde_json::to_string(&g).expect("json"), line);
    }
}
