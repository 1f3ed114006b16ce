//! The report's charts as inline SVG, drawn with plotters' SVG backend. Text is written as plain
//! SVG `<text>` elements (plotters' naive font metrics: no font file is read or fetched), so the
//! browser draws it with its own sans-serif.

use plotters::prelude::*;

/// The report's palette (the screenshot test looks for these colours' pixels).
pub mod palette {
    use plotters::style::RGBColor;
    pub const TEACHER: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
    pub const STUDENT: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
    pub const CANDIDATE: RGBColor = RGBColor(0x94, 0x67, 0xbd);
    pub const PRUNED: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);
    pub const LOSS: RGBColor = RGBColor(0xd6, 0x27, 0x28);
    pub const KL: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
    pub const LR: RGBColor = RGBColor(0x8c, 0x56, 0x4b);
    pub const THROUGHPUT: RGBColor = RGBColor(0x17, 0xbe, 0xcf);
    pub const FAILED: RGBColor = RGBColor(0xd6, 0x27, 0x28);
    pub const LOST: RGBColor = RGBColor(0xbc, 0xbd, 0x22);
    /// Task kinds on the timeline, in order of first appearance.
    /// (Lighter tones, none of them a series colour above, so a colour in a screenshot says
    /// which chart drew it.)
    pub const KINDS: [RGBColor; 8] = [
        RGBColor(0xae, 0xc7, 0xe8),
        RGBColor(0x98, 0xdf, 0x8a),
        RGBColor(0xff, 0xbb, 0x78),
        RGBColor(0xc5, 0xb0, 0xd5),
        RGBColor(0x9e, 0xda, 0xe5),
        RGBColor(0xc4, 0x9c, 0x94),
        RGBColor(0xf7, 0xb6, 0xd2),
        RGBColor(0xdb, 0xdb, 0x8d),
    ];

    pub fn hex(c: RGBColor) -> String {
        format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2)
    }
}

/// One line (or set of points) on a chart.
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
    /// Join the points with a line (else: points only).
    pub line: bool,
    /// A label drawn beside each point (same length as `points`, or empty).
    pub labels: Vec<String>,
    /// A vertical interval per point (same length as `points`, or empty).
    pub intervals: Vec<(f64, f64)>,
}

impl Series {
    pub fn line(name: impl Into<String>, color: RGBColor, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            color,
            points,
            line: true,
            labels: Vec::new(),
            intervals: Vec::new(),
        }
    }
}

/// Axes of a chart.
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub width: u32,
    pub height: u32,
}

fn range(values: impl Iterator<Item = f64>, pad: f64, from_zero: bool) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return None;
    }
    if from_zero && lo > 0.0 {
        lo = 0.0;
    }
    let span = if hi > lo { hi - lo } else { hi.abs().max(1e-9) };
    let lo = if from_zero && lo == 0.0 {
        0.0
    } else {
        lo - span * pad
    };
    Some((lo, hi + span * pad))
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Formats an axis value briefly (1.2e-3, 0.53, 12.5, 1.2M, 35k).
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || (a >= 1.0 && (v - v.round()).abs() < 1e-6 * a) {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

/// An x/y chart of lines and points (with labels and intervals where given). Its legend is
/// the caller's ([`legend_html`]), outside the plot, where it hides no point.
pub fn xy(axes: &Axes, series: &[Series], y_from_zero: bool) -> Result<String, String> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| {
        s.points
            .iter()
            .map(|p| p.1)
            .chain(s.intervals.iter().flat_map(|i| [i.0, i.1]))
    });
    let (Some((x0, x1)), Some((y0, y1))) = (range(xs, 0.08, false), range(ys, 0.1, y_from_zero))
    else {
        return Err("no data".into());
    };
    // Room on the right for point labels.
    let labelled = series.iter().any(|s| !s.labels.is_empty());
    let x1 = if labelled { x1 + (x1 - x0) * 0.1 } else { x1 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (axes.width, axes.height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(axes.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|v| short(*v))
            .y_label_formatter(&|v| short(*v))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(err)?;
        let mut first_line = true;
        for s in series {
            let style = ShapeStyle::from(&s.color).stroke_width(2);
            let fill = ShapeStyle::from(&s.color).filled();
            for (p, (lo, hi)) in s.points.iter().zip(&s.intervals) {
                chart
                    .draw_series(std::iter::once(ErrorBar::new_vertical(
                        p.0, *lo, p.1, *hi, style, 8,
                    )))
                    .map_err(err)?;
            }
            // Lines wider than the ones drawn after them, so equal curves (loss = KL without
            // cross-entropy) both show.
            let style = ShapeStyle::from(&s.color).stroke_width(if first_line { 4 } else { 2 });
            if s.line && s.points.len() > 1 {
                first_line = false;
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), style))
                    .map_err(err)?;
                if s.points.len() <= 24 {
                    chart
                        .draw_series(s.points.iter().map(|p| Circle::new(*p, 3, fill)))
                        .map_err(err)?;
                }
            } else {
                chart
                    .draw_series(s.points.iter().map(|p| Circle::new(*p, 6, fill)))
                    .map_err(err)?;
            }
            for (p, l) in s.points.iter().zip(&s.labels) {
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at(*p)
                            + Text::new(l.clone(), (7, -16), ("sans-serif", 15).into_font()),
                    ))
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// A legend in HTML: a swatch and a name per series.
pub fn legend_html(items: &[(String, RGBColor)]) -> String {
    let mut o = String::from("<figcaption class=\"legend\">");
    for (name, c) in items {
        o.push_str(&format!(
            "<span><i style=\"background:{}\"></i>{}</span>",
            palette::hex(*c),
            super::esc(name)
        ));
    }
    o.push_str("</figcaption>");
    o
}

