//! Pictures for `spotlight lens`: heatmaps with a labelled colour bar and a line chart, drawn
//! into RGB buffers with a built-in 5x7 bitmap font and written as PNG (the `png` crate).
//!
//! Heatmap layout (documented for users and tests): a plot area of `cols·s × rows·s` pixels,
//! where `s = max(1, 384 / max(rows, cols))` (integer), framed by margins of `LEFT` px on the
//! left, `RIGHT` px on the right (the colour bar), `TOP` px above (the title) and `BOTTOM` px
//! below (the x axis); cell `(r, c)` covers pixels `[LEFT + c·s, LEFT + (c+1)·s)` ×
//! `[TOP + r·s, TOP + (r+1)·s)`. Maps larger than `max_cells` on a side are first reduced by
//! averaging blocks of `ceil(n / max_cells)` cells.

use std::path::Path;

use anyhow::Context;

pub const LEFT: usize = 64;
pub const RIGHT: usize = 96;
pub const TOP: usize = 32;
pub const BOTTOM: usize = 48;

/// An RGB image.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<[u8; 3]>,
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Self {
        Canvas {
            width,
            height,
            pixels: vec![[255, 255, 255]; width * height],
        }
    }

    pub fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.width && y < self.height {
            self.pixels[y * self.width + x] = c;
        }
    }

    pub fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    pub fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for t in 0..=n {
            let f = t as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * f, y0 + (y1 - y0) * f);
            self.set(x.round() as usize, y.round() as usize, c);
            self.set(x.round() as usize, y.round() as usize + 1, c);
        }
    }

    /// Text in the 5x7 font at `scale`, top-left at (x, y). Lower case prints as upper case.
    pub fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, c: [u8; 3]) {
        for (n, ch) in s.chars().enumerate() {
            let g = glyph(ch.to_ascii_uppercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.rect(x + (n * 6 + col) * scale, y + row * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    /// Text rotated a quarter turn (reading upwards), bottom-left at (x, y).
    pub fn text_up(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (n, ch) in s.chars().enumerate() {
            let g = glyph(ch.to_ascii_uppercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.set(x + row, y.saturating_sub(n * 6 + col), c);
                    }
                }
            }
        }
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut png_bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png_bytes, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().context("writing a PNG header")?;
            let data: Vec<u8> = self.pixels.iter().flatten().copied().collect();
            w.write_image_data(&data).context("writing PNG data")?;
        }
        // Whole or not at all: a failed write never leaves a truncated image.
        spotlight_cli::files::write_file_atomic(path, &png_bytes)
    }
}

/// The left edge of a text `width` pixels wide centred on `x`, clamped at 0: a plot narrower
/// than its label (a map of 4096 queries × 8 keys) must not underflow.
fn centred(x: usize, width: usize) -> usize {
    x.saturating_sub(width / 2)
}

/// Width in pixels of `s` in the font at `scale`.
pub fn text_width(s: &str, scale: usize) -> usize {
    s.chars().count() * 6 * scale
}

/// The viridis colour map (a piecewise-linear fit), `t` in [0, 1].
pub fn viridis(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 6] = [
        [68.0, 1.0, 84.0],
        [65.0, 68.0, 135.0],
        [42.0, 120.0, 142.0],
        [34.0, 168.0, 132.0],
        [122.0, 209.0, 81.0],
        [253.0, 231.0, 37.0],
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let mut c = [0u8; 3];
    for k in 0..3 {
        c[k] = (STOPS[i][k] + (STOPS[i + 1][k] - STOPS[i][k]) * f).round() as u8;
    }
    c
}

/// Averages `rows × cols` values into blocks so neither side exceeds `max_cells`; returns the
/// reduced values, their shape and the block size.
pub fn downsample(
    v: &[f32],
    rows: usize,
    cols: usize,
    max_cells: usize,
) -> (Vec<f32>, usize, usize, usize) {
    let f = rows.max(cols).div_ceil(max_cells.max(1)).max(1);
    if f == 1 {
        return (v.to_vec(), rows, cols, 1);
    }
    let (r2, c2) = (rows.div_ceil(f), cols.div_ceil(f));
    let mut out = vec![0.0f32; r2 * c2];
    for r in 0..r2 {
        for c in 0..c2 {
            let (mut s, mut n) = (0.0f64, 0usize);
            for rr in r * f..((r + 1) * f).min(rows) {
                for cc in c * f..((c + 1) * f).min(cols) {
                    s += v[rr * cols + cc] as f64;
                    n += 1;
                }
            }
            out[r * c2 + c] = (s / n.max(1) as f64) as f32;
        }
    }
    (out, r2, c2, f)
}

/// Cell size `s` of a heatmap of `rows × cols` cells.
pub fn cell_size(rows: usize, cols: usize) -> usize {
    (384 / rows.max(cols).max(1)).max(1)
}

