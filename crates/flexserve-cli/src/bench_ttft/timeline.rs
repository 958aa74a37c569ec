//! A run's timeline: one lane per stage (start, protect, read, decrypt,
//! compute), one bar per layer where the stage works layer by layer, drawn
//! as an SVG so that the overlap of the stages can be seen.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Start,
    Protect,
    Read,
    Decrypt,
    Compute,
}

const LANES: [(Lane, &str, &str); 5] = [
    (Lane::Start, "start", "#888888"),
    (Lane::Protect, "protect", "#b5651d"),
    (Lane::Read, "read", "#2e7d32"),
    (Lane::Decrypt, "decrypt", "#6a1b9a"),
    (Lane::Compute, "compute", "#1565c0"),
];

/// One interval of a stage, in milliseconds since the clock started; `layer`
/// is `None` for what is not a layer's (the embeddings and output, a grant).
#[derive(Debug, Clone, Copy)]
struct Bar {
    lane: Lane,
    layer: Option<usize>,
    from: f64,
    to: f64,
}

#[derive(Debug, Default)]
pub struct Timeline {
    bars: Vec<Bar>,
}

impl Timeline {
    pub fn bar(&mut self, lane: Lane, layer: Option<usize>, from: f64, to: f64) {
        self.bars.push(Bar { lane, layer, from, to: to.max(from) });
    }

    /// Widens the lane's bar of `layer` to cover `from .. to` (a new bar if it has none).
    pub fn extend(&mut self, lane: Lane, layer: Option<usize>, from: f64, to: f64) {
        match self.bars.iter_mut().find(|b| b.lane == lane && b.layer == layer) {
            Some(b) => {
                b.from = b.from.min(from);
                b.to = b.to.max(to);
            }
            None => self.bar(lane, layer, from, to),
        }
    }

    /// Writes the timeline as an SVG (through a temporary file, renamed).
    pub fn write_svg(&self, path: &Path, title: &str, first_token_ms: f64) -> Result<()> {
        let svg = self.svg(title, first_token_ms);
        let tmp = path.with_extension("svg.tmp");
        std::fs::write(&tmp, svg).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    fn svg(&self, title: &str, first_token_ms: f64) -> String {
        const WIDTH: f64 = 1000.0;
        const LEFT: f64 = 80.0;
        const LANE_H: f64 = 28.0;
        const TOP: f64 = 40.0;
        let end = self.bars.iter().map(|b| b.to).fold(first_token_ms, f64::max).max(1.0);
        let scale = (WIDTH - LEFT - 20.0) / end;
        let x = |t: f64| LEFT + t * scale;
        let height = TOP + LANES.len() as f64 * LANE_H + 40.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<text x="10" y="20" font-size="14">{}</text>"#, escape(title));
        for (i, (lane, name, colour)) in LANES.iter().enumerate() {
            let y = TOP + i as f64 * LANE_H;
            let _ = writeln!(s, r#"<text x="10" y="{:.1}">{name}</text>"#, y + LANE_H * 0.65);
            for b in self.bars.iter().filter(|b| b.lane == *lane) {
                // Layers alternate in shade so that neighbours can be told apart.
                let opacity = match b.layer {
                    Some(l) if l % 2 == 1 => 0.6,
                    _ => 0.9,
                };
                let label = b.layer.map_or_else(|| name.to_string(), |l| format!("layer {l}"));
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.2}" y="{:.1}" width="{:.2}" height="{:.1}" fill="{colour}" fill-opacity="{opacity}"><title>{label}: {:.1} - {:.1} ms</title></rect>"#,
                    x(b.from),
                    y + 4.0,
                    ((b.to - b.from) * scale).max(0.5),
                    LANE_H - 8.0,
                    b.from,
                    b.to
                );
            }
        }
        // The first token, and a time axis.
        let axis_y = TOP + LANES.len() as f64 * LANE_H + 5.0;
        let _ = writeln!(
            s,
            r#"<line x1="{0:.2}" y1="{TOP}" x2="{0:.2}" y2="{axis_y}" stroke="red"/><text x="{0:.2}" y="{1:.1}" fill="red">first token</text>"#,
            x(first_token_ms),
            TOP - 4.0
        );
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
    fn extend_widens_one_bar_per_lane_and_layer() {
        let mut t = Timeline::default();
        t.extend(Lane::Read, Some(3), 10.0, 20.0);
        t.extend(Lane::Read, Some(3), 5.0, 15.0);
        t.extend(Lane::Read, Some(4), 30.0, 40.0);
        t.extend(Lane::Decrypt, Some(3), 1.0, 2.0);
        let read3: Vec<_> = t.bars.iter().filter(|b| b.lane == Lane::Read && b.layer == Some(3)).collect();
        assert_eq!(read3.len(), 1);
        assert_eq!((read3[0].from, read3[0].to), (5.0, 20.0));
        assert_eq!(t.bars.len(), 3);
    }

    #[test]
    fn the_svg_has_a_bar_per_interval_and_the_first_token() {
        let mut t = Timeline::default();
        t.bar(Lane::Compute, Some(0), 10.0, 20.0);
        t.bar(Lane::Compute, Some(1), 20.0, 30.0);
        t.bar(Lane::Protect, None, 0.0, 8.0);
        let svg = t.svg("a <title>", 31.0);
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains("layer 1: 20.0 - 30.0 ms"));
        assert!(svg.contains("first token"));
        assert!(svg.contains("a &lt;title&gt;"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(1000.0), 100.0);
        assert_eq!(tick_step(230.0), 50.0);
        assert_eq!(tick_step(9.0), 1.0);
    }
}
