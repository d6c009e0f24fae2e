//! Loading a task (data, few-shot pool, templates) and rendering its prompts as lm-eval does.

#[allow(unused_imports)]
use super::*;

impl Task {
    /// Loads the spec's data (`data` overrides the spec's path), few-shot pool and templates,
    /// and renders every prompt once so that template errors surface now.
    pub fn load(spec: TaskSpec, data: Option<&std::path::Path>, fewshot_data: Option<&std::path::Path>) -> Result<Self, TaskError> {
        let name = spec.name.clone();
        let err = |reason: SpecError| TaskError::Spec { task: name.clone(), reason: Box::new(reason) };
        let path = data.map(std::path::Path::to_path_buf).or_else(|| spec.data.path.clone()).ok_or_else(|| err(SpecError::NoData))?;
        let (items, skipped) = read_items(&path, &spec.data.fields, spec.data.on_error)?;
        let fs_path = fewshot_data.map(std::path::Path::to_path_buf).or_else(|| spec.data.fewshot_path.clone());
        let (fewshot_pool, pool_is_data) = match (&fs_path, spec.prompt.fewshot) {
            (_, 0) => (vec![], false),
            (Some(p), _) => (read_items(p, &spec.data.fields, spec.data.on_error)?.0, false),
            (None, _) => (items.clone(), true),
        };
        let need = spec.prompt.fewshot + usize::from(pool_is_data);
        if spec.prompt.fewshot > 0 && fewshot_pool.len() < need {
            return Err(err(SpecError::FewShot { asked: spec.prompt.fewshot, available: fewshot_pool.len() }));
        }
        let template = Template::parse(&spec.prompt.template).map_err(&err)?;
        let choice = Template::parse(&spec.prompt.choice).map_err(&err)?;
        let target = spec.prompt.target.as_deref().map(Template::parse).transpose().map_err(&err)?;
        let continuation = spec.prompt.continuation.as_deref().map(Template::parse).transpose().map_err(&err)?;
        let extractor = Extractor::new(&spec.generation.extract).map_err(&err)?;
        let normalizer = Normalizer::new(&spec.metric.normalize).map_err(&err)?;
        let task = Self { spec, items, skipped, fewshot_pool, pool_is_data, template, choice, target, continuation, extractor, normalizer };
        for (i, item) in task.items.iter().enumerate() {
            if task.spec.kind == Kind::MultipleChoice {
                task.requests(i, item).map_err(&err)?;
            } else {
                task.context(i, item).map_err(&err)?;
            }
            if task.spec.kind == Kind::Generation && !matches!(item.gold, Gold::Text(_)) {
                return Err(err(SpecError::GenerationNeedsText(item.id.clone())));
            }
        }
        Ok(task)
    }

