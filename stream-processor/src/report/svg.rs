//! Just enough SVG for the report's charts: panels with a title, axes with
//! ticks, lines, stacked areas, horizontal bars and a legend. Hand-written
//! text, so the report needs no plotting library.

use std::fmt::Write as _;

/// A colour-blind-safe palette (Okabe–Ito), then greys.
pub const PALETTE: [&str; 10] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
    "#999999", "#666666",
];

pub fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// Escapes text for an SVG text node or attribute.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A number as an SVG coordinate: finite, two decimals.
fn n(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "0".into()
    }
}

/// A document being drawn, `width` wide; panels stack downwards.
pub struct Svg {
    pub width: f64,
    pub height: f64,
    body: String,
}

/// The plotting area of one panel, in document coordinates.
#[derive(Debug, Clone, Copy)]
pub struct Area {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl Svg {
    pub fn new(width: f64) -> Svg {
        Svg {
            width,
            height: 0.0,
            body: String::new(),
        }
    }

    pub fn text(&mut self, x: f64, y: f64, size: f64, anchor: &str, text: &str) {
        let _ = writeln!(
            self.body,
            r#"<text x="{}" y="{}" font-size="{}" text-anchor="{anchor}">{}</text>"#,
            n(x),
            n(y),
            n(size),
            escape(text)
        );
    }

    /// A heading for the whole report.
    pub fn heading(&mut self, title: &str, subtitle: &str) {
        self.text(20.0, self.height + 32.0, 22.0, "start", title);
        self.text(20.0, self.height + 54.0, 13.0, "start", subtitle);
        self.height += 70.0;
    }

    /// Starts a panel `height` tall with a title and a note under it, and
    /// returns its plotting area (left margin for axis labels, right margin
    /// for the legend).
    pub fn panel(&mut self, title: &str, note: &str, height: f64) -> Area {
        let top = self.height + 10.0;
        let _ = writeln!(
            self.body,
            r##"<rect x="10" y="{}" width="{}" height="{}" fill="#fafafa" stroke="#dddddd"/>"##,
            n(top),
            n(self.width - 20.0),
            n(height)
        );
        self.text(20.0, top + 22.0, 16.0, "start", title);
        self.text(20.0, top + 40.0, 11.0, "start", note);
        self.height = top + height;
        Area {
            x: 80.0,
            y: top + 68.0,
            w: self.width - 80.0 - 220.0,
            h: height - 68.0 - 35.0,
        }
    }

    /// A message in place of a chart that has no data.
    pub fn empty(&mut self, area: Area, message: &str) {
        self.text(
            area.x + area.w / 2.0,
            area.y + area.h / 2.0,
            13.0,
            "middle",
            message,
        );
    }

    /// An x axis with labels at `ticks` (share of the width, text).
    pub fn x_axis(&mut self, area: Area, ticks: &[(f64, String)]) {
        let Area { x, y, w, h } = area;
        let _ = writeln!(
            self.body,
            r##"<path d="M{} {} H{}" fill="none" stroke="#444444"/>"##,
            n(x),
            n(y + h),
            n(x + w)
        );
        for (at, label) in ticks {
            let tx = x + w * at.clamp(0.0, 1.0);
            let _ = writeln!(
                self.body,
                r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#444444"/>"##,
                n(tx),
                n(y + h),
                n(tx),
                n(y + h + 4.0)
            );
            self.text(tx, y + h + 16.0, 10.0, "middle", label);
        }
    }

    /// X and Y axes: x labels at `ticks`, y from 0 to `y_max` in five
    /// gridlines, `y_unit` above.
    pub fn axes(&mut self, area: Area, ticks: &[(f64, String)], y_max: f64, y_unit: &str) {
        let Area { x, y, h, .. } = area;
        let _ = writeln!(
            self.body,
            r##"<path d="M{} {} V{}" fill="none" stroke="#444444"/>"##,
            n(x),
            n(y),
            n(y + h)
        );
        for i in 0..=4 {
            let v = y_max * i as f64 / 4.0;
            let ty = y + h - h * i as f64 / 4.0;
            let _ = writeln!(
                self.body,
                r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#e4e4e4"/>"##,
                n(x),
                n(ty),
                n(x + area.w),
                n(ty)
            );
            self.text(x - 6.0, ty + 4.0, 10.0, "end", &short(v));
        }
        self.text(x - 6.0, y - 8.0, 10.0, "end", y_unit);
        self.x_axis(area, ticks);
    }

