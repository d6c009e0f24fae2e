//! Prompt templates: `{name}` placeholders filled from an item, `{{` / `}}` for literal braces.
//!
//! Names: `question`, `answer` (the gold text or gold choice), any field the data mapping kept
//! (`extra`), and inside choice templates `choice`, `letter` (A, B, ...), `index`. `choices`
//! renders the choices lettered, one per line (`A. first\nB. second`), as MMLU prompts do.
//! Every placeholder is checked when a task loads, so a typo is an error naming the field, not
//! an empty string in every prompt.
//!
//! Filters after `|` transform a value, left to right: `before:S` (the text before the first
//! `S`), `after:S` (the text after it), `trim`, `capitalize` (Python's `str.capitalize`: first
//! character upper case, the rest lower case). A value without `S` is an error for that item,
//! as lm-eval's `str.index` raises. WinoGrande's partial sentences, for instance, are
//! `{question|before:_}{choice}` and `{question|after:_|trim}`.

use super::error::SpecError;
use evomerge_datasets::Item;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    source: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(String, Vec<Filter>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Filter {
    Before(String),
    After(String),
    Trim,
    Capitalize,
}

impl Filter {
    /// `f` is trimmed: markers cannot start or end with whitespace.
    fn parse(f: &str, source: &str) -> Result<Self, SpecError> {
        let f = f.trim();
        match f.split_once(':') {
            _ if f == "trim" => Ok(Filter::Trim),
            _ if f == "capitalize" => Ok(Filter::Capitalize),
            Some(("before", s)) if !s.is_empty() => Ok(Filter::Before(s.to_string())),
            Some(("after", s)) if !s.is_empty() => Ok(Filter::After(s.to_string())),
            _ => Err(SpecError::UnknownFilter { template: source.to_string(), filter: f.to_string() }),
        }
    }

    fn apply(&self, v: String) -> Result<String, SpecError> {
        let missing = |s: &str, v: &str| SpecError::MarkerNotFound { marker: s.to_string(), value: v.to_string() };
        Ok(match self {
            Filter::Trim => v.trim().to_string(),
            Filter::Capitalize => {
                let mut c = v.chars();
                c.next().map_or_else(String::new, |f| f.to_uppercase().chain(c.flat_map(char::to_lowercase)).collect())
            }
            Filter::Before(s) => v[..v.find(s.as_str()).ok_or_else(|| missing(s, &v))?].to_string(),
            Filter::After(s) => v[v.find(s.as_str()).ok_or_else(|| missing(s, &v))? + s.len()..].to_string(),
        })
    }
}

/// Per-choice values available to choice templates.
#[derive(Debug, Clone, Copy)]
pub struct ChoiceCtx<'a> {
    pub choice: &'a str,
    pub index: usize,
}

impl Template {
    pub fn parse(source: &str) -> Result<Self, SpecError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(ch) => name.push(ch),
                            None => return Err(SpecError::Unclosed(source.to_string())),
                        }
                    }
                    let mut pieces = name.split('|');
                    let name = pieces.next().unwrap_or_default().trim().to_string();
                    if name.is_empty() {
                        return Err(SpecError::EmptyPlaceholder(source.to_string()));
                    }
                    let filters = pieces.map(|f| Filter::parse(f, source)).collect::<Result<Vec<_>, _>>()?;
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(name, filters));
                }
                '}' => return Err(SpecError::Unmatched(source.to_string())),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self { parts, source: source.to_string() })
    }

    /// Fills the template; unknown names are errors.
    pub fn render(&self, item: &Item, choice: Option<ChoiceCtx<'_>>) -> Result<String, SpecError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(name, filters) => {
                    let v = match (name.as_str(), choice) {
                        ("choice", Some(c)) => c.choice.to_string(),
                        ("letter", Some(c)) => letter(c.index),
                        ("index", Some(c)) => c.index.to_string(),
                        ("choices", _) => item.choices.iter().enumerate().map(|(i, c)| format!("{}. {c}", letter(i))).collect::<Vec<_>>().join("\n"),
                        (n, _) => item.field(n).map(str::to_string).ok_or_else(|| SpecError::NoField {
                            template: self.source.clone(),
                            item: item.id.clone(),
                            field: n.to_string(),
                            known: format!(
                                "question, answer, choices{}{}",
                                if choice.is_some() { ", choice, letter, index" } else { "" },
                                item.fields.keys().map(|k| format!(", {k}")).collect::<String>()
                            ),
                        })?,
                    };
                    let v = filters.iter().try_fold(v, |v, f| f.apply(v)).map_err(|e| SpecError::Filter {
                        template: self.source.clone(),
                        item: item.id.clone(),
                        field: name.clone(),
                        reason: Box::new(e),
                    })?;
                    out.push_str(&v);
                }
            }
        }
        Ok(out)
    }
}