/// Draws a heatmap of `rows × cols` values (colour 0 = smallest, 1 = largest value, shown on a
/// colour bar with both labelled), with a title and axis labels.
pub fn heatmap(
    v: &[f32],
    rows: usize,
    cols: usize,
    title: &str,
    x_label: &str,
    y_label: &str,
) -> Canvas {
    let s = cell_size(rows, cols);
    let (w, h) = (cols * s, rows * s);
    let mut cv = Canvas::new(LEFT + w + RIGHT, TOP + h + BOTTOM);
    let finite = v.iter().copied().filter(|x| x.is_finite());
    let lo = finite.clone().fold(f32::INFINITY, f32::min).min(0.0);
    let hi = finite.fold(f32::NEG_INFINITY, f32::max).max(lo + 1e-12);
    for r in 0..rows {
        for c in 0..cols {
            let t = (v[r * cols + c] - lo) as f64 / (hi - lo) as f64;
            cv.rect(LEFT + c * s, TOP + r * s, s, s, viridis(t));
        }
    }
    let black = [0, 0, 0];
    cv.text(LEFT, 10, title, 2, black);
    // Axes: x ticks at 0 and cols, y ticks at 0 and rows.
    cv.text(LEFT, TOP + h + 6, "0", 1, black);
    let xe = format!("{cols}");
    cv.text(
        (LEFT + w).saturating_sub(text_width(&xe, 1)),
        TOP + h + 6,
        &xe,
        1,
        black,
    );
    cv.text(
        centred(LEFT + w / 2, text_width(x_label, 1)),
        TOP + h + 24,
        x_label,
        1,
        black,
    );
    cv.text(LEFT - 14, TOP, "0", 1, black);
    let ye = format!("{rows}");
    cv.text(
        (LEFT - 8).saturating_sub(text_width(&ye, 1)),
        (TOP + h).saturating_sub(7),
        &ye,
        1,
        black,
    );
    cv.text_up(16, TOP + h / 2 + text_width(y_label, 1) / 2, y_label, black);
    // Colour bar.
    let bx = LEFT + w + 16;
    for y in 0..h {
        let t = 1.0 - y as f64 / (h.max(2) - 1) as f64;
        cv.rect(bx, TOP + y, 14, 1, viridis(t));
    }
    cv.text(bx + 18, TOP, &format!("{hi:.3}"), 1, black);
    cv.text(
        bx + 18,
        (TOP + h).saturating_sub(7),
        &format!("{lo:.3}"),
        1,
        black,
    );
    cv
}

/// A line chart of several series over a shared x range [0, 1], with a legend.
pub fn line_chart(
    series: &[(String, Vec<f64>)],
    title: &str,
    x_label: &str,
    y_label: &str,
) -> Canvas {
    let (w, h) = (512usize, 320usize);
    let mut cv = Canvas::new(LEFT + w + RIGHT, TOP + h + BOTTOM);
    let black = [0, 0, 0];
    let grey = [200, 200, 200];
    let hi = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    cv.rect(LEFT, TOP + h, w, 1, black);
    cv.rect(LEFT, TOP, 1, h, black);
    for k in 1..=4 {
        let y = TOP + h - h * k / 4;
        cv.rect(LEFT + 1, y, w - 1, 1, grey);
        cv.text(
            (LEFT - 8).saturating_sub(text_width(&format!("{:.2}", hi * k as f64 / 4.0), 1)),
            y.saturating_sub(3),
            &format!("{:.2}", hi * k as f64 / 4.0),
            1,
            black,
        );
    }
    cv.text(LEFT - 14, TOP + h - 7, "0", 1, black);
    for (n, (name, v)) in series.iter().enumerate() {
        let c = viridis(n as f64 / (series.len().max(2) - 1) as f64);
        let pts: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .map(|(i, &y)| {
                let x = LEFT as f64 + (i as f64 + 0.5) / v.len() as f64 * w as f64;
                (x, (TOP + h) as f64 - y / hi * (h - 1) as f64)
            })
            .collect();
        for p in pts.windows(2) {
            cv.line(p[0].0, p[0].1, p[1].0, p[1].1, c);
        }
        let ly = TOP + n * 10;
        cv.rect(LEFT + w + 12, ly + 2, 10, 3, c);
        cv.text(LEFT + w + 26, ly, name, 1, black);
    }
    cv.text(LEFT, 10, title, 2, black);
    cv.text(LEFT, TOP + h + 6, "START", 1, black);
    cv.text(
        (LEFT + w).saturating_sub(text_width("END", 1)),
        TOP + h + 6,
        "END",
        1,
        black,
    );
    cv.text(
        centred(LEFT + w / 2, text_width(x_label, 1)),
        TOP + h + 24,
        x_label,
        1,
        black,
    );
    cv.text_up(16, TOP + h / 2 + text_width(y_label, 1) / 2, y_label, black);
    cv
}

/// 5x7 glyphs, one byte a row (low 5 bits, MSB left). Unknown characters draw as a box.
fn glyph(c: char) -> [u8; 7] {
    match c {
        ' ' => [0; 7],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every label of a heatmap stays in unsigned range whatever the map's aspect ratio (a
    /// narrow map once underflowed `LEFT + w/2 - text_width/2` and panicked in a debug build).
    #[test]
    fn heatmaps_of_extreme_aspect_ratios_draw_without_panicking() {
        let label = "KEY (MEAN OF 16X16 BLOCKS)";
        for (rows, cols, max_cells) in [
            (4096, 8, 256),
            (8, 4096, 256),
            (4096, 1, 4096),
            (1, 4096, 4096),
            (1, 1, 1),
            (3, 100_000, 1),
        ] {
            let v: Vec<f32> = (0..rows * cols).map(|x| (x % 7) as f32).collect();
            let (d, r, c, _) = downsample(&v, rows, cols, max_cells);
            let cv = heatmap(&d, r, c, "A LONG TITLE FOR A NARROW MAP", label, label);
            assert_eq!(cv.pixels.len(), cv.width * cv.height);
            assert!(cv.width >= LEFT + RIGHT && cv.height >= TOP + BOTTOM);
            // The map's cells are drawn: the top-left cell has the colour of its value's place
            // between the scale's ends (0 and the largest value).
            let hi = d.iter().copied().fold(0.0f32, f32::max).max(1e-12);
            let want = viridis((d[0] / hi) as f64);
            assert_eq!(cv.pixels[TOP * cv.width + LEFT], want, "{rows}x{cols}");
        }
        let flat = vec![(String::from("H0"), vec![0.5; 3])];
        let cv = line_chart(&flat, "T", label, label);
        assert!(cv.width > LEFT + RIGHT);
    }
}
