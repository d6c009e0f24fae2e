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

/// A tick label: whole numbers without a decimal point ("50", not "50.0"), never "-0",
/// others with at most four significant decimals.
fn tick(x: &f64) -> String {
    let x = if x.abs() < 1e-12 { 0.0 } else { *x };
    if (x - x.round()).abs() < 1e-9 * x.abs().max(1.0) && x.abs() < 1e15 {
        return format!("{}", x.round() as i64);
    }
    let s = format!("{x:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The legend's corner: the one with the fewest points near it (a legend covers what is there).
fn legend_corner(pts: &[(f64, f64)], (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> SeriesLabelPosition {
    let near = |fx: f64, fy: f64| {
        let (cx, cy) = (x0 + fx * (x1 - x0), y0 + fy * (y1 - y0));
        pts.iter().filter(|p| (p.0 - cx).abs() < 0.4 * (x1 - x0) && (p.1 - cy).abs() < 0.3 * (y1 - y0)).count()
    };
    [
        (near(1.0, 1.0), SeriesLabelPosition::UpperRight),
        (near(0.0, 1.0), SeriesLabelPosition::UpperLeft),
        (near(1.0, 0.0), SeriesLabelPosition::LowerRight),
        (near(0.0, 0.0), SeriesLabelPosition::LowerLeft),
    ]
    .into_iter()
    .min_by_key(|c| c.0)
    .map_or(SeriesLabelPosition::UpperRight, |c| c.1)
}

/// An f64 axis whose ticks sit at given values (layers, hops); plotters' own `WithKeyPoints`
/// takes no label formatter.
struct Ticked {
    range: std::ops::Range<f64>,
    keys: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.range.start) / (self.range.end - self.range.start);
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: plotters::coord::ranged1d::KeyPointHint>(&self, hint: H) -> Vec<f64> {
        let step = self.keys.len().div_ceil(hint.max_num_points().max(1)).max(1);
        self.keys.iter().step_by(step).copied().collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.clone()
    }
}

/// Distinct colours, none pale on white (matplotlib's tab10 without its yellow-green and grey).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

const PS: RGBColor = RGBColor(31, 119, 180);
const DFS: RGBColor = RGBColor(255, 127, 14);
const REF: RGBColor = RGBColor(44, 160, 44);
const BEST: RGBColor = RGBColor(214, 39, 40);
const EXTRA: RGBColor = RGBColor(148, 103, 189);

/// One objective against evaluations: every candidate, the run's pick so far (lowest mean
/// minimized objective: with several objectives the balanced pick, not this objective's own
/// extreme), the references as horizontal lines, and where the data-flow stage starts.
fn objective_plot(path: &Path, name: &str, higher: bool, ps: &[EvaluationRecord], dfs: &[EvaluationRecord], refs: &[Reference]) -> Result<()> {
    let all: Vec<(f64, &EvaluationRecord, bool)> =
        ps.iter().map(|r| (r, false)).chain(dfs.iter().map(|r| (r, true))).enumerate().map(|(i, (r, d))| ((i + 1) as f64, r, d)).collect();
    let pts: Vec<(f64, f64, bool)> = all.iter().filter_map(|&(x, r, d)| objective(r, name).map(|y| (x, y, d))).collect();
    let mut pick: Vec<(f64, f64)> = vec![];
    let mut best_mean = f64::INFINITY;
    for &(x, r, _) in &all {
        match (r.mean_minimized(), objective(r, name)) {
            (Some(m), Some(y)) if m < best_mean => {
                best_mean = m;
                pick.push((x, y));
            }
            _ => {
                if let Some(&(_, y)) = pick.last() {
                    pick.push((x, y));
                }
            }
        }
    }
    let lines: Vec<(f64, &Reference)> = refs.iter().filter_map(|r| objective(r, name).map(|y| (y, r))).collect();
    let (y0, y1) = range(pts.iter().map(|p| p.1).chain(lines.iter().map(|l| l.0)));
    let x1 = (ps.len() + dfs.len()).max(1) as f64 + 1.0;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{name} ({} is better)", if higher { "higher" } else { "lower" }), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x1, y0..y1)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc("evaluations").y_desc(name).x_label_formatter(&tick).y_label_formatter(&tick).draw().map_err(plot_err)?;
    // references: dashed horizontal lines, named at the left end (lines closer than a label's
    // height share one label)
    let mut sorted = lines.clone();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut labels: Vec<(f64, String, RGBColor)> = vec![];
    for (y, r) in &sorted {
        let c = if matches!(r.kind.as_str(), "source" | "baseline") { REF } else { EXTRA };
        let style = if r.kind == "baseline" { c.stroke_width(2) } else { c.mix(0.7).stroke_width(1) };
        chart.draw_series(DashedLineSeries::new(vec![(0.0, *y), (x1, *y)], 6, 4, style)).map_err(plot_err)?;
        let name = format!("{}: {}", r.kind, r.name);
        match labels.last_mut() {
            Some(l) if (l.0 - y).abs() < 0.04 * (y1 - y0) => l.1 = format!("{} · {name}", l.1),
            _ => labels.push((*y, name, c)),
        }
    }
    for (y, text, c) in labels {
        chart.draw_series(std::iter::once(Text::new(text, (0.5, y), ("sans-serif", 12).into_font().color(&c)))).map_err(plot_err)?;
    }
    chart
        .draw_series(pts.iter().filter(|p| !p.2).map(|&(x, y, _)| Circle::new((x, y), 3, PS.mix(0.5).filled())))
        .map_err(plot_err)?
        .label("parameter-space candidates")
        .legend(|(x, y)| Circle::new((x, y), 3, PS.filled()));
    if pts.iter().any(|p| p.2) {
        // the data-flow stage starts after the last parameter-space candidate
        let xs = ps.len() as f64 + 0.5;
        chart.draw_series(DashedLineSeries::new(vec![(xs, y0), (xs, y1)], 4, 4, BLACK.mix(0.6).stroke_width(1))).map_err(plot_err)?;
        chart.draw_series(std::iter::once(Text::new("data-flow stage →", (xs, y1), ("sans-serif", 12)))).map_err(plot_err)?;
        chart
            .draw_series(pts.iter().filter(|p| p.2).map(|&(x, y, _)| Circle::new((x, y), 3, DFS.mix(0.6).filled())))
            .map_err(plot_err)?
            .label("data-flow candidates")
            .legend(|(x, y)| Circle::new((x, y), 3, DFS.filled()));
    }
    chart
        .draw_series(LineSeries::new(pick, BEST.stroke_width(2)))
        .map_err(plot_err)?
        .label("the run's pick so far (best mean objective)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BEST.stroke_width(2)));
    if !lines.is_empty() {
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
            .map_err(plot_err)?
            .label("references (dashed)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], REF.stroke_width(2)));
    }
    let xy: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, p.1)).collect();
    chart
        .configure_series_labels()
        .position(legend_corner(&xy, (0.0, x1), (y0, y1)))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
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
    chart.configure_mesh().x_desc(a.as_str()).y_desc(b.as_str()).x_label_formatter(&tick).y_label_formatter(&tick).draw().map_err(plot_err)?;
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
        // a label near an earlier one moves down a line
        let mut placed: Vec<(f64, f64)> = vec![];
        let mut shift = vec![];
        for (p, _) in &pts {
            shift.push(placed.iter().filter(|q| (q.0 - p.0).abs() < 0.15 * (x1 - x0) && (q.1 - p.1).abs() < 0.04 * (y1 - y0)).count() as i32);
            placed.push(*p);
        }
        chart
            .draw_series(pts.into_iter().zip(shift).map(|((p, name), k)| {
                let dx = if p.0 > right { -8 - 7 * name.chars().count() as i32 } else { 8 };
                EmptyElement::at(p) + TriangleMarker::new((0, 0), 7, color.filled()) + Text::new(name, (dx, -4 + 15 * k), ("sans-serif", 13))
            }))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| TriangleMarker::new((x + 9, y), 6, color.filled()));
    }
    let position = legend_corner(&all, (x0, x1), (y0, y1));
    chart.configure_series_labels().position(position).background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(plot_err)?;
    root.present().map_err(plot_err)
}

/// The genes of the best parameter-space candidate against layers, one series per
/// (parameter, model, filter): a flat segment over the layers of each group (or, with
/// `genome.smooth`, the line through group centres the layers interpolate).
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
    let groups = layout.groups().to_vec();
    let layers = groups.last().map_or(1, |g| g.1).max(1);
    let (y0, y1) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let per = exp.genome.layers_per_group;
    let caption = if groups.len() > 1 {
        format!("genes of candidate {} ({} groups of {per} layer{})", best.id, groups.len(), if per == 1 { "" } else { "s" })
    } else {
        format!("genes of candidate {} (one group: every layer)", best.id)
    };
    let keys: Vec<f64> = (0..layers).map(|l| l as f64).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(Ticked { range: -0.5..(layers as f64 - 0.5), keys }, y0..y1)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(if exp.genome.smooth { "layer (values interpolated between group centres)" } else { "layer (one value per group)" })
        .y_desc("value")
        .x_labels(layers + 1)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()
        .map_err(plot_err)?;
    // group boundaries
    for &(s, _) in groups.iter().skip(1) {
        let x = s as f64 - 0.5;
        chart.draw_series(DashedLineSeries::new(vec![(x, y0), (x, y1)], 3, 3, BLACK.mix(0.3).stroke_width(1))).map_err(plot_err)?;
    }
    let xy: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().map(|&(g, v)| ((groups[g].0 + groups[g].1) as f64 / 2.0 - 0.5, v))).collect();
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = color(i);
        let centre = |g: usize| (groups[g].0 + groups[g].1) as f64 / 2.0 - 0.5;
        if exp.genome.smooth {
            chart.draw_series(LineSeries::new(pts.iter().map(|&(g, v)| (centre(g), v)), c.stroke_width(2))).map_err(plot_err)?;
        } else {
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(g, v)| PathElement::new(vec![(groups[g].0 as f64 - 0.45, v), (groups[g].1 as f64 - 0.55, v)], c.stroke_width(3))),
                )
                .map_err(plot_err)?;
        }
        chart
            .draw_series(pts.iter().map(|&(g, v)| Circle::new((centre(g), v), 4, c.filled())))
            .map_err(plot_err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(legend_corner(&xy, (-0.5, layers as f64 - 0.5), (y0, y1)))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(series.into_iter().map(|(n, p)| (n, p.into_iter().map(|x| x.1).collect())).collect())
}

