//! Markdown reports with PNG plots (plotters, bitmap backend, text drawn with ab_glyph
//! from an embedded Liberation Sans, SIL OFL 1.1: no system font is needed).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::TrainError;
use crate::bb::{self, BbData};
use crate::dates::Day;
use crate::disk::BbReport;
use crate::output::SmdRow;
use crate::smd::SmdReport;
use waterbear_models::Artifact;

static FONT: &[u8] = include_bytes!("../assets/LiberationSans-Regular.ttf");
static REGISTER: Once = Once::new();

fn font() {
    REGISTER.call_once(|| {
        // the embedded font is valid; if registration failed, text would be missing,
        // and the plot tests would notice the blank labels
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn perr(path: &Path) -> impl Fn(String) -> TrainError + '_ {
    move |message| TrainError::Plot {
        path: path.to_path_buf(),
        message,
    }
}

macro_rules! tryp {
    ($e:expr, $path:expr) => {
        $e.map_err(|e| perr($path)(e.to_string()))?
    };
}

/// Draws `series` (name, points) as lines on log-x FAR vs FDR axes.
fn fdr_far_png(
    path: &Path,
    series: &[(String, Vec<(f64, f64)>)],
    marks: &[(String, f64, f64)],
) -> Result<(), TrainError> {
    font();
    let root = BitMapBackend::new(path, (800, 520)).into_drawing_area();
    tryp!(root.fill(&WHITE), path);
    let mut chart = tryp!(
        ChartBuilder::on(&root)
            .caption("FDR vs FAR (validation period)", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(52)
            .build_cartesian_2d((1e-4f64..0.2f64).log_scale(), 0f64..1f64),
        path
    );
    tryp!(
        chart
            .configure_mesh()
            .x_desc("false alarm rate (drives)")
            .y_desc("failure detection rate")
            .label_style(("sans-serif", 14))
            .draw(),
        path
    );
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.0 >= 1e-4).collect();
        tryp!(
            chart.draw_series(LineSeries::new(pts, c.stroke_width(2))),
            path
        )
        .label(name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    let mark_colors = [BLACK, RGBColor(230, 120, 0), RGBColor(0, 150, 60)];
    for (i, (name, far, fdr)) in marks.iter().enumerate() {
        let far = far.max(1e-4);
        let c = mark_colors[i % mark_colors.len()];
        tryp!(
            chart.draw_series(std::iter::once(Circle::new((far, *fdr), 5, c.filled()))),
            path
        )
        .label(name.clone())
        .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled()));
    }
    tryp!(
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::LowerRight)
            .draw(),
        path
    );
    tryp!(root.present(), path);
    Ok(())
}

fn bars_png(
    path: &Path,
    title: &str,
    xdesc: &str,
    labels: &[String],
    values: &[f64],
) -> Result<(), TrainError> {
    font();
    let n = labels.len().max(1);
    let h = 80 + 22 * n as u32;
    let root = BitMapBackend::new(path, (800, h)).into_drawing_area();
    tryp!(root.fill(&WHITE), path);
    let vmax = values.iter().cloned().fold(0.0f64, f64::max).max(1e-9) * 1.05;
    let mut chart = tryp!(
        ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(210)
            .build_cartesian_2d(0f64..vmax, (0..n).into_segmented()),
        path
    );
    let labels2 = labels.to_vec();
    tryp!(
        chart
            .configure_mesh()
            .x_desc(xdesc)
            .y_labels(n)
            .y_label_formatter(&move |v: &SegmentValue<usize>| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) =>
                    labels2.get(*i).cloned().unwrap_or_default(),
                SegmentValue::Last => String::new(),
            })
            .label_style(("sans-serif", 13))
            .draw(),
        path
    );
    tryp!(
        chart.draw_series(values.iter().enumerate().map(|(i, &v)| {
            Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (v, SegmentValue::Exact(i + 1)),
                ],
                BLUE.mix(0.6).filled(),
            )
        })),
        path
    );
    tryp!(root.present(), path);
    Ok(())
}

