//! A run's timeline: one lane per stage (start, protect, read, decrypt,
//! compute), one bar per layer where the stage works layer by layer, drawn
//! as an SVG (`timeline_svg`) so that the overlap of the stages can be seen.

use std::path::Path;

use anyhow::Result;

use crate::timeline_svg::Chart;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Start,
    Protect,
    Read,
    Decrypt,
    Compute,
}

/// The lanes in the order drawn, indexed by `Lane as usize`.
static LANES: [(&str, &str); 5] =
    [("start", "#888888"), ("protect", "#b5651d"), ("read", "#2e7d32"), ("decrypt", "#6a1b9a"), ("compute", "#1565c0")];

/// What a bar is labelled: its layer, or (the embeddings and output, a
/// grant) its lane's name.
fn label(lane: Lane, layer: Option<usize>) -> String {
    layer.map_or_else(|| LANES[lane as usize].0.to_string(), |l| format!("layer {l}"))
}

#[derive(Debug)]
pub struct Timeline {
    chart: Chart,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline { chart: Chart::new(&LANES) }
    }
}

impl Timeline {
    pub fn bar(&mut self, lane: Lane, layer: Option<usize>, from: f64, to: f64) {
        // Odd layers lighter, so that neighbours can be told apart.
        let light = layer.is_some_and(|l| l % 2 == 1);
        self.chart.bar(lane as usize, label(lane, layer), light, from, to);
    }

    /// Widens the lane's bar of `layer` to cover `from .. to` (a new bar if it has none).
    pub fn extend(&mut self, lane: Lane, layer: Option<usize>, from: f64, to: f64) {
        let name = label(lane, layer);
        match self.chart.bars.iter_mut().find(|b| b.lane == lane as usize && b.label == name) {
            Some(b) => {
                b.from = b.from.min(from);
                b.to = b.to.max(to);
            }
            None => self.bar(lane, layer, from, to),
        }
    }

    /// Writes the timeline as an SVG, the first token marked.
    pub fn write_svg(&self, path: &Path, title: &str, first_token_ms: f64) -> Result<()> {
        let mut chart = self.chart.clone();
        chart.mark(first_token_ms, "first token");
        chart.write_svg(path, title)
    }
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
        let bars = &t.chart.bars;
        let read3: Vec<_> = bars.iter().filter(|b| b.lane == Lane::Read as usize && b.label == "layer 3").collect();
        assert_eq!(read3.len(), 1);
        assert_eq!((read3[0].from, read3[0].to), (5.0, 20.0));
        assert_eq!(bars.len(), 3);
    }
}