/// The best data-flow candidate's path: hop against model and layer (each model's layers in
/// their own band, labelled `mK:L`), with the scale applied on entry to each hop. `start`: the
/// path is the stage's start (nothing scored better), said in the caption.
fn path_plot(path: &Path, exp: &Experiment, best: &EvaluationRecord, layers: &[usize], start: bool) -> Result<()> {
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
    let root = SVGBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let caption = if start {
        format!("data-flow path of candidate {} ({} hops): the start path, nothing scored better", best.id, hops.len())
    } else {
        format!("data-flow path of candidate {} ({} hops)", best.id, hops.len())
    };
    // y ticks: every layer of small models, else every fourth of each model from its first
    let keys: Vec<f64> =
        offsets.iter().zip(layers).flat_map(|(&o, &n)| (0..n).filter(move |l| total <= 40 || l % 4 == 0).map(move |l| (o + l) as f64)).collect();
    let label = |y: &f64| {
        let y = y.round().max(0.0) as usize;
        offsets.iter().enumerate().rev().find(|(_, o)| **o <= y).map_or(String::new(), |(m, o)| format!("m{m}:{}", y - o))
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(
            Ticked { range: -0.5..(hops.len() as f64 - 0.5), keys: (0..hops.len()).map(|h| h as f64).collect() },
            Ticked { range: -0.5..(total as f64 - 0.5), keys },
        )
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("hop (the hidden state's way through the layers)")
        .y_desc("model:layer")
        .y_labels(total + 1)
        .x_labels(hops.len() + 1)
        .x_label_formatter(&tick)
        .y_label_formatter(&label)
        .draw()
        .map_err(plot_err)?;
    // model bands
    for &o in offsets.iter().skip(1) {
        let y = o as f64 - 0.5;
        chart
            .draw_series(DashedLineSeries::new(vec![(-0.5, y), (hops.len() as f64 - 0.5, y)], 6, 4, BLACK.mix(0.4).stroke_width(1)))
            .map_err(plot_err)?;
    }
    let pts: Vec<(f64, f64)> = hops.iter().enumerate().map(|(i, h)| (i as f64, (offsets[h.model] + h.layer) as f64)).collect();
    chart.draw_series(LineSeries::new(pts.clone(), BLACK.mix(0.4))).map_err(plot_err)?;
    let models = exp.dataflow.as_ref().map(|d| d.models.clone()).unwrap_or_default();
    for (m, name) in models.iter().enumerate() {
        let c = color(m);
        let short = if name == BEST_MERGE {
            "the parameter-space pick".to_string()
        } else {
            Path::new(name).file_name().map_or(name.clone(), |n| n.to_string_lossy().to_string())
        };
        chart
            .draw_series(hops.iter().enumerate().filter(|(_, h)| h.model == m).map(|(i, h)| {
                EmptyElement::at((i as f64, (offsets[h.model] + h.layer) as f64))
                    + Circle::new((0, 0), 6, c.filled())
                    + Text::new(if (h.scale - 1.0).abs() < 5e-3 { String::new() } else { format!("×{:.2}", h.scale) }, (6, -14), ("sans-serif", 11))
            }))
            .map_err(plot_err)?
            .label(format!("m{m}: {short} ({} layers)", layers.get(m).copied().unwrap_or(0)))
            .legend(move |(x, y)| Circle::new((x, y), 5, c.filled()));
    }
    chart
        .configure_series_labels()
        .position(legend_corner(&pts, (-0.5, hops.len() as f64 - 0.5), (-0.5, total as f64 - 0.5)))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
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
    // Whether each stage improved on where it started (as the run's closing lines say).
    let summary = evomerge_run::summarize(&run, &refs);
    for st in &summary.stages {
        let what = if st.is_dataflow() { "Data-flow stage" } else { "Parameter-space stage" };
        let numbers = match (st.improved, &st.start, &st.best) {
            (Some(true), Some(a), Some(b)) => format!(" ({:.4} → {:.4}, mean of the objectives)", a.mean_value(), b.mean_value()),
            (Some(false), _, _) if !st.is_dataflow() => " (the method at its default parameters)".into(),
            _ => String::new(),
        };
        let _ = writeln!(
            md,
            "- {what}: {}{numbers}; {} evaluations, {} failed, {} repeated an earlier point.",
            st.verdict(),
            st.evaluations,
            st.failures,
            st.repeats()
        );
    }
    if exp.dataflow.is_none() {
        let _ = writeln!(md, "- No data-flow stage in this experiment (`[dataflow]` adds one).");
    } else if dfs.is_empty() {
        let _ = writeln!(md, "- The data-flow stage has not scored a candidate yet.");
    }
    if let Some(p) = &summary.pick {
        let _ = writeln!(md, "\nExport the run's pick: `evomerge export {} --pick {p} --out merged/`\n", args.run_dir.display());
    }
    for (n, &h) in names.iter().zip(&higher) {
        let file = format!("objective-{}.svg", n.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-', "_"));
        objective_plot(&out.join(&file), n, h, &ps, &dfs, &refs)?;
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
        let groups: Vec<String> = exp
            .layout()
            .map(|(_, l)| l.groups().iter().map(|&(a, b)| if b == a + 1 { format!("{a}") } else { format!("{a}–{}", b - 1) }).collect())
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "![parameters of the best candidate](parameters.svg)\n\n| gene | per layer group (layers {}) |\n|---|---|",
            groups.join(", ")
        );
        for (n, v) in series {
            let _ = writeln!(md, "| {n} | {} |", v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", "));
        }
        md.push('\n');
    }
    if let (Some(b), Some(_)) = (best_dfs, &exp.dataflow) {
        let layers = exp.dataflow_layer_counts()?;
        let start = summary.stages.iter().any(|s| s.is_dataflow() && s.improved == Some(false));
        path_plot(&out.join("path.svg"), &exp, b, &layers, start)?;
        let _ = writeln!(md, "![data-flow path](path.svg)\n\nPath: `{}`\n", b.scores().and_then(|s| s.path.as_deref()).unwrap_or("?"));
    }
    let index = out.join("index.md");
    write_atomic(&index, &md)?;
    println!("report written to {}", index.display());
    Ok(())
}