fn hist_png(
    path: &Path,
    title: &str,
    xdesc: &str,
    groups: &[(String, Vec<f64>)],
    bins: usize,
    range: (f64, f64),
    log_y: bool,
) -> Result<(), TrainError> {
    font();
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    tryp!(root.fill(&WHITE), path);
    let (lo, hi) = range;
    let w = (hi - lo) / bins as f64;
    let counts: Vec<Vec<f64>> = groups
        .iter()
        .map(|(_, v)| {
            let mut c = vec![0.0; bins];
            for &x in v {
                if x.is_finite() {
                    let b = (((x - lo) / w).floor().max(0.0) as usize).min(bins - 1);
                    c[b] += 1.0;
                }
            }
            // share of the group, so groups of different sizes compare
            let tot: f64 = c.iter().sum::<f64>().max(1.0);
            c.iter_mut().for_each(|v| *v /= tot);
            c
        })
        .collect();
    let ymax = counts
        .iter()
        .flatten()
        .cloned()
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.1;
    let colors = [BLUE, RED, GREEN];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            tryp!(
                chart
                    .configure_mesh()
                    .x_desc(xdesc)
                    .y_desc("share of group")
                    .label_style(("sans-serif", 14))
                    .draw(),
                path
            );
            for (g, (name, _)) in groups.iter().enumerate() {
                let c = colors[g % colors.len()];
                let pts: Vec<(f64, f64)> = counts[g]
                    .iter()
                    .enumerate()
                    .flat_map(|(b, &v)| {
                        let x0 = lo + b as f64 * w;
                        let v = v.max(1e-6);
                        [(x0, v), (x0 + w, v)]
                    })
                    .collect();
                tryp!(
                    chart.draw_series(LineSeries::new(pts, c.stroke_width(2))),
                    path
                )
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            }
            tryp!(
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .draw(),
                path
            );
        }};
    }
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(60);
    if log_y {
        draw!(tryp!(
            builder.build_cartesian_2d(lo..hi, (1e-6f64..ymax.max(2e-6)).log_scale()),
            path
        ));
    } else {
        draw!(tryp!(builder.build_cartesian_2d(lo..hi, 0f64..ymax), path));
    }
    tryp!(root.present(), path);
    Ok(())
}

/// FDR/FAR points of a score over a threshold sweep, from per-drive maxima.
pub fn curve(healthy: &[f64], failed: &[f64]) -> Vec<(f64, f64)> {
    let mut h: Vec<f64> = healthy.to_vec();
    h.sort_by(|a, b| b.total_cmp(a));
    let mut f: Vec<f64> = failed.to_vec();
    f.sort_by(|a, b| b.total_cmp(a));
    let mut thresholds: Vec<f64> = h
        .iter()
        .chain(f.iter())
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup();
    let step = (thresholds.len() / 400).max(1);
    let nh = h.len().max(1) as f64;
    let nf = f.len().max(1) as f64;
    thresholds
        .iter()
        .step_by(step)
        .map(|&t| {
            let fa = h.partition_point(|&x| x >= t) as f64 / nh;
            let de = f.partition_point(|&x| x >= t) as f64 / nf;
            (fa, de)
        })
        .collect()
}

fn dir_create(dir: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(TrainError::io(dir))
}

fn write_md(dir: &Path, md: &str) -> Result<(), TrainError> {
    let p = dir.join("report.md");
    std::fs::write(&p, md).map_err(TrainError::io(&p))
}

