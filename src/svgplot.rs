//! Line charts as standalone SVG files (no fonts or libraries needed to draw or view them),
//! for the benchmarks' plots.

use std::fmt::Write;

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    /// (x, y) points, drawn in x order.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed, without markers (a model, e.g. a formula, rather than a measurement).
    pub dashed: bool,
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
const W: f64 = 720.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// "Nice" tick step for a range: 1, 2 or 5 times a power of ten, about `n` ticks.
fn tick_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|s| *s >= raw).unwrap_or(10.0 * p)
}

fn fmt_tick(v: f64) -> String {
    if v == v.round() && v.abs() < 1e6 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A chart of `series` with linear axes from 0 (y) and the data's x range; x ticks at the
/// points' x values when there are few of them.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let ystep = tick_step(if y1 > 0.0 { y1 } else { 1.0 }, 5.0);
    let ymax = ((y1 / ystep).ceil() * ystep).max(ystep);
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / ymax * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, W / 2.0, escape(title));
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= ymax + ystep * 1e-9 {
        let _ = writeln!(s, r##"<line x1="{LEFT}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##, W - RIGHT, py(y), py(y));
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, py(y) + 4.0, fmt_tick(y));
        y += ystep;
    }
    // x ticks: the distinct x values if there are at most 12, else nice steps.
    let mut xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    if xs.len() > 12 || xs.is_empty() {
        let step = tick_step(x1 - x0, 8.0);
        xs = (0..).map(|i| (x0 / step).ceil() * step + i as f64 * step).take_while(|x| *x <= x1 + step * 1e-9).collect();
    }
    for x in xs {
        let _ = writeln!(s, r##"<line x1="{:.1}" x2="{:.1}" y1="{}" y2="{}" stroke="#999"/>"##, px(x), px(x), H - BOTTOM, H - BOTTOM + 5.0);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, px(x), H - BOTTOM + 18.0, fmt_tick(x));
    }
    let _ = writeln!(s, r##"<line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#333"/>"##, W - RIGHT, H - BOTTOM, H - BOTTOM);
    let _ = writeln!(s, r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{}" stroke="#333"/>"##, H - BOTTOM);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, (LEFT + W - RIGHT) / 2.0, H - 10.0, escape(x_label));
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0,
        escape(y_label)
    );
    // Lines, markers, legend.
    for (i, ser) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut p = ser.points.clone();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = p.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let dash = if ser.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#, path.join(" "));
        if !ser.dashed {
            for &(x, y) in &p {
                let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#, px(x), py(y));
            }
        }
        let ly = TOP + 8.0 + i as f64 * 18.0;
        let _ = writeln!(s, r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#, LEFT + 12.0, LEFT + 40.0);
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, LEFT + 46.0, ly + 4.0, escape(&ser.label));
    }
    s.push_str("</svg>\n");
    s
}

/// Writes each (name, SVG) of `plots` beside the results file `results` as
/// `<its stem>-<name>.svg`, saying where.
pub fn write_beside(results: &std::path::Path, plots: Vec<(String, String)>) -> anyhow::Result<()> {
    let stem = results.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    for (name, svg) in plots {
        let path = results.with_file_name(format!("{stem}-{name}.svg"));
        std::fs::write(&path, svg).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        eprintln!("# plot: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_well_formed_svg_with_every_series() {
        let series = vec![
            Series { label: "measured <N>".into(), points: vec![(2.0, 100.0), (4.0, 180.0)], dashed: false },
            Series { label: "formula".into(), points: vec![(2.0, 90.0), (4.0, 170.0)], dashed: true },
        ];
        let svg = line_chart("t & u", "N", "ms", &series);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 2, "markers on measured lines only");
        assert!(svg.contains("measured &lt;N&gt;") && svg.contains("t &amp; u"));
        assert_eq!(tick_step(180.0, 5.0), 50.0);
        assert_eq!(tick_step(0.9, 5.0), 0.2);
    }
}