    /// Lines of text right of `area`, where a legend would be.
    pub fn notes(&mut self, area: Area, lines: &[String]) {
        for (i, line) in lines.iter().enumerate() {
            let ly = area.y + 9.0 + 16.0 * i as f64;
            self.text(area.x + area.w + 20.0, ly, 11.0, "start", line);
        }
    }

    /// A polyline of `values` (one per bucket, evenly spaced) scaled to
    /// `y_max`.
    pub fn line(&mut self, area: Area, values: &[f64], y_max: f64, colour: &str) {
        let points = points(area, values, y_max);
        let _ = writeln!(
            self.body,
            r#"<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.6"/>"#
        );
    }

    /// Stacked areas: `layers[i][b]` is layer i's share of bucket b; they
    /// sum to at most `y_max`.
    pub fn stacked(&mut self, area: Area, layers: &[Vec<f64>], y_max: f64) {
        let buckets = layers.first().map_or(0, Vec::len);
        let mut base = vec![0.0; buckets];
        for (i, layer) in layers.iter().enumerate() {
            let top: Vec<f64> = base.iter().zip(layer).map(|(b, v)| b + v).collect();
            let mut d = points(area, &top, y_max);
            let lower: Vec<f64> = base.iter().rev().copied().collect();
            let lower_points = points_rev(area, &lower, y_max);
            if !lower_points.is_empty() {
                d.push(' ');
                d.push_str(&lower_points);
            }
            let _ = writeln!(
                self.body,
                r#"<polygon points="{d}" fill="{}" fill-opacity="0.85" stroke="none"/>"#,
                colour(i)
            );
            base = top;
        }
    }

    /// Horizontal bars, one row per item: `(label, value, text)`, values
    /// scaled to `max`.
    pub fn bars(&mut self, area: Area, rows: &[(String, f64, String)], max: f64, colour: &str) {
        let count = rows.len().max(1) as f64;
        let row_h = area.h / count;
        for (i, (label, value, text)) in rows.iter().enumerate() {
            let ty = area.y + row_h * i as f64;
            let len = if max > 0.0 {
                (value / max).clamp(0.0, 1.0) * area.w
            } else {
                0.0
            };
            if len > 0.0 {
                let _ = writeln!(
                    self.body,
                    r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{colour}"/>"#,
                    n(area.x),
                    n(ty + row_h * 0.15),
                    n(len),
                    n(row_h * 0.7)
                );
            }
            self.text(area.x - 6.0, ty + row_h * 0.5 + 4.0, 10.0, "end", label);
            self.text(
                area.x + len + 6.0,
                ty + row_h * 0.5 + 4.0,
                10.0,
                "start",
                text,
            );
        }
    }

    /// A heat map: one row per `(name, values)`, one cell per bucket, the
    /// darker the higher the value (`max` darkest); zero cells stay blank.
    pub fn heat(&mut self, area: Area, rows: &[(String, Vec<f64>)], max: f64) {
        let count = rows.len().max(1) as f64;
        let row_h = area.h / count;
        for (i, (name, values)) in rows.iter().enumerate() {
            let ty = area.y + row_h * i as f64;
            let cell_w = area.w / values.len().max(1) as f64;
            for (b, v) in values.iter().enumerate() {
                if !(v.is_finite() && *v > 0.0) {
                    continue;
                }
                let share = if max > 0.0 {
                    (v / max).clamp(0.0, 1.0)
                } else {
                    1.0
                };
                let _ = writeln!(
                    self.body,
                    r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#0072B2" fill-opacity="{}"/>"##,
                    n(area.x + cell_w * b as f64),
                    n(ty + row_h * 0.08),
                    n(cell_w),
                    n(row_h * 0.84),
                    n(0.12 + 0.88 * share)
                );
            }
            if row_h >= 7.0 {
                self.text(
                    area.x - 6.0,
                    ty + row_h * 0.5 + 4.0,
                    10.0_f64.min(row_h),
                    "end",
                    name,
                );
            }
        }
    }

