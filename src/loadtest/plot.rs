//! `--plot FILE`: latency over time (the slowest transaction per 100 ms) and
//! throughput, with the cutover's phases shaded.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::Report;

const PAUSED: [&str; 7] = ["drain", "fence", "catchup", "sequences", "prepare_sessions", "repoint", "move_sessions"];

pub fn svg(report: &Report, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let span = report.duration_s.max(0.1);
    let max_ms = report.timeline.iter().map(|b| b.max_ms).fold(1.0, f64::max) * 1.15;
    let max_tps = report.timeline.iter().map(|b| b.transactions as f64 * 10.0).fold(1.0, f64::max) * 1.15;
    let title = format!("pgcutover loadtest: {} clients, {} ({:?})", report.clients, report.workload, report.mode).to_lowercase();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..span, 0.0..max_ms)?
        .set_secondary_coord(0.0..span, 0.0..max_tps);
    chart.configure_mesh().x_desc("seconds").y_desc("slowest transaction per 100 ms (ms)").draw()?;
    chart.configure_secondary_axes().y_desc("transactions per second").draw()?;

    // The cutover's phases, laid end to end from the moment it was asked for.
    if let (Some(t0), Some(c)) = (report.cutover_started_s, &report.cutover) {
        let mut t = t0;
        for p in c["phases"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or("");
            let len = p["ms"].as_f64().unwrap_or(0.0) / 1000.0;
            let color = if PAUSED.contains(&name) { RGBColor(255, 150, 120).mix(0.45) } else { RGBColor(150, 180, 255).mix(0.3) };
            chart.draw_series(std::iter::once(Rectangle::new([(t, 0.0), (t + len.max(0.002), max_ms)], color.filled())))?;
            t += len;
        }
        chart
            .draw_series(std::iter::once(Rectangle::new([(t0, 0.0), (t0, 0.0)], RGBColor(255, 150, 120).mix(0.45).filled())))?
            .label(format!("cutover paused ({:.1} ms)", c["pause_ms"].as_f64().unwrap_or(0.0)))
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], RGBColor(255, 150, 120).filled()));
    }
    chart
        .draw_series(LineSeries::new(report.timeline.iter().map(|b| (b.t, b.max_ms)), RED.stroke_width(2)))?
        .label("slowest transaction (ms)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], RED));
    chart
        .draw_secondary_series(LineSeries::new(report.timeline.iter().map(|b| (b.t, b.transactions as f64 * 10.0)), BLUE.mix(0.7)))?
        .label("throughput (tx/s)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], BLUE));
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::UpperLeft).draw()?;
    root.present().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
