//! `evomerge report RUN_DIR`: SVG plots and a one-page Markdown summary in `RUN_DIR/report/`.
//!
//! - `objective-<name>.svg`: every candidate's value against evaluations, and the best so far
//!   (both stages; data-flow candidates continue the x axis);
//! - `front.svg` (two or more objectives): all candidates, the Pareto front of each stage, the
//!   source models and the default-parameter baseline;
//! - `parameters.svg`: the per-layer-group genes of the best parameter-space candidate;
//! - `path.svg`: the layer path of the best data-flow candidate (layer against hop, per model);
//! - `index.md`: the tables and links to the plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use evomerge_run::run_dir::{BEST as BEST_MERGE, write_atomic};
use evomerge_run::{EvaluationRecord, Experiment, Reference, RunDir, best_by_mean, ranked};
use plotters::prelude::*;
use serde_json::Value;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  evomerge report runs/1700000000-demo\n  \
evomerge report runs/1700000000-demo --references grid.json\n\n\
Writes RUN_DIR/report/index.md and the SVG plots it links; works while the run is live.")]
pub struct ReportArgs {
    /// A run directory written by `evomerge search`.
    pub run_dir: PathBuf,
    /// More reference points for the table and the front plot, next to the run's sources and
    /// baseline: a JSON list of {"name", "kind", "objectives": {objective: value}}, the format
    /// of RUN_DIR/references.json (e.g. hand-set merges scored with `evomerge eval`).
    #[arg(long, value_name = "FILE")]
    pub references: Option<PathBuf>,
}

/// The `--references` file: a list of objects, each with a name and numeric objectives.
fn extra_references(path: &Path) -> Result<Vec<Reference>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --references {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("--references {}: not JSON", path.display()))?;
    let list = v.as_array().with_context(|| format!("--references {}: expected a JSON list of reference points", path.display()))?;
    for (i, r) in list.iter().enumerate() {
        let ok = r["name"].is_string() && r["objectives"].as_object().is_some_and(|o| !o.is_empty() && o.values().all(Value::is_number));
        if !ok {
            anyhow::bail!("--references {}: entry {i} needs \"name\" and \"objectives\" (an object of numbers)", path.display());
        }
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| serde_json::from_value(r.clone()).with_context(|| format!("--references {}: entry {i}", path.display())))
        .collect()
}

/// A point with named objectives: a candidate's record or a reference.
trait Point {
    fn value(&self, name: &str) -> Option<f64>;
}

impl Point for EvaluationRecord {
    fn value(&self, name: &str) -> Option<f64> {
        self.objective(name)
    }
}

impl Point for Reference {
    fn value(&self, name: &str) -> Option<f64> {
        self.objectives.get(name)
    }
}

/// Objective `name` of a point, when finite.
fn objective(v: &impl Point, name: &str) -> Option<f64> {
    v.value(name).filter(|x| x.is_finite())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e:?}")
}

/// `[lo, hi]` padded by 5 % (a flat range gets ±0.5).
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - pad, hi + pad)
}

const PS: RGBColor = RGBColor(31, 119, 180);
const DFS: RGBColor = RGBColor(255, 127, 14);
const REF: RGBColor = RGBColor(44, 160, 44);
const BEST: RGBColor = RGBColor(214, 39, 40);
const EXTRA: RGBColor = RGBColor(148, 103, 189);

fn objective_plot(path: &Path, name: &str, higher: bool, ps: &[EvaluationRecord], dfs: &[EvaluationRecord]) -> Result<()> {
    let pts: Vec<(f64, f64, bool)> = ps
        .iter()
        .map(|r| (r, false))
        .chain(dfs.iter().map(|r| (r, true)))
        .enumerate()
        .filter_map(|(i, (r, d))| objective(r, name).map(|y| ((i + 1) as f64, y, d)))
        .collect();
    let mut best: Vec<(f64, f64)> = vec![];
    for &(x, y, _) in &pts {
        let b = best.last().map_or(y, |&(_, b)| if higher { b.max(y) } else { b.min(y) });
        best.push((x, b));
    }
    let (y0, y1) = range(pts.iter().map(|p| p.1));
    let x1 = (ps.len() + dfs.len()).max(1) as f64 + 1.0;
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{name} ({} is better)", if higher { "higher" } else { "lower" }), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x1, y0..y1)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc("evaluations").y_desc(name).draw().map_err(plot_err)?;
    chart
        .draw_series(pts.iter().filter(|p| !p.2).map(|&(x, y, _)| Circle::new((x, y), 3, PS.mix(0.5).filled())))
        .map_err(plot_err)?
        .label("parameter-space candidates")
        .legend(|(x, y)| Circle::new((x, y), 3, PS.filled()));
    if pts.iter().any(|p| p.2) {
        chart
            .draw_series(pts.iter().filter(|p| p.2).map(|&(x, y, _)| Circle::new((x, y), 3, DFS.mix(0.6).filled())))
            .map_err(plot_err)?
            .label("data-flow candidates")
            .legend(|(x, y)| Circle::new((x, y), 3, DFS.filled()));
    }
    chart
        .draw_series(LineSeries::new(best, BEST.stroke_width(2)))
        .map_err(plot_err)?
        .label("best so far")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BEST.stroke_width(2)));
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(plot_err)?;
    root.present().map_err(plot_err)
}