/// `A`, `B`, ... for choice `i`.
pub fn letter(i: usize) -> String {
    char::from_u32('A' as u32 + i as u32).map_or_else(|| i.to_string(), |c| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use evomerge_datasets::Gold;

    fn item() -> Item {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("subject".to_string(), "math".to_string());
        Item { id: "7".into(), question: "2+2?".into(), choices: vec!["3".into(), "4".into()], gold: Gold::Choice(1), fields }
    }

    #[test]
    fn renders_fields_choices_and_braces() {
        let t = Template::parse("{{about {subject}}} Q: {question}\n{choices}\nAnswer:").expect("parse");
        assert_eq!(t.render(&item(), None).expect("render"), "{about math} Q: 2+2?\nA. 3\nB. 4\nAnswer:");
        let c = Template::parse("{letter}) {choice} = {answer}").expect("parse");
        assert_eq!(c.render(&item(), Some(ChoiceCtx { choice: "3", index: 0 })).expect("render"), "A) 3 = 4");
    }

    #[test]
    fn filters_cut_around_a_marker_and_trim() {
        let mut it = item();
        it.question = "The cup fell off the table because _ was wobbly. ".into();
        let ctx = Template::parse("{question|before:_}{choice}").expect("parse");
        assert_eq!(
            ctx.render(&it, Some(ChoiceCtx { choice: "the table", index: 1 })).expect("render"),
            "The cup fell off the table because the table"
        );
        let cont = Template::parse("{question | after:_ | trim}").expect("parse");
        assert_eq!(cont.render(&it, None).expect("render"), "was wobbly.");
        let e = Template::parse("{subject|before:_}").expect("parse").render(&it, None).expect_err("no marker");
        assert!(matches!(&e, SpecError::Filter { item, reason, .. } if item == "7" && matches!(**reason, SpecError::MarkerNotFound { .. })), "{e}");
        assert!(e.to_string().contains("'_' not found"), "{e}");
        assert_eq!(
            Template::parse("{question|capitalize}").expect("parse").render(&it, None).expect("render"),
            "The cup fell off the table because _ was wobbly. "
        );
        it.question = "then HE runs.".into();
        assert_eq!(Template::parse("{question|capitalize}").expect("parse").render(&it, None).expect("render"), "Then he runs.");
        let e = Template::parse("{question|upper}").expect_err("unknown filter");
        assert!(matches!(&e, SpecError::UnknownFilter { filter, .. } if filter == "upper"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_syntax_are_errors() {
        let e = Template::parse("Q: {qestion}").expect("parse").render(&item(), None).expect_err("typo");
        assert!(matches!(&e, SpecError::NoField { field, known, .. } if field == "qestion" && known.contains("subject")), "{e}");
        assert!(Template::parse("Q: {question").is_err());
        assert!(Template::parse("a } b").is_err());
        assert!(Template::parse("{choice}").expect("parse").render(&item(), None).is_err(), "choice only in choice templates");
    }
}
