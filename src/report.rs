//! Building blocks of reports: loss curves (SVG, drawn with plotters), sample grids,
//! images and markdown tables for one self-contained HTML page (the demo's page is
//! assembled in `demo`).

use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;

/// A named series of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// Series of (step, value) for each loss key found in a metrics.jsonl.
pub fn read_series(metrics: &Path, keys: &[&str]) -> Result<Vec<Series>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut out: Vec<Series> = keys.iter().map(|k| (k.to_string(), Vec::new())).collect();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: bad line", metrics.display()))?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        for (k, series) in out.iter_mut() {
            if let Some(x) = v.get(k.as_str()).and_then(|x| x.as_f64()) {
                if x.is_finite() {
                    series.push((step, x));
                }
            }
        }
    }
    out.retain(|(_, s)| !s.is_empty());
    Ok(out)
}

/// Moving average over `w` points (for readable noisy curves).
fn smooth(s: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    if w <= 1 || s.len() < w {
        return s.to_vec();
    }
    s.windows(w)
        .map(|win| {
            (
                win[w - 1].0,
                win.iter().map(|p| p.1).sum::<f64>() / w as f64,
            )
        })
        .collect()
}

/// An SVG line plot of several series.
pub fn line_plot_svg(title: &str, series: &[Series]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 300)).into_drawing_area();
        root.fill(&WHITE)?;
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (_, s) in series {
            for &(x, y) in s {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if (y1 - y0).abs() < 1e-12 {
            y1 = y0 + 1.0;
        }
        let pad = 0.05 * (y1 - y0);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(48)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .x_desc("iteration")
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (i, (name, s)) in series.iter().enumerate() {
            let c = colors[i % colors.len()];
            let w = (s.len() / 30).max(1);
            chart
                .draw_series(LineSeries::new(smooth(s, w), c.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

pub fn png_data_uri(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("data:image/png;base64,{}", base64(&bytes)))
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        for (i, shift) in [18, 12, 6, 0].iter().enumerate() {
            if i <= c.len() {
                s.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A grid PNG: one row per folder, the first `cols` images of each (sorted by name),
/// upscaled by `scale` with nearest-neighbour sampling.
pub fn rows_grid(rows: &[&Path], cols: usize, scale: u32, out: &Path) -> Result<()> {
    let mut imgs: Vec<Vec<image::RgbImage>> = Vec::new();
    for dir in rows {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("png"))
            .collect();
        files.sort();
        let mut row = Vec::new();
        for f in files.iter().take(cols) {
            let im = image::open(f).with_context(|| format!("reading {}", f.display()))?;
            let im = im.to_rgb8();
            row.push(image::imageops::resize(
                &im,
                im.width() * scale,
                im.height() * scale,
                image::imageops::FilterType::Nearest,
            ));
        }
        imgs.push(row);
    }
    let (w, h) = imgs
        .iter()
        .flatten()
        .next()
        .map(|i| i.dimensions())
        .unwrap_or((1, 1));
    let g = 4;
    let mut grid = image::RgbImage::from_pixel(
        cols as u32 * (w + g) + g,
        rows.len() as u32 * (h + g) + g,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in imgs.iter().enumerate() {
        for (c, im) in row.iter().enumerate() {
            image::imageops::replace(
                &mut grid,
                im,
                (g + c as u32 * (w + g)) as i64,
                (g + r as u32 * (h + g)) as i64,
            );
        }
    }
    grid.save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

pub fn md_table_to_html(md: &str) -> String {
    let mut html = String::new();
    let mut in_table = false;
    for line in md.lines() {
        if line.starts_with('|') {
            if line.contains("---") {
                continue;
            }
            if !in_table {
                html += "<table>";
                in_table = true;
            }
            html += "<tr>";
            for cell in line.trim_matches('|').split('|') {
                html += &format!("<td>{}</td>", cell.trim());
            }
            html += "</tr>";
        } else {
            if in_table {
                html += "</table>";
                in_table = false;
            }
            if !line.trim().is_empty() {
                html += &format!("<p>{}</p>", line.trim());
            }
        }
    }
    if in_table {
        html += "</table>";
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn plots_and_series() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        std::fs::write(
            &p,
            "{\"step\":0,\"loss_d\":2.0}\n{\"step\":1,\"loss_d\":1.5,\"loss_diff\":0.3}\n",
        )
        .unwrap();
        let s = read_series(&p, &["loss_d", "loss_diff", "absent"]).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].1, vec![(0.0, 2.0), (1.0, 1.5)]);
        let svg = line_plot_svg("t", &s).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("loss_d"),
            "{}",
            &svg[..100.min(svg.len())]
        );
    }
}