fn front_plot(path: &Path, names: &[String], ps: &[EvaluationRecord], dfs: &[EvaluationRecord], refs: &[Reference]) -> Result<()> {
    let (a, b) = (&names[0], &names[1]);
    fn xy_of(r: &impl Point, a: &str, b: &str) -> Option<(f64, f64)> {
        Some((objective(r, a)?, objective(r, b)?))
    }
    let xy = |r: &EvaluationRecord| xy_of(r, a, b);
    let all: Vec<(f64, f64)> = ps.iter().chain(dfs).filter_map(xy).chain(refs.iter().filter_map(|r| xy_of(r, a, b))).collect();
    let (x0, x1) = range(all.iter().map(|p| p.0));
    let (y0, y1) = range(all.iter().map(|p| p.1));
    let root = SVGBackend::new(path, (760, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Pareto front: {a} vs {b}"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc(a.as_str()).y_desc(b.as_str()).draw().map_err(plot_err)?;
    for (recs, color, label) in [(ps, PS, "parameter space"), (dfs, DFS, "data flow")] {
        let ok: Vec<&EvaluationRecord> = recs.iter().filter(|r| r.scores().is_some() && xy(r).is_some()).collect();
        if ok.is_empty() {
            continue;
        }
        chart.draw_series(ok.iter().filter_map(|r| xy(r)).map(|p| Circle::new(p, 3, color.mix(0.35).filled()))).map_err(plot_err)?;
        let f: Vec<(f64, f64)> = ranked(recs).into_iter().filter_map(xy).collect();
        chart
            .draw_series(LineSeries::new(f.clone(), color.stroke_width(2)).point_size(4))
            .map_err(plot_err)?
            .label(format!("{label}: candidates and front"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    // References: the run's own (sources, baseline) in green, `--references` points of other
    // kinds in purple; labels go left of points in the right quarter, so they stay inside.
    for own in [true, false] {
        let color = if own { REF } else { EXTRA };
        let pts: Vec<((f64, f64), String)> = refs
            .iter()
            .filter(|r| matches!(r.kind.as_str(), "source" | "baseline") == own)
            .filter_map(|r| Some((xy_of(r, a, b)?, r.name.clone())))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let right = x0 + 0.75 * (x1 - x0);
        let label = if own {
            "sources and baseline"
        } else {
            refs.iter().map(|r| r.kind.as_str()).find(|k| !matches!(*k, "source" | "baseline")).unwrap_or("references")
        };
        chart
            .draw_series(pts.into_iter().map(|(p, name)| {
                let dx = if p.0 > right { -8 - 7 * name.chars().count() as i32 } else { 8 };
                EmptyElement::at(p) + TriangleMarker::new((0, 0), 7, color.filled()) + Text::new(name, (dx, -4), ("sans-serif", 13))
            }))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| TriangleMarker::new((x + 9, y), 6, color.filled()));
    }
    // The legend goes into the corner with the fewest points.
    let corner = |fx: f64, fy: f64| {
        let (cx, cy) = (x0 + fx * (x1 - x0), y0 + fy * (y1 - y0));
        all.iter().filter(|p| (p.0 - cx).abs() < 0.35 * (x1 - x0) && (p.1 - cy).abs() < 0.2 * (y1 - y0)).count()
    };
    let position = [
        (corner(0.0, 0.0), SeriesLabelPosition::LowerLeft),
        (corner(1.0, 0.0), SeriesLabelPosition::LowerRight),
        (corner(0.0, 1.0), SeriesLabelPosition::UpperLeft),
        (corner(1.0, 1.0), SeriesLabelPosition::UpperRight),
    ]
    .into_iter()
    .min_by_key(|c| c.0)
    .map_or(SeriesLabelPosition::UpperRight, |c| c.1);
    chart.configure_series_labels().position(position).background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(plot_err)?;
    root.present().map_err(plot_err)
}

/// Per-group values of the best parameter-space candidate, one line per (parameter, model, filter).
fn parameters_plot(path: &Path, exp: &Experiment, best: &EvaluationRecord) -> Result<Vec<(String, Vec<f64>)>> {
    let (_, layout) = exp.layout()?;
    let genome = best.genome.clone();
    let mut series: Vec<(String, Vec<(usize, f64)>)> = vec![];
    for (g, x) in layout.genes().iter().zip(&genome) {
        let model = g.model.map_or(String::new(), |m| {
            let r = &exp.merge.models[m];
            format!(" · {}", Path::new(r).file_name().map_or(r.clone(), |n| n.to_string_lossy().to_string()))
        });
        let filter = g.filter.map_or(String::new(), |f| format!(" · {}", exp.genome.filters.get(f).cloned().unwrap_or_default()));
        let key = format!("{}{model}{filter}", g.param);
        match series.iter_mut().find(|s| s.0 == key) {
            Some(s) => s.1.push((g.group, *x)),
            None => series.push((key, vec![(g.group, *x)])),
        }
    }
    let groups = layout.groups().len().max(1);
    let (y0, y1) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("parameters of candidate {} per layer group", best.id), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5..(groups as f64 - 0.5), y0..y1)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc("layer group").y_desc("value").draw().map_err(plot_err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().map(|&(g, v)| (g as f64, v)), color.stroke_width(2)).point_size(4))
            .map_err(plot_err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(series.into_iter().map(|(n, p)| (n, p.into_iter().map(|x| x.1).collect())).collect())
}

/// The best data-flow candidate's path: layer (stacked per model) against hop index.
fn path_plot(path: &Path, exp: &Experiment, best: &EvaluationRecord, layers: &[usize]) -> Result<()> {
    let path_json: evomerge_engine::model::LayerPath = {
        let df = exp.dataflow.as_ref().context("no dataflow section")?;
        let l = evomerge_engine::dataflow::DataFlowLayout::new(layers, &df.genome)?;
        let genome = best.genome.clone();
        l.decode(&genome)?
    };
    let offsets: Vec<usize> = layers
        .iter()
        .scan(0, |s, &c| {
            let o = *s;
            *s += c;
            Some(o)
        })
        .collect();
    let total: usize = layers.iter().sum();
    let hops = &path_json.hops;
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("data-flow path of candidate {} ({} hops)", best.id, hops.len()), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5..(hops.len() as f64 - 0.5), -0.5..(total as f64 - 0.5))
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc("hop").y_desc("layer (models stacked)").draw().map_err(plot_err)?;
    let pts: Vec<(f64, f64)> = hops.iter().enumerate().map(|(i, h)| (i as f64, (offsets[h.model] + h.layer) as f64)).collect();
    chart.draw_series(LineSeries::new(pts.clone(), BLACK.mix(0.4))).map_err(plot_err)?;
    let models = exp.dataflow.as_ref().map(|d| d.models.clone()).unwrap_or_default();
    for (m, name) in models.iter().enumerate() {
        let color = Palette99::pick(m).to_rgba();
        let short = Path::new(name).file_name().map_or(name.clone(), |n| n.to_string_lossy().to_string());
        chart
            .draw_series(hops.iter().enumerate().filter(|(_, h)| h.model == m).map(|(i, h)| {
                EmptyElement::at((i as f64, (offsets[h.model] + h.layer) as f64))
                    + Circle::new((0, 0), 6, color.filled())
                    + Text::new(format!("×{:.2}", h.scale), (6, -14), ("sans-serif", 11))
            }))
            .map_err(plot_err)?
            .label(format!("model {m}: {short}"))
            .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(plot_err)?;
    root.present().map_err(plot_err)
}

pub fn run(args: ReportArgs) -> Result<()> {
    let run = RunDir::new(&args.run_dir);
    let exp = run.experiment()?;
    let ps = run.evaluations();
    let dfs = run.dataflow_evaluations();
    let mut refs = run.references();
    if let Some(p) = &args.references {
        refs.extend(extra_references(p)?);
    }
    let out = args.run_dir.join("report");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let first = ps.iter().chain(&dfs).find_map(|r| r.scores()).context("the run has no scored candidate yet")?;
    let names: Vec<String> = first.objectives.names().map(String::from).collect();
    // Direction of each objective: minimized = -value means higher is better.
    let higher: Vec<bool> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let v = first.objectives.get(n).filter(|x| x.is_finite()).unwrap_or(0.0);
            let m = first.minimized.get(i).copied().filter(|x| !x.is_nan()).unwrap_or(0.0);
            v != 0.0 && (m + v).abs() < 1e-12 * v.abs().max(1.0)
        })
        .collect();
    let mut md = String::new();
    let _ = writeln!(md, "# Run report: {}\n", exp.name);
    let _ = writeln!(
        md,
        "{} parameter-space evaluations ({} failed), {} data-flow evaluations; method `{}`, optimizer `{}`.\n",
        ps.len(),
        ps.iter().filter(|r| r.failure().is_some()).count(),
        dfs.len(),
        exp.merge.method,
        serde_json::to_value(exp.optimizer.kind_for(exp.objectives.len()))?.as_str().unwrap_or("?")
    );
    // Results table: best candidates of each stage and the references.
    let _ = writeln!(md, "| candidate | {} |\n|---|{}", names.join(" | "), "---|".repeat(names.len()));
    fn row(md: &mut String, names: &[String], label: &str, r: &impl Point) {
        let vals: Vec<String> = names.iter().map(|n| objective(r, n).map_or("-".into(), |v| format!("{v:.4}"))).collect();
        let _ = writeln!(md, "| {label} | {} |", vals.join(" | "));
    }
    let best_ps = best_by_mean(&ps);
    let best_dfs = best_by_mean(&dfs);
    if let Some(b) = best_ps {
        row(&mut md, &names, &format!("best parameter-space candidate ({})", b.id), b);
    }
    if let Some(b) = best_dfs {
        row(&mut md, &names, &format!("best data-flow candidate ({})", b.id), b);
    }
    for r in &refs {
        row(&mut md, &names, &format!("{}: {}", r.kind, r.name), r);
    }
    let _ = writeln!(md, "\nBest = lowest mean of the minimized objectives.\n");
    for (n, &h) in names.iter().zip(&higher) {
        let file = format!("objective-{}.svg", n.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-', "_"));
        objective_plot(&out.join(&file), n, h, &ps, &dfs)?;
        let _ = writeln!(md, "![{n} against evaluations]({file})\n");
    }
    if names.len() >= 2 {
        front_plot(&out.join("front.svg"), &names, &ps, &dfs, &refs)?;
        let _ = writeln!(md, "![Pareto front](front.svg)\n");
        let f = ranked(&ps);
        let _ = writeln!(
            md,
            "Parameter-space Pareto front ({} members):\n\n| id | {} |\n|---|{}",
            f.len(),
            names.join(" | "),
            "---|".repeat(names.len())
        );
        for r in f {
            let vals: Vec<String> = names.iter().map(|n| objective(r, n).map_or("-".into(), |v| format!("{v:.4}"))).collect();
            let _ = writeln!(md, "| {} | {} |", r.id, vals.join(" | "));
        }
        md.push('\n');
    }
    if let Some(b) = best_ps {
        let series = parameters_plot(&out.join("parameters.svg"), &exp, b)?;
        let _ = writeln!(md, "![parameters of the best candidate](parameters.svg)\n\n| gene | per layer group |\n|---|---|");
        for (n, v) in series {
            let _ = writeln!(md, "| {n} | {} |", v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", "));
        }
        md.push('\n');
    }
    if let (Some(b), Some(df)) = (best_dfs, &exp.dataflow) {
        let mut layers = vec![];
        for m in &df.models {
            let dir = if m == BEST_MERGE { exp.merge.base_model.clone().unwrap_or_else(|| exp.merge.models[0].clone()) } else { m.clone() };
            let cfg = evomerge_engine::io::ModelConfig::from_dir(&evomerge_engine::io::resolve_model(&dir, None)?)?;
            layers.push(cfg.num_hidden_layers);
        }
        path_plot(&out.join("path.svg"), &exp, b, &layers)?;
        let _ = writeln!(md, "![data-flow path](path.svg)\n\nPath: `{}`\n", b.scores().and_then(|s| s.path.as_deref()).unwrap_or("?"));
    }
    let index = out.join("index.md");
    write_atomic(&index, &md)?;
    println!("report written to {}", index.display());
    Ok(())
}
