//! Fitness estimators on a real task and real models: calibration from the fixture models,
//! subset estimates, the per-(weights, item) cache.

use evomerge_engine::model::{self, LanguageModel, Tokenizer};
use evomerge_fitness::tasks::{EvalOptions, Task, TaskSpec};
use evomerge_fitness::{Direction, FitnessEstimator, Method, TaskEstimator};

use crate::common::fixtures;

fn arc() -> Task {
    let spec = TaskSpec::load("arc_challenge").expect("preset");
    Task::load(spec, Some(&fixtures().join("datasets/arc_sample.jsonl")), None).expect("task")
}

fn open(name: &str) -> Box<dyn LanguageModel> {
    model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &fixtures().join(name)).expect("model")
}

fn tok() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("models/llama-tiny-a")).expect("tok")
}

#[test]
fn full_and_random_estimates_agree_with_eval_and_the_cache_scores_nothing_twice() {
    let mut cand = open("merges/ties");
    let full = arc().evaluate(cand.as_mut(), &tok(), 1, &EvalOptions::default()).expect("eval");
    let mut est = TaskEstimator::new(arc(), tok(), 1, Method::Full, None).expect("full");
    assert_eq!(est.objectives()[0].name, "arc_challenge/acc_norm");
    assert_eq!(est.objectives()[0].direction, Direction::Maximize);
    let f = est.evaluate(cand.as_mut(), "ties").expect("fitness");
    assert!((f.values[0] - full.value).abs() < 1e-12);
    assert_eq!(f.items, 8);
    let again = est.evaluate(cand.as_mut(), "ties").expect("cached");
    assert_eq!(again.items, 0, "every item came from the cache");
    assert_eq!(again.values, f.values);

    let mut rnd = TaskEstimator::new(arc(), tok(), 1, Method::Random { k: 4, seed: 3 }, None).expect("random");
    let r = rnd.evaluate(cand.as_mut(), "ties").expect("random fitness");
    let want: f64 = rnd.subset().iter().map(|&i| full.items[i].score).sum::<f64>() / 4.0;
    assert!((r.values[0] - want).abs() < 1e-12);
    assert_eq!(r.items, 4);
}

#[test]
fn calibrated_estimators_run_on_the_source_models_results() {
    let t = tok();
    let task = arc();
    let mut ms: Vec<Box<dyn LanguageModel>> =
        ["models/llama-tiny-base", "models/llama-tiny-a", "models/llama-tiny-b"].iter().map(|n| open(n)).collect();
    let cal = TaskEstimator::responses(&task, &t, 1, &mut ms).expect("calibration");
    assert_eq!((cal.models, cal.items), (3, 8));
    for method in [Method::Anchor { k: 3, seed: 1 }, Method::Gpirt { k: 4, seed: 1 }, Method::GpirtAnchor { k: 3, seed: 1 }] {
        let mut e = TaskEstimator::new(arc(), tok(), 1, method, Some(&cal)).expect("estimator");
        if matches!(method, Method::GpirtAnchor { .. }) {
            let anchors = evomerge_fitness::estimators::AnchorPoints::fit(&cal, 3, 1);
            assert_eq!(e.subset(), &anchors.items[..], "gp-IRT on anchors scores the anchor points");
        }
        let f = e.evaluate(open("merges/linear").as_mut(), "linear").expect("fitness");
        assert!((0.0..=1.0).contains(&f.values[0]) && f.std_errors[0] >= 0.0, "{method:?}: {f:?}");
        assert!(f.items <= 4);
    }
    let e = TaskEstimator::new(arc(), tok(), 1, Method::Irt { k: 4, seed: 1 }, None).expect_err("needs calibration");
    assert!(e.to_string().contains("calibration"), "{e}");
}