/// One bar on a timeline lane.
pub struct Bar {
    pub lane: usize,
    pub start: f64,
    pub end: f64,
    pub color: RGBColor,
    /// Outline colour for attempts that did not succeed.
    pub outline: Option<RGBColor>,
}

/// Horizontal bars per lane over time (seconds): the tasks each worker ran.
pub fn timeline(title: &str, lanes: &[String], bars: &[Bar], width: u32) -> Result<String, String> {
    let t1 = bars.iter().map(|b| b.end).fold(0.0f64, f64::max).max(1.0);
    let n = lanes.len().max(1);
    let height = 110 + 56 * n as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(230)
            .build_cartesian_2d(0.0..t1 * 1.02, 0.0..n as f64)
            .map_err(err)?;
        let lane_name = |v: &f64| {
            let i = v.floor() as usize;
            if (v - i as f64 - 0.5).abs() < 1e-6 {
                lanes.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_desc("seconds since the campaign started")
            .y_labels(2 * n + 1)
            .y_label_formatter(&lane_name)
            .x_label_formatter(&|v| short(*v))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .disable_y_mesh()
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(err)?;
        for b in bars {
            let (y0, y1) = (b.lane as f64 + 0.15, b.lane as f64 + 0.85);
            let end = if b.end > b.start {
                b.end
            } else {
                b.start + t1 * 0.002
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(b.start, y0), (end, y1)],
                    ShapeStyle::from(&b.color).filled(),
                )))
                .map_err(err)?;
            if let Some(o) = b.outline {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(b.start, y0), (end, y1)],
                        ShapeStyle::from(&o).stroke_width(3),
                    )))
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// One row of an interval chart: a name, a value and its interval.
pub struct Estimate {
    pub name: String,
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// Horizontal estimates with intervals, one row each (a ranking).
pub fn intervals(
    title: &str,
    x_desc: &str,
    rows: &[Estimate],
    color: RGBColor,
    width: u32,
) -> Result<String, String> {
    let (Some((x0, x1)), n) = (
        range(
            rows.iter().flat_map(|r| [r.value, r.low, r.high]),
            0.1,
            false,
        ),
        rows.len(),
    ) else {
        return Err("no data".into());
    };
    let height = 80 + 34 * n as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(120)
            .build_cartesian_2d(x0..x1, 0.0..n as f64)
            .map_err(err)?;
        let name = |v: &f64| {
            let i = v.floor() as usize;
            if (v - i as f64 - 0.5).abs() < 1e-6 {
                rows.get(i).map(|r| r.name.clone()).unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_labels(2 * n + 1)
            .y_label_formatter(&name)
            .x_label_formatter(&|v| short(*v))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .disable_y_mesh()
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(err)?;
        let style = ShapeStyle::from(&color).stroke_width(2);
        for (i, r) in rows.iter().enumerate() {
            let y = i as f64 + 0.5;
            chart
                .draw_series(std::iter::once(ErrorBar::new_horizontal(
                    y, r.low, r.value, r.high, style, 10,
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Circle::new(
                    (r.value, y),
                    5,
                    ShapeStyle::from(&color).filled(),
                )))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_chart_draws_its_points_in_its_colour() {
        let s = Series::line(
            "loss",
            palette::LOSS,
            (0..20)
                .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                .collect(),
        );
        let svg = xy(
            &Axes {
                title: "t",
                x: "step",
                y: "loss",
                width: 400,
                height: 300,
            },
            &[s],
            false,
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        let line = svg
            .lines()
            .find(|l| l.contains("<polyline") && l.contains("#D62728"))
            .unwrap_or_else(|| panic!("no loss polyline in {svg}"));
        let pts = line
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(pts.split_whitespace().count(), 20, "{line}");
        assert!(
            svg.contains("step\n</text>"),
            "axis label as SVG text: {svg}"
        );
    }

    #[test]
    fn empty_data_is_an_error_not_an_empty_chart() {
        let axes = Axes {
            title: "t",
            x: "x",
            y: "y",
            width: 100,
            height: 100,
        };
        assert!(xy(&axes, &[], false).is_err());
        assert!(intervals("t", "x", &[], palette::KL, 300).is_err());
    }
}