    /// A dot at `at` (share of the width) and `v` (on a scale from 0 to
    /// `y_max`), filled or hollow, with `label` above it (if not empty).
    #[allow(clippy::too_many_arguments)]
    pub fn dot(
        &mut self,
        area: Area,
        at: f64,
        v: f64,
        y_max: f64,
        colour: &str,
        filled: bool,
        label: &str,
    ) {
        let x = area.x
            + area.w
                * if at.is_finite() {
                    at.clamp(0.0, 1.0)
                } else {
                    0.0
                };
        let y = y_of(area, v, y_max);
        let fill = if filled { colour } else { "#ffffff" };
        let _ = writeln!(
            self.body,
            r#"<circle cx="{}" cy="{}" r="4.5" fill="{fill}" stroke="{colour}" stroke-width="1.6"/>"#,
            n(x),
            n(y)
        );
        if !label.is_empty() {
            self.text(x, y - 8.0, 9.0, "middle", label);
        }
    }

    /// A small cross at `at` (share of the width) and `v` (0 to `y_max`).
    pub fn cross(&mut self, area: Area, at: f64, v: f64, y_max: f64, colour: &str) {
        let x = area.x
            + area.w
                * if at.is_finite() {
                    at.clamp(0.0, 1.0)
                } else {
                    0.0
                };
        let y = y_of(area, v, y_max);
        let _ = writeln!(
            self.body,
            r#"<path d="M{} {} L{} {} M{} {} L{} {}" stroke="{colour}" stroke-width="1.4"/>"#,
            n(x - 3.5),
            n(y - 3.5),
            n(x + 3.5),
            n(y + 3.5),
            n(x - 3.5),
            n(y + 3.5),
            n(x + 3.5),
            n(y - 3.5)
        );
    }

    /// A legend right of `area`: one coloured square and name per entry.
    pub fn legend(&mut self, area: Area, names: &[String]) {
        for (i, name) in names.iter().enumerate() {
            let ly = area.y + 16.0 * i as f64;
            let _ = writeln!(
                self.body,
                r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/>"#,
                n(area.x + area.w + 20.0),
                n(ly),
                colour(i)
            );
            self.text(area.x + area.w + 36.0, ly + 9.0, 11.0, "start", name);
        }
    }

    /// The finished document.
    pub fn finish(self) -> String {
        let height = self.height + 10.0;
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n{}</svg>\n",
            self.body,
            w = n(self.width),
            h = n(height),
        )
    }
}

/// The y coordinate of `v` on a scale from 0 to `y_max`, inside `area`
/// whatever `v` is.
fn y_of(area: Area, v: f64, y_max: f64) -> f64 {
    let share = v / y_max.max(f64::MIN_POSITIVE);
    let share = if share.is_finite() {
        share.clamp(0.0, 1.0)
    } else if share == f64::INFINITY {
        1.0
    } else {
        0.0
    };
    area.y + area.h - area.h * share
}

fn points(area: Area, values: &[f64], y_max: f64) -> String {
    let count = values.len();
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = if count > 1 {
                area.x + area.w * i as f64 / (count - 1) as f64
            } else {
                area.x
            };
            format!("{},{}", n(x), n(y_of(area, *v, y_max)))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `points` of values given last bucket first (the lower edge of a band).
fn points_rev(area: Area, reversed: &[f64], y_max: f64) -> String {
    let count = reversed.len();
    reversed
        .iter()
        .enumerate()
        .map(|(r, v)| {
            let i = count - 1 - r;
            let x = if count > 1 {
                area.x + area.w * i as f64 / (count - 1) as f64
            } else {
                area.x
            };
            format!("{},{}", n(x), n(y_of(area, *v, y_max)))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tick value in few characters: 1200 → "1.2k".
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_devices_is_escaped() {
        assert_eq!(escape("a<b>&\"c'\u{1}"), "a&lt;b&gt;&amp;&quot;c&apos; ");
        let mut svg = Svg::new(400.0);
        svg.text(1.0, 2.0, 10.0, "start", "<script>");
        let doc = svg.finish();
        assert!(doc.contains("&lt;script&gt;") && !doc.contains("<script>"));
    }

    #[test]
    fn points_stay_inside_the_area_whatever_the_values() {
        let area = Area {
            x: 10.0,
            y: 10.0,
            w: 100.0,
            h: 50.0,
        };
        let p = points(area, &[f64::NAN, -5.0, 1e12, 25.0], 50.0);
        for pair in p.split(' ') {
            let (x, y) = pair.split_once(',').expect("x,y");
            let (x, y): (f64, f64) = (x.parse().expect("x"), y.parse().expect("y"));
            assert!(
                (10.0..=110.0).contains(&x) && (10.0..=60.0).contains(&y),
                "{pair}"
            );
        }
        assert_eq!(short(1234.0), "1.2k");
        assert_eq!(short(0.5), "0.50");
    }
}
