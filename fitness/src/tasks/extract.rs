//! Answer extraction and exact-match normalization for generation tasks, as lm-eval-harness
//! filters and its `exact_match` metric define them.
//!
//! - `gsm8k` ("strict-match"): the first `#### N` (regex `#### (\-?[0-9\.\,]+)`).
//! - `last_number` ("flexible-extract"): the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`.
//! - `regex`: a user pattern, group 1 if it has groups, of the first or last match.
//! - `none`: the whole generation.
//!
//! No match gives lm-eval's `"[invalid]"`, which never equals a gold answer.
//! `exact_match` then removes every `regexes_to_ignore` match from both prediction and gold,
//! optionally lower-cases and strips punctuation, and compares after trimming.

use super::error::SpecError;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// lm-eval's placeholder for "nothing extracted".
pub const INVALID: &str = "[invalid]";

/// How a generation becomes an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Extract {
    None,
    Gsm8k,
    LastNumber,
    Regex {
        pattern: String,
        /// Which match: "first" (default) or "last".
        #[serde(default)]
        last: bool,
    },
}

/// A compiled extractor.
#[derive(Debug, Clone)]
pub struct Extractor {
    re: Option<Regex>,
    last: bool,
}

impl Extractor {
    pub fn new(e: &Extract) -> Result<Self, SpecError> {
        let (pat, last) = match e {
            Extract::None => return Ok(Self { re: None, last: false }),
            Extract::Gsm8k => (r"#### (\-?[0-9\.\,]+)", false),
            Extract::LastNumber => (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", true),
            Extract::Regex { pattern, last } => (pattern.as_str(), *last),
        };
        let re = Regex::new(pat).map_err(|e| SpecError::Regex { what: "extract regex", pattern: pat.to_string(), reason: e.to_string() })?;
        Ok(Self { re: Some(re), last })
    }

    /// The extracted answer, or [`INVALID`].
    pub fn apply(&self, text: &str) -> String {
        let Some(re) = &self.re else { return text.to_string() };
        let caps = if self.last { re.captures_iter(text).last() } else { re.captures(text) };
        let Some(c) = caps else { return INVALID.to_string() };
        // The first group that matched (lm-eval takes the match tuple's non-empty entry),
        // or the whole match when the pattern has no groups.
        let m = (1..c.len()).find_map(|i| c.get(i)).or_else(|| c.get(0));
        m.map_or_else(|| INVALID.to_string(), |m| m.as_str().trim().to_string())
    }
}

/// exact_match options (lm-eval's `exact_match` metric arguments).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    #[serde(default)]
    pub ignore_case: bool,
    #[serde(default)]
    pub ignore_punctuation: bool,
    #[serde(default)]
    pub regexes_to_ignore: Vec<String>,
}

/// A compiled normalizer.
#[derive(Debug, Clone)]
pub struct Normalizer {
    ignore: Vec<Regex>,
    case: bool,
    punct: bool,
}

impl Normalizer {
    pub fn new(n: &Normalize) -> Result<Self, SpecError> {
        let ignore = n
            .regexes_to_ignore
            .iter()
            .map(|p| Regex::new(p).map_err(|e| SpecError::Regex { what: "regexes_to_ignore", pattern: p.to_string(), reason: e.to_string() }))
            .collect::<Result<_, _>>()?;
        Ok(Self { ignore, case: n.ignore_case, punct: n.ignore_punctuation })
    }

    pub fn apply(&self, s: &str) -> String {
        let mut t = s.to_string();
        for re in &self.ignore {
            t = re.replace_all(&t, "").into_owned();
        }
        if self.case {
            t = t.to_lowercase();
        }
        if self.punct {
            t.retain(|c| !c.is_ascii_punctuation());
        }
        t.trim().to_string()
    }

    /// 1 when prediction and gold agree after normalization.
    pub fn exact_match(&self, prediction: &str, gold: &str) -> f64 {
        f64::from(u8::from(self.apply(prediction) == self.apply(gold)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gsm8k_norm() -> Normalizer {
        Normalizer::new(&Normalize {
            ignore_case: true,
            ignore_punctuation: false,
            regexes_to_ignore: vec![",".into(), r"\$".into(), "(?s).*#### ".into(), r"\.$".into()],
        })
        .expect("norm")
    }

    #[test]
    fn gsm8k_strict_and_flexible_extraction() {
        let text = " She has 3 + 4 = 7 apples.\n#### 1,234\n\nQuestion: next";
        assert_eq!(Extractor::new(&Extract::Gsm8k).expect("x").apply(text), "1,234");
        assert_eq!(Extractor::new(&Extract::LastNumber).expect("x").apply(text), "1,234");
        let loose = "The answer is $18.";
        assert_eq!(Extractor::new(&Extract::Gsm8k).expect("x").apply(loose), INVALID);
        assert_eq!(Extractor::new(&Extract::LastNumber).expect("x").apply(loose), "$18.");
        assert_eq!(Extractor::new(&Extract::LastNumber).expect("x").apply("7 then 9"), "9");
        // Gold answers are the full solution; the normalizer keeps the final number only.
        let gold = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072";
        let n = gsm8k_norm();
        assert_eq!(n.apply(gold), "1072");
        assert_eq!(n.exact_match("1,072", gold), 1.0);
        assert_eq!(n.exact_match("$1072.", gold), 1.0);
        assert_eq!(n.exact_match(INVALID, gold), 0.0);
    }

    #[test]
    fn regex_extraction_and_case() {
        let x = Extractor::new(&Extract::Regex { pattern: r"answer is \(?([A-D])".into(), last: false }).expect("x");
        assert_eq!(x.apply("so the answer is (B) because"), "B");
        let n = Normalizer::new(&Normalize { ignore_case: true, ignore_punctuation: true, regexes_to_ignore: vec![] }).expect("n");
        assert_eq!(n.exact_match("Paris!", " paris"), 1.0);
        assert!(Extractor::new(&Extract::Regex { pattern: "(".into(), last: false }).is_err());
    }
}
