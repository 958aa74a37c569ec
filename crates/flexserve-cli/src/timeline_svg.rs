//! A timeline drawn as an SVG: named lanes, one bar per interval (with a
//! label shown on hover), marks at points in time, and a time axis in ms.
//! The benchmarks draw their runs with it (`bench ttft`, `bench workflow`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// One interval of a lane, in ms since the clock started.
#[derive(Debug, Clone)]
pub struct Bar {
    pub lane: usize,
    pub label: String,
    /// Drawn lighter, so that neighbours in a lane can be told apart.
    pub light: bool,
    pub from: f64,
    pub to: f64,
}

/// Lanes (name, colour) and what happened in them.
#[derive(Debug, Clone)]
pub struct Chart {
    lanes: &'static [(&'static str, &'static str)],
    pub bars: Vec<Bar>,
    marks: Vec<(f64, String)>,
}

impl Chart {
    pub fn new(lanes: &'static [(&'static str, &'static str)]) -> Chart {
        Chart { lanes, bars: Vec::new(), marks: Vec::new() }
    }

    pub fn bar(&mut self, lane: usize, label: impl Into<String>, light: bool, from: f64, to: f64) {
        self.bars.push(Bar { lane, label: label.into(), light, from, to: to.max(from) });
    }

    /// A vertical line at `at` ms, labelled.
    pub fn mark(&mut self, at: f64, text: impl Into<String>) {
        self.marks.push((at, text.into()));
    }

    /// Writes the chart as an SVG (through a temporary file, renamed).
    pub fn write_svg(&self, path: &Path, title: &str) -> Result<()> {
        let svg = self.svg(title);
        let tmp = path.with_extension("svg.tmp");
        std::fs::write(&tmp, svg).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    pub fn svg(&self, title: &str) -> String {
        const WIDTH: f64 = 1000.0;
        const LEFT: f64 = 110.0;
        const LANE_H: f64 = 28.0;
        const TOP: f64 = 40.0;
        let end = self.bars.iter().map(|b| b.to).chain(self.marks.iter().map(|m| m.0)).fold(1.0, f64::max);
        let scale = (WIDTH - LEFT - 20.0) / end;
        let x = |t: f64| LEFT + t * scale;
        let height = TOP + self.lanes.len() as f64 * LANE_H + 40.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<text x="10" y="20" font-size="14">{}</text>"#, escape(title));
        for (i, (name, colour)) in self.lanes.iter().enumerate() {
            let y = TOP + i as f64 * LANE_H;
            let _ = writeln!(s, r#"<text x="10" y="{:.1}">{}</text>"#, y + LANE_H * 0.65, escape(name));
            for b in self.bars.iter().filter(|b| b.lane == i) {
                let opacity = if b.light { 0.6 } else { 0.9 };
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.2}" y="{:.1}" width="{:.2}" height="{:.1}" fill="{colour}" fill-opacity="{opacity}"><title>{}: {:.1} - {:.1} ms</title></rect>"#,
                    x(b.from),
                    y + 4.0,
                    ((b.to - b.from) * scale).max(0.5),
                    LANE_H - 8.0,
                    escape(&b.label),
                    b.from,
                    b.to
                );
            }
        }
        let axis_y = TOP + self.lanes.len() as f64 * LANE_H + 5.0;
        for (at, text) in &self.marks {
            let _ = writeln!(
                s,
                r#"<line x1="{0:.2}" y1="{TOP}" x2="{0:.2}" y2="{axis_y}" stroke="red"/><text x="{0:.2}" y="{1:.1}" fill="red">{2}</text>"#,
                x(*at),
                TOP - 4.0,
                escape(text)
            );
        }
        let step = tick_step(end);
        let mut t = 0.0;
        while t <= end {
            let _ = writeln!(
                s,
                r#"<line x1="{0:.2}" y1="{axis_y}" x2="{0:.2}" y2="{1}" stroke="black"/><text x="{0:.2}" y="{2}" text-anchor="middle">{t:.0} ms</text>"#,
                x(t),
                axis_y + 5.0,
                axis_y + 20.0
            );
            t += step;
        }
        s.push_str("</svg>\n");
        s
    }
}

/// A round step between axis ticks: about ten ticks over `end` ms.
fn tick_step(end: f64) -> f64 {
    let raw = end / 10.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|&s| s >= raw).unwrap_or(raw)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_svg_has_a_bar_per_interval_its_labels_and_the_marks() {
        static LANES: [(&str, &str); 2] = [("one", "#000"), ("two <b>", "#fff")];
        let mut c = Chart::new(&LANES);
        c.bar(0, "layer 0", false, 10.0, 20.0);
        c.bar(0, "layer 1", true, 20.0, 30.0);
        c.bar(1, "x", false, 0.0, 8.0);
        c.mark(31.0, "first token");
        let svg = c.svg("a <title>");
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains("layer 1: 20.0 - 30.0 ms"));
        assert!(svg.contains("first token"));
        assert!(svg.contains("a &lt;title&gt;") && svg.contains("two &lt;b&gt;"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(1000.0), 100.0);
        assert_eq!(tick_step(230.0), 50.0);
        assert_eq!(tick_step(9.0), 1.0);
    }
}
