//! Seeded synthetic tasks for the demo model zoo: arithmetic, string reversal, letter sorting.
//!
//! Each generator draws distinct items from a seeded ChaCha8 stream, shuffles them and splits
//! 80 / 10 / 10 into train / validation / test, so every item is in exactly one split and the
//! same seed always gives the same splits. Answers are free text ([`Gold::Text`]); prompts use
//! the `Q: … A:` shape of the fixture corpus.

use std::collections::HashSet;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng as _, SeedableRng};

use crate::item::{Gold, Item};

/// Disjoint train / validation / test items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    pub train: Vec<Item>,
    pub validation: Vec<Item>,
    pub test: Vec<Item>,
}

struct Draw(ChaCha8Rng);

impl Draw {
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n.max(1)
    }
}

/// Up to `n` distinct `(question, answer)` pairs from `make`, shuffled and split.
fn generate(seed: u64, n: usize, task: &str, mut make: impl FnMut(&mut Draw) -> (String, String)) -> Splits {
    let mut d = Draw(ChaCha8Rng::seed_from_u64(seed));
    let mut seen = HashSet::new();
    let mut pairs = Vec::with_capacity(n);
    let mut attempts = 0;
    while pairs.len() < n && attempts < 50 * n.max(1) {
        attempts += 1;
        let (q, a) = make(&mut d);
        if seen.insert(q.clone()) {
            pairs.push((q, a));
        }
    }
    for i in (1..pairs.len()).rev() {
        let j = d.below(i as u64 + 1) as usize;
        pairs.swap(i, j);
    }
    let items: Vec<Item> = pairs
        .into_iter()
        .enumerate()
        .map(|(i, (question, answer))| Item {
            id: format!("{task}-{i}"),
            question,
            choices: vec![],
            gold: Gold::Text(answer),
            fields: Default::default(),
        })
        .collect();
    let (n_train, n_val) = (items.len() * 8 / 10, items.len() / 10);
    let mut it = items.into_iter();
    let train = it.by_ref().take(n_train).collect();
    let validation = it.by_ref().take(n_val).collect();
    Splits { train, validation, test: it.collect() }
}

/// `Q: what is a ∘ b? A:` with ∘ ∈ {+, −, ×} and operands of up to `max_digits` digits.
pub fn arithmetic(seed: u64, n: usize, max_digits: u32) -> Splits {
    let top = 10u64.pow(max_digits.clamp(1, 9));
    generate(seed, n, "arith", |d| {
        let (a, b) = (d.below(top), d.below(top));
        match d.below(3) {
            0 => (format!("Q: what is {a} + {b}? A:"), (a + b).to_string()),
            1 => (format!("Q: what is {a} - {b}? A:"), (a as i64 - b as i64).to_string()),
            _ => (format!("Q: what is {a} * {b}? A:"), (a * b).to_string()),
        }
    })
}

/// `Q: what is a + b? A:` only, operands of up to `max_digits` digits (the demo zoo's
/// arithmetic skill: learnable by a model of a few hundred thousand parameters).
pub fn addition(seed: u64, n: usize, max_digits: u32) -> Splits {
    let top = 10u64.pow(max_digits.clamp(1, 9));
    generate(seed, n, "add", |d| {
        let (a, b) = (d.below(top), d.below(top));
        (format!("Q: what is {a} + {b}? A:"), (a + b).to_string())
    })
}

fn word(d: &mut Draw, max_len: usize) -> String {
    let len = 2 + d.below(max_len.saturating_sub(1).max(1) as u64) as usize;
    (0..len).map(|_| (b'a' + d.below(26) as u8) as char).collect()
}

/// `Q: reverse abc A:` → `cba`.
pub fn reverse(seed: u64, n: usize, max_len: usize) -> Splits {
    generate(seed, n, "reverse", |d| {
        let w = word(d, max_len);
        (format!("Q: reverse {w} A:"), w.chars().rev().collect())
    })
}

/// `Q: sort dcab A:` → `abcd`.
pub fn sort_letters(seed: u64, n: usize, max_len: usize) -> Splits {
    generate(seed, n, "sort", |d| {
        let w = word(d, max_len);
        let mut s: Vec<char> = w.chars().collect();
        s.sort_unstable();
        (format!("Q: sort {w} A:"), s.into_iter().collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(i: &Item) -> &str {
        match &i.gold {
            Gold::Text(t) => t,
            Gold::Choice(_) => "",
        }
    }

    #[test]
    fn deterministic_disjoint_splits() {
        let a = arithmetic(5, 500, 2);
        assert_eq!(a, arithmetic(5, 500, 2));
        assert_ne!(a, arithmetic(6, 500, 2));
        assert_eq!((a.train.len(), a.validation.len(), a.test.len()), (400, 50, 50));
        let mut all: Vec<&str> = a.train.iter().chain(&a.validation).chain(&a.test).map(|i| i.question.as_str()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 500, "every item in exactly one split");
    }

    #[test]
    fn answers_are_right() {
        for i in arithmetic(1, 200, 3).train {
            let q = i.question.trim_start_matches("Q: what is ").trim_end_matches("? A:");
            let parts: Vec<&str> = q.split(' ').collect();
            let (a, b): (i64, i64) = (parts[0].parse().expect("a"), parts[2].parse().expect("b"));
            let want = match parts[1] {
                "+" => a + b,
                "-" => a - b,
                _ => a * b,
            };
            assert_eq!(answer(&i), want.to_string(), "{}", i.question);
        }
        for i in reverse(2, 50, 8).test {
            let w = i.question.trim_start_matches("Q: reverse ").trim_end_matches(" A:");
            assert_eq!(answer(&i), w.chars().rev().collect::<String>());
        }
        for i in sort_letters(3, 50, 8).validation {
            let a = answer(&i);
            assert!(a.as_bytes().windows(2).all(|w| w[0] <= w[1]), "{a}");
        }
    }

    #[test]
    fn small_spaces_return_what_exists() {
        // one-digit sums, differences and products: at most 300 distinct questions
        let s = arithmetic(0, 10_000, 1);
        let total = s.train.len() + s.validation.len() + s.test.len();
        assert!(total <= 300 && total > 250, "{total}");
    }
}