/// Writes `report.md`, `fdr_far.png`, `lead_time.png`, `importance.png` to `dir`.
#[allow(clippy::too_many_arguments)]
pub fn bb_report(
    dir: &Path,
    title: &str,
    rep: &BbReport,
    a: &Artifact,
    data: &BbData,
    scores: &[f64],
    from: Day,
    to: Day,
    horizon: u32,
) -> Result<(), TrainError> {
    dir_create(dir)?;
    let (h, f) = bb::drive_maxima(data, scores, from, to, horizon);
    let (level, rose) = bb::rule_alarms(data);
    let as_score = |v: &[bool]| {
        v.iter()
            .map(|&b| f64::from(u8::from(b)))
            .collect::<Vec<f64>>()
    };
    let mut marks = Vec::new();
    for (name, al) in [("rule: counter > 0", &level), ("rule: counter rose", &rose)] {
        let m = bb::evaluate_alarms(data, al, from, to, horizon);
        marks.push((name.to_string(), m.far, m.fdr));
    }
    let _ = as_score;
    let model_m = bb::evaluate_alarms(
        data,
        &scores.iter().map(|&s| s >= a.threshold).collect::<Vec<_>>(),
        from,
        to,
        horizon,
    );
    marks.push((
        format!("model at threshold {:.3}", a.threshold),
        model_m.far,
        model_m.fdr,
    ));
    fdr_far_png(
        &dir.join("fdr_far.png"),
        &[(format!("{} {}", a.name, a.version), curve(&h, &f))],
        &marks,
    )?;
    let leads: Vec<f64> = model_m.leads.iter().map(|&l| f64::from(l)).collect();
    hist_png(
        &dir.join("lead_time.png"),
        "Lead time of detected failures (model)",
        "days before failure of the first alarm",
        &[("detected drives".into(), leads)],
        horizon as usize,
        (0.5, horizon as f64 + 0.5),
        false,
    )?;
    let mut imp: Vec<(String, f64)> = match &a.model {
        waterbear_models::ModelBody::DiskForest(fo) => a
            .feature_names
            .iter()
            .cloned()
            .zip(fo.importance.iter().copied())
            .collect(),
        _ => vec![],
    };
    imp.sort_by(|x, y| y.1.total_cmp(&x.1));
    bars_png(
        &dir.join("importance.png"),
        "Feature importance (mean impurity decrease)",
        "share",
        &imp.iter().map(|x| x.0.clone()).collect::<Vec<_>>(),
        &imp.iter().map(|x| x.1).collect::<Vec<_>>(),
    )?;
    let mut md = String::new();
    let _ = writeln!(md, "# {title}: {} {}\n", a.name, a.version);
    let _ = writeln!(
        md,
        "Data: `{}` (Backblaze, cited as the source).  ",
        rep.data.display()
    );
    let _ = writeln!(
        md,
        "Training data: {} .. {} ({} rows, {} positive).  ",
        a.training_data.from, a.training_data.to, a.training_data.rows, a.training_data.positives
    );
    let _ = writeln!(
        md,
        "Threshold: {:.6} ({}).\n",
        a.threshold, a.threshold_rule
    );
    let _ = writeln!(
        md,
        "| alarms | period | FDR | FAR | median lead (days) | failed | healthy |\n|---|---|---|---|---|---|---|"
    );
    for r in &rep.rows {
        let m = &r.metrics;
        let lead = m.median_lead.map_or("-".into(), |l| format!("{l}"));
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.4} | {} | {} | {} |",
            r.name, r.period, m.fdr, m.far, lead, m.failed, m.healthy
        );
    }
    let _ = writeln!(
        md,
        "\n![FDR vs FAR](fdr_far.png)\n\n![lead time](lead_time.png)\n\n![importance](importance.png)\n"
    );
    let _ = writeln!(md, "## Timings\n\n```\n{}```", rep.timings);
    write_md(dir, &md)
}

/// Writes `report.md`, `f1.png`, `scores.png` to `dir`.
pub fn smd_report(
    dir: &Path,
    title: &str,
    rep: &SmdReport,
    rows: &[SmdRow],
) -> Result<(), TrainError> {
    dir_create(dir)?;
    let per: Vec<_> = rep.lines.iter().collect();
    let mut labels = Vec::new();
    let mut vals = Vec::new();
    for l in &per {
        labels.push(format!("{} raw", l.machine));
        vals.push(l.raw.prf().2);
        labels.push(format!("{} PA", l.machine));
        vals.push(l.pa.prf().2);
    }
    bars_png(
        &dir.join("f1.png"),
        "F1 per machine (raw and point-adjusted)",
        "F1",
        &labels,
        &vals,
    )?;
    let normal: Vec<f64> = rows
        .iter()
        .filter(|r| r.label == 0)
        .map(|r| r.score)
        .collect();
    let anom: Vec<f64> = rows
        .iter()
        .filter(|r| r.label == 1)
        .map(|r| r.score)
        .collect();
    let hi = rows
        .iter()
        .map(|r| r.score)
        .fold(0.0f64, f64::max)
        .clamp(1.0, 50.0);
    hist_png(
        &dir.join("scores.png"),
        "Test scores by label",
        "score (mean of top-k |z|, smoothed)",
        &[
            ("normal minutes".into(), normal),
            ("anomalous minutes".into(), anom),
        ],
        60,
        (0.0, hi),
        true,
    )?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# {title}: {}\n\nData: `{}` (SMD, Su et al. KDD 2019).\n",
        rep.model,
        rep.data.display()
    );
    let _ = writeln!(
        md,
        "| machine | raw P | raw R | raw F1 | PA P | PA R | PA F1 | best raw F1 (diagnosis) |\n|---|---|---|---|---|---|---|---|"
    );
    for l in &rep.lines {
        let (p, r, f) = l.raw.prf();
        let (pp, pr, pf) = l.pa.prf();
        let b = l.best_raw_f1.map_or("-".into(), |b| format!("{b:.4}"));
        let _ = writeln!(
            md,
            "| {} | {p:.4} | {r:.4} | {f:.4} | {pp:.4} | {pr:.4} | {pf:.4} | {b} |",
            l.machine
        );
    }
    let _ = writeln!(
        md,
        "\n![F1](f1.png)\n\n![scores](scores.png)\n\n## Timings\n\n```\n{}```",
        rep.timings
    );
    write_md(dir, &md)
}
