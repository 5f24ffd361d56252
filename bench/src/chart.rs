//! PNG charts with `plotters` (bitmap backend). Text is drawn with `ab_glyph` from the
//! Hack font that the `epaint_default_fonts` crate ships, so building needs no system
//! fonts, fontconfig or freetype: only Rust.
//!
//! - [`timeseries`]: throughput (top) and p99 latency (bottom) per second, one line per
//!   run, with vertical marks at events (splits, moves, store joins).
//! - [`cdf`]: the latency distribution by percentile, HDR style: the x axis is in
//!   "nines" (90%, 99%, 99.9%, ...), the y axis is latency on a log scale.

use crate::demo::Event;
use crate::stats::Sample;
use anyhow::{Result, anyhow};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1200, 800);

fn font_ready() -> Result<()> {
    static READY: OnceLock<bool> = OnceLock::new();
    let ok = *READY.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::HACK_REGULAR).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the chart font could not be loaded"))
    }
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

/// A stable colour per system name, so that skv is always the same colour.
pub fn color_for(name: &str, i: usize) -> RGBColor {
    match name {
        "skv" => RGBColor(31, 119, 180),
        "etcd" => RGBColor(214, 39, 40),
        "redis" => RGBColor(44, 160, 44),
        _ => {
            let c = Palette99::pick(i + 3).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

/// One line on a chart: its legend and colour key, and its points.
pub struct Line<'a, T> {
    pub name: &'a str,
    pub points: &'a [T],
}

/// Throughput and p99 over time.
pub fn timeseries(path: &Path, title: &str, lines: &[Line<'_, Sample>], events: &[Event]) -> Result<()> {
    font_ready()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let root = root.titled(title, (FONT, 26)).map_err(draw_err)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2 - 20);
    let t_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|s| s.t))
        .fold(1.0f64, f64::max);
    let ops_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|s| s.ops_per_sec))
        .fold(1.0f64, f64::max)
        * 1.15;
    let p99_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|s| s.p99_us as f64 / 1000.0))
        .fold(0.1f64, f64::max)
        * 1.15;

    type Pick = fn(&Sample) -> f64;
    let ops: Pick = |s| s.ops_per_sec;
    let p99: Pick = |s| s.p99_us as f64 / 1000.0;
    for (area, y_desc, y_max, pick, decimals) in [
        (&top, "ops/s", ops_max, ops, 0usize),
        (&bottom, "p99 latency (ms)", p99_max, p99, 2),
    ] {
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(y_desc)
            .y_label_formatter(&|v| format!("{v:.decimals$}"))
            .label_style((FONT, 14))
            .draw()
            .map_err(draw_err)?;
        for (i, l) in lines.iter().enumerate() {
            let color = color_for(l.name, i);
            chart
                .draw_series(LineSeries::new(
                    l.points.iter().map(|s| (s.t, pick(s))),
                    color.stroke_width(2),
                ))
                .map_err(draw_err)?
                .label(l.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        }
        let mark = RGBColor(120, 120, 120);
        for e in events {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(e.t, 0.0), (e.t, y_max)],
                    mark.stroke_width(1),
                )))
                .map_err(draw_err)?;
            if std::ptr::eq(area, &top) {
                chart
                    .draw_series(std::iter::once(Text::new(
                        e.kind.clone(),
                        (e.t, y_max * 0.97),
                        (FONT, 13).into_font().color(&mark),
                    )))
                    .map_err(draw_err)?;
            }
        }
        if !lines.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font((FONT, 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(draw_err)?;
        }
    }
    root.present().map_err(draw_err)
}

/// Where a quantile goes on the "nines" axis: -log10(1 - q), capped at 5 (99.999%).
pub fn nines(q: f64) -> f64 {
    if q >= 0.99999 { 5.0 } else { -(1.0 - q).log10() }
}

/// The label of a point on the "nines" axis.
pub fn nines_label(x: f64) -> String {
    let q = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x.round() as i64 - 2).clamp(0, 4) as usize;
    format!("{q:.digits$}%")
}

/// Tick marks at 1, 2, 5 × 10^k between `lo` and `hi`.
pub fn one_two_five(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    if !(lo > 0.0 && hi > lo) {
        return out;
    }
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

/// Latency by percentile, one line per run or per operation kind.
pub fn cdf(path: &Path, title: &str, lines: &[Line<'_, (u64, f64)>]) -> Result<()> {
    font_ready()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let lat = |us: u64| (us.max(1) as f64) / 1000.0;
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let y_min = all().map(|p| lat(p.0)).fold(f64::INFINITY, f64::min);
    let y_max = all().map(|p| lat(p.0)).fold(0.0f64, f64::max);
    let (y_min, y_max) = if y_min.is_finite() && y_max > 0.0 {
        (y_min * 0.8, y_max * 1.25)
    } else {
        (0.01, 10.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 26))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(
            0f64..5.2,
            (y_min..y_max).log_scale().with_key_points(one_two_five(y_min, y_max)),
        )
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms, log scale)")
        .x_labels(6)
        .x_label_formatter(&|x| nines_label(*x))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .label_style((FONT, 14))
        .draw()
        .map_err(draw_err)?;
    for (i, l) in lines.iter().enumerate() {
        let color = color_for(l.name, i);
        chart
            .draw_series(LineSeries::new(
                l.points.iter().map(|&(us, q)| (nines(q), lat(us))),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label(l.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    if !lines.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
    }
    root.present().map_err(draw_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::tests::sample_result;

    fn is_png(path: &Path) -> bool {
        std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 5_000)
    }

    #[test]
    fn nines_axis() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(0.99) - 2.0).abs() < 1e-9);
        assert_eq!(nines(1.0), 5.0);
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(5.0), "99.999%");
        let ticks = one_two_five(0.03, 4.0);
        let want = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0];
        assert_eq!(ticks.len(), want.len(), "{ticks:?}");
        assert!(ticks.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{ticks:?}");
        assert!(one_two_five(0.0, 1.0).is_empty());
    }

    #[test]
    fn draws_timeseries_with_events_and_cdf() {
        let dir = tempfile::tempdir().unwrap();
        let a = sample_result("a", "skv", 1000.0, 2000);
        let b = sample_result("a", "etcd", 800.0, 3000);
        let events = vec![Event {
            t: 2.0,
            kind: "split".into(),
            detail: "ranges 1 -> 2".into(),
        }];
        let ts = dir.path().join("ts.png");
        timeseries(
            &ts,
            "throughput and p99",
            &[
                Line {
                    name: "skv",
                    points: &a.series,
                },
                Line {
                    name: "etcd",
                    points: &b.series,
                },
            ],
            &events,
        )
        .unwrap();
        assert!(is_png(&ts));
        let c = dir.path().join("cdf.png");
        cdf(
            &c,
            "latency",
            &[Line {
                name: "skv",
                points: &a.cdf["all"],
            }],
        )
        .unwrap();
        assert!(is_png(&c));
        // Nothing to draw still gives a chart (axes only), not an error.
        let empty = dir.path().join("empty.png");
        cdf(&empty, "none", &[]).unwrap();
        timeseries(&dir.path().join("e2.png"), "none", &[], &[]).unwrap();
        assert!(is_png(&empty));
    }
}
