//! The backtest's trade-off plot (PNG, drawn with plotters). Text is rendered with
//! ab_glyph from Noto Sans, embedded from the `notosans` crate (SIL Open Font License),
//! so it works on a fresh machine with no system fonts.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::backtest::Row;

fn ensure_font() -> Result<(), String> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, notosans::REGULAR_TTF)
            .map_err(|_| "the embedded Noto Sans font did not load".to_owned())
    })
    .clone()
}

/// Draws interruptions (% of reactive) against wasted mitigations (%), one panel per
/// trace: the policy variants as a curve, the baselines as labelled points.
pub fn tradeoff(path: &Path, rows: &[Row]) -> Result<(), String> {
    ensure_font()?;
    let mut traces: Vec<&str> = rows.iter().map(|r| r.trace.as_str()).collect();
    traces.dedup();
    let root =
        BitMapBackend::new(path, (640 * traces.len().max(1) as u32, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((1, traces.len().max(1)));
    for (panel, trace) in panels.iter().zip(&traces) {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.trace == *trace).collect();
        let x_max = rs.iter().map(|r| r.wasted_pct).fold(10.0f64, f64::max) * 1.1;
        let y_max = rs
            .iter()
            .map(|r| 100.0 + r.vs_reactive_pct)
            .fold(100.0f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("trace: {trace}"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("wasted mitigations (% of mitigations)")
            .y_desc("VM interruptions (% of reactive)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
        let mut curve: Vec<(f64, f64)> = rs
            .iter()
            .filter(|r| r.variant.starts_with("policy thr"))
            .map(|r| (r.wasted_pct, 100.0 + r.vs_reactive_pct))
            .collect();
        curve.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(curve.clone(), BLUE.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label("policy variants (threshold x evidence)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(curve.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
            .map_err(|e| e.to_string())?;
        for r in &rs {
            let color = if r.variant.starts_with("reactive") {
                RED
            } else if r.variant.starts_with("static") {
                MAGENTA
            } else if r.variant.starts_with("policy (default") {
                GREEN
            } else {
                continue;
            };
            let p = (r.wasted_pct.min(x_max * 0.98), 100.0 + r.vs_reactive_pct);
            chart
                .draw_series(std::iter::once(TriangleMarker::new(p, 7, color.filled())))
                .map_err(|e| e.to_string())?;
            let name = r
                .variant
                .split(" (")
                .next()
                .unwrap_or(&r.variant)
                .to_owned();
            let name = if r.variant.starts_with("policy (default") {
                "default policy".to_owned()
            } else {
                name
            };
            chart
                .draw_series(std::iter::once(Text::new(
                    name,
                    (
                        if p.0 > x_max * 0.7 {
                            p.0 - x_max * 0.25
                        } else {
                            p.0 + x_max * 0.01
                        },
                        p.1 + y_max * 0.02,
                    ),
                    ("sans-serif", 14).into_font().color(&color),
                )))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}
