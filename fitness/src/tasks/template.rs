//! Prompt templates: `{name}` placeholders filled from an item, `{{` / `}}` for literal braces.
//!
//! Names: `question`, `answer` (the gold text or gold choice), any field the data mapping kept
//! (`extra`), and inside choice templates `choice`, `letter` (A, B, ...), `index`. `choices`
//! renders the choices lettered, one per line (`A. first\nB. second`), as MMLU prompts do.
//! Every placeholder is checked when a task loads, so a typo is an error naming the field, not
//! an empty string in every prompt.

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
    Field(String),
}

/// Per-choice values available to choice templates.
#[derive(Debug, Clone, Copy)]
pub struct ChoiceCtx<'a> {
    pub choice: &'a str,
    pub index: usize,
}

impl Template {
    pub fn parse(source: &str) -> Result<Self, String> {
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
                            None => return Err(format!("template '{source}': unclosed '{{'")),
                        }
                    }
                    let name = name.trim().to_string();
                    if name.is_empty() {
                        return Err(format!("template '{source}': empty placeholder '{{}}'"));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => return Err(format!("template '{source}': unmatched '}}' (write '}}}}' for a literal brace)")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self { parts, source: source.to_string() })
    }

    /// Fills the template; unknown names are errors.
    pub fn render(&self, item: &Item, choice: Option<ChoiceCtx<'_>>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(name) => {
                    let v = match (name.as_str(), choice) {
                        ("choice", Some(c)) => c.choice.to_string(),
                        ("letter", Some(c)) => letter(c.index),
                        ("index", Some(c)) => c.index.to_string(),
                        ("choices", _) => item
                            .choices
                            .iter()
                            .enumerate()
                            .map(|(i, c)| format!("{}. {c}", letter(i)))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        (n, _) => item.field(n).map(str::to_string).ok_or_else(|| {
                            format!(
                                "template '{}': item '{}' has no field '{n}' (fields: question, answer, choices{}{})",
                                self.source,
                                item.id,
                                if choice.is_some() { ", choice, letter, index" } else { "" },
                                item.fields.keys().map(|k| format!(", {k}")).collect::<String>()
                            )
                        })?,
                    };
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
    fn unknown_fields_and_bad_syntax_are_errors() {
        let e = Template::parse("Q: {qestion}").expect("parse").render(&item(), None).expect_err("typo");
        assert!(e.contains("no field 'qestion'") && e.contains("subject"), "{e}");
        assert!(Template::parse("Q: {question").is_err());
        assert!(Template::parse("a } b").is_err());
        assert!(Template::parse("{choice}").expect("parse").render(&item(), None).is_err(), "choice only in choice templates");
    }
}