    /// The (context, continuation, length for acc_norm) of each choice. Usually one context and
    /// a continuation per choice (target delimiter + choice template; the length is the choice's
    /// in characters). With `prompt.continuation` (lm-eval's multiple-input tasks, WinoGrande)
    /// each choice goes into its own context and one continuation is scored after all of them;
    /// the length is then that of the choice's context, as lm-eval takes `len(doc_to_choice)`.
    pub fn requests(&self, index: usize, item: &Item) -> Result<Vec<(String, String, f64)>, SpecError> {
        let delim = &self.spec.prompt.target_delimiter;
        let len = |s: &str| s.chars().count().max(1) as f64;
        if let Some(cont) = &self.continuation {
            let prefix = self.fewshot_prefix(index, item)?;
            let c = format!("{delim}{}", self.pp(cont.render(item, None)?));
            return item
                .choices
                .iter()
                .enumerate()
                .map(|(i, ch)| {
                    let own = self.pp(self.template.render(item, Some(ChoiceCtx { choice: ch, index: i }))?);
                    Ok((format!("{prefix}{own}"), c.clone(), len(&own)))
                })
                .collect();
        }
        let ctx = self.context(index, item)?;
        item.choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let raw = self.pp(self.choice.render(item, Some(ChoiceCtx { choice: c, index: i }))?);
                Ok((ctx.clone(), format!("{delim}{raw}"), len(&raw)))
            })
            .collect()
    }

    /// The answer text a few-shot example shows.
    pub(super) fn target_text(&self, ex: &Item) -> Result<String, SpecError> {
        let t = match (&self.continuation, &self.target, &ex.gold) {
            (Some(c), _, _) => c.render(ex, None)?,
            (None, Some(t), _) => t.render(ex, None)?,
            (None, None, Gold::Choice(i)) => {
                let c = ex.choices.get(*i).ok_or(SpecError::GoldOutOfRange)?;
                self.choice.render(ex, Some(ChoiceCtx { choice: c, index: *i }))?
            }
            (None, None, Gold::Text(t)) => t.clone(),
        };
        Ok(self.pp(t))
    }

    /// A few-shot example's prompt: multiple-input tasks show the gold choice in it.
    pub(super) fn example_prompt(&self, ex: &Item) -> Result<String, SpecError> {
        let p = match (&self.continuation, &ex.gold) {
            (Some(_), Gold::Choice(i)) => {
                let c = ex.choices.get(*i).ok_or(SpecError::GoldOutOfRange)?;
                self.template.render(ex, Some(ChoiceCtx { choice: c, index: *i }))?
            }
            _ => self.template.render(ex, None)?,
        };
        Ok(self.pp(p))
    }

    /// The task's text clean-up ([`Preprocess`]) of a rendered prompt or choice.
    pub(super) fn pp(&self, text: String) -> String {
        static BRACKETS: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| regex::Regex::new(r"\[.*?\]").expect("valid regex"));
        match self.spec.prompt.preprocess {
            Preprocess::None => text,
            Preprocess::Hellaswag => {
                let t = text.trim().replace(" [title]", ". ");
                BRACKETS.replace_all(&t, "").replace("  ", " ")
            }
        }
    }

    /// Description + few-shot examples (lm-eval `fewshot_context` before the item's prompt).
    pub(super) fn fewshot_prefix(&self, index: usize, item: &Item) -> Result<String, SpecError> {
        let p = &self.spec.prompt;
        let mut out = p.description.clone();
        if p.fewshot > 0 {
            let chosen: Vec<usize> = match p.fewshot_sampler {
                FewshotSampler::FirstN => {
                    let not_self = |&j: &usize| !(self.pool_is_data && self.fewshot_pool[j].id == item.id);
                    (0..self.fewshot_pool.len()).filter(not_self).take(p.fewshot).collect()
                }
                FewshotSampler::PerItem => {
                    // Seeded per item, so that results do not depend on evaluation order or --limit.
                    let mut rng = ChaCha8Rng::seed_from_u64(p.fewshot_seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let mut chosen: Vec<usize> = Vec::with_capacity(p.fewshot);
                    while chosen.len() < p.fewshot {
                        let j = (rng.next_u64() % self.fewshot_pool.len() as u64) as usize;
                        let is_self = self.pool_is_data && self.fewshot_pool[j].id == item.id;
                        if !is_self && !chosen.contains(&j) {
                            chosen.push(j);
                        }
                    }
                    chosen
                }
            };
            for j in chosen {
                let ex = &self.fewshot_pool[j];
                out.push_str(&self.example_prompt(ex)?);
                out.push_str(&p.target_delimiter);
                out.push_str(&self.target_text(ex)?);
                out.push_str(&p.fewshot_delimiter);
            }
        }
        Ok(out)
    }

    /// Description + few-shot examples + this item's prompt (lm-eval `fewshot_context`).
    pub fn context(&self, index: usize, item: &Item) -> Result<String, SpecError> {
        Ok(format!("{}{}", self.fewshot_prefix(index, item)?, self.pp(self.template.render(item, None)?)))
    }
}
