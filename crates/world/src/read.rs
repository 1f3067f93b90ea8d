//! Reading attributes back off an image, rendered or generated: the background from the border,
//! objects as connected components of pixels far from the background.
//!
//! The background is painted with its colour and that colour's [`Color::tone`], so every
//! background pixel — solid, striped, checkered, gradient, anti-aliased or not — lies on the RGB
//! segment between the two. A pixel is *foreground* when it is more than [`FOREGROUND_DISTANCE`]
//! from that segment (no colour lies within 60 of another colour's segment). Objects are the
//! 4-connected components of foreground pixels; components under [`MIN_BLOB_AREA`] pixels (at
//! 64 px, scaled with the image area) are ignored. Colours are matched to the nearest palette
//! colour in RGB.
//!
//! Touching or overlapping objects merge into one blob.

use image::RgbImage;
use serde::Serialize;

use crate::scene::{rgb_distance, BackgroundKind, Color, Position, Size, WORLD};

/// RGB distance from the background segment above which a pixel belongs to an object.
pub const FOREGROUND_DISTANCE: f32 = 40.0;

/// Smallest blob kept, in pixels at 64 × 64 (scaled with the image area).
pub const MIN_BLOB_AREA: f32 = 12.0;

/// A pixel counts towards a colour when it is within this distance of it.
const COLOR_MATCH: f32 = 45.0;

/// Distance from `p` to the RGB segment between `a` and `b`.
pub fn distance_to_segment(p: [u8; 3], a: [u8; 3], b: [u8; 3]) -> f32 {
    let f = |c: [u8; 3]| c.map(|v| v as f32);
    let (p, a, b) = (f(p), f(a), f(b));
    let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    let ap = [p[0] - a[0], p[1] - a[1], p[2] - a[2]];
    let len2 = ab.iter().map(|v| v * v).sum::<f32>();
    let t = if len2 > 0.0 {
        ((ab[0] * ap[0] + ab[1] * ap[1] + ab[2] * ap[2]) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    (0..3)
        .map(|k| (ap[k] - t * ab[k]).powi(2))
        .sum::<f32>()
        .sqrt()
}

/// An object found in an image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Blob {
    /// Centre of mass in world units (0..64 whatever the image size).
    pub centroid: (f32, f32),
    /// The grid cell of the centroid.
    pub position: Position,
    /// Pixel count, in pixels of the image.
    pub area: usize,
    /// Bounding box in pixels: x0, y0, x1, y1 (inclusive).
    pub bbox: [u32; 4],
    /// Estimated radius in world units and the size class nearest to it.
    pub radius: f32,
    pub size: Size,
    /// The most common palette colour among the blob's pixels.
    pub color: Color,
    /// Share of the blob's pixels near each palette colour, most common first (pixels near no
    /// colour, e.g. anti-aliased edges, count towards none).
    pub colors: Vec<(Color, f32)>,
}

/// Guesses the background's kind and colour from the image border (the outermost two pixel
/// rings). The colour is the base colour most border pixels are close to; the kind comes from
/// how often the border alternates between the colour and its tone along each side, and from
/// whether the top and bottom rows differ (gradient).
pub fn read_background(img: &RgbImage) -> (BackgroundKind, Color) {
    let (w, h) = img.dimensions();
    let px = |x: u32, y: u32| img.get_pixel(x, y).0;
    let ring = 2.min(w).min(h);
    let mut border = Vec::new();
    for d in 0..ring {
        for x in 0..w {
            border.push(px(x, d));
            border.push(px(x, h - 1 - d));
        }
        for y in ring..h.saturating_sub(ring) {
            border.push(px(d, y));
            border.push(px(w - 1 - d, y));
        }
    }
    let color = dominant_color(&border, Color::BASE);

    // Transitions between "colour" and "tone" along each side.
    let (a, b) = (color.rgb(), color.tone());
    let mid = rgb_distance(a, b) / 2.0;
    let transitions = |line: Vec<[u8; 3]>| -> usize {
        let labels: Vec<bool> = line.iter().map(|p| rgb_distance(*p, a) > mid).collect();
        labels.windows(2).filter(|p| p[0] != p[1]).count()
    };
    let top = transitions((0..w).map(|x| px(x, 0)).collect());
    let bottom = transitions((0..w).map(|x| px(x, h - 1)).collect());
    let left = transitions((0..h).map(|y| px(0, y)).collect());
    let right = transitions((0..h).map(|y| px(w - 1, y)).collect());
    let horizontal = top.min(bottom);
    let vertical = left.min(right);
    let kind = if horizontal >= 5 && vertical >= 5 {
        BackgroundKind::Checker
    } else if horizontal >= 5 {
        BackgroundKind::Stripes
    } else {
        let median = |y: u32| {
            let mut row: Vec<[u8; 3]> = (0..w).map(|x| px(x, y)).collect();
            let mut m = [0u8; 3];
            for (k, v) in m.iter_mut().enumerate() {
                row.sort_by_key(|p| p[k]);
                *v = row[row.len() / 2][k];
            }
            m
        };
        let change = rgb_distance(median(0), median(h - 1));
        if change > 0.5 * rgb_distance(a, b) && change > 30.0 {
            BackgroundKind::Gradient
        } else {
            BackgroundKind::Solid
        }
    };
    (kind, color)
}

/// The colour among `candidates` that most `pixels` are within reach of; when none is near
/// any, the colour nearest to their mean.
fn dominant_color(pixels: &[[u8; 3]], candidates: &[Color]) -> Color {
    let hist = color_histogram(pixels, candidates);
    if let Some((c, _)) = hist.first() {
        return *c;
    }
    let n = pixels.len().max(1) as f32;
    let mean =
        [0, 1, 2].map(|k| (pixels.iter().map(|p| p[k] as f32).sum::<f32>() / n).round() as u8);
    Color::nearest(mean, candidates).0
}

/// Share of `pixels` within [`COLOR_MATCH`] of each candidate, largest first, zero shares left out.
fn color_histogram(pixels: &[[u8; 3]], candidates: &[Color]) -> Vec<(Color, f32)> {
    let mut counts = vec![0usize; candidates.len()];
    for p in pixels {
        let (c, d) = Color::nearest(*p, candidates);
        if d <= COLOR_MATCH {
            counts[candidates.iter().position(|x| *x == c).unwrap()] += 1;
        }
    }
    let n = pixels.len().max(1) as f32;
    let mut hist: Vec<(Color, f32)> = candidates
        .iter()
        .zip(counts)
        .filter(|(_, k)| *k > 0)
        .map(|(c, k)| (*c, k as f32 / n))
        .collect();
    hist.sort_by(|x, y| y.1.total_cmp(&x.1));
    hist
}

/// Finds the objects of `img` drawn on a background of colour `background` (usually the colour
/// [`read_background`] found), largest first.
pub fn read_objects(img: &RgbImage, background: Color) -> Vec<Blob> {
    let (w, h) = img.dimensions();
    let (a, b) = (background.rgb(), background.tone());
    let fg: Vec<bool> = img
        .pixels()
        .map(|p| distance_to_segment(p.0, a, b) > FOREGROUND_DISTANCE)
        .collect();
    let world_per_px = WORLD / w.max(h) as f32;
    let min_area = (MIN_BLOB_AREA / (world_per_px * world_per_px)).round() as usize;

    let mut seen = vec![false; fg.len()];
    let mut blobs = Vec::new();
    let mut stack = Vec::new();
    for start in 0..fg.len() {
        if !fg[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut members = Vec::new();
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = ((i as u32 % w), (i as u32 / w));
            let mut visit = |j: usize| {
                if fg[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w as usize);
            }
            if y + 1 < h {
                visit(i + w as usize);
            }
        }
        if members.len() >= min_area.max(1) {
            blobs.push(blob(img, &members, world_per_px));
        }
    }
    blobs.sort_by_key(|b| std::cmp::Reverse(b.area));
    blobs
}

fn blob(img: &RgbImage, members: &[usize], world_per_px: f32) -> Blob {
    let (w, h) = img.dimensions();
    let (mut sx, mut sy) = (0f64, 0f64);
    let mut bbox = [u32::MAX, u32::MAX, 0, 0];
    let mut pixels = Vec::with_capacity(members.len());
    for &i in members {
        let (x, y) = (i as u32 % w, i as u32 / w);
        sx += x as f64 + 0.5;
        sy += y as f64 + 0.5;
        bbox = [
            bbox[0].min(x),
            bbox[1].min(y),
            bbox[2].max(x),
            bbox[3].max(y),
        ];
        pixels.push(img.get_pixel(x, y).0);
    }
    let n = members.len() as f64;
    let centroid = (
        (sx / n) as f32 * world_per_px,
        (sy / n) as f32 * world_per_px,
    );

    // Radius: half the bounding box where the blob is whole, half its unclipped side where the
    // border clips one axis, from the area where it clips both (shapes cover about 2.2 r²).
    let clipped_x = bbox[0] == 0 || bbox[2] + 1 == w;
    let clipped_y = bbox[1] == 0 || bbox[3] + 1 == h;
    let (bw, bh) = (
        (bbox[2] - bbox[0] + 1) as f32,
        (bbox[3] - bbox[1] + 1) as f32,
    );
    let radius = world_per_px
        * match (clipped_x, clipped_y) {
            (false, false) => bw.max(bh) / 2.0,
            (true, false) => bh / 2.0,
            (false, true) => bw / 2.0,
            (true, true) => (members.len() as f32 / 2.2).sqrt(),
        };
    let size = if radius < 9.2 {
        Size::Small
    } else if radius < 13.5 {
        Size::Medium
    } else {
        Size::Big
    };
    let colors = color_histogram(&pixels, Color::ALL);
    let color = dominant_color(&pixels, Color::ALL);
    Blob {
        centroid,
        position: Position::of_point(centroid.0, centroid.1),
        area: members.len(),
        bbox,
        radius,
        size,
        color,
        colors,
    }
}

/// Everything read off one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    pub background_kind: BackgroundKind,
    pub background_color: Color,
    /// Largest first.
    pub objects: Vec<Blob>,
}

/// [`read_background`] then [`read_objects`].
pub fn read(img: &RgbImage) -> Reading {
    let (background_kind, background_color) = read_background(img);
    Reading {
        background_kind,
        background_color,
        objects: read_objects(img, background_color),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::{sample_scene_requested, seeded_rng};

    #[test]
    fn reads_single_object_scenes_back() {
        let mut rng = seeded_rng(77, 0);
        let (mut n, mut pos, mut bg, mut kind, mut color, mut size, mut count) =
            (0, 0, 0, 0, 0, 0, 0);
        while n < 200 {
            let (scene, _) = sample_scene_requested(&mut rng);
            if scene.objects.len() != 1 {
                continue;
            }
            n += 1;
            let o = scene.objects[0];
            let r = read(&scene.render(64));
            bg += (r.background_color == scene.background.color) as usize;
            kind += (r.background_kind == scene.background.kind) as usize;
            count += (r.objects.len() == 1) as usize;
            if let Some(blob) = r.objects.first() {
                pos += (blob.position == o.position) as usize;
                color += (blob.color == o.color) as usize;
                size += (blob.size == o.size) as usize;
            }
        }
        eprintln!("of {n}: position {pos}, bg colour {bg}, bg kind {kind}, one blob {count}, colour {color}, size {size}");
        assert!(pos >= 190, "position {pos}/200");
        assert!(bg >= 190, "background colour {bg}/200");
        assert!(kind >= 180, "background kind {kind}/200");
        assert!(color >= 170, "object colour {color}/200");
        assert!(size >= 175, "size {size}/200");
        assert!(count >= 180, "blob count {count}/200");
    }

    #[test]
    fn reads_at_other_sizes() {
        let mut rng = seeded_rng(78, 0);
        let mut ok = 0;
        for _ in 0..40 {
            let (mut scene, _) = sample_scene_requested(&mut rng);
            scene.objects.truncate(1);
            let r = read(&scene.render(128));
            let o = scene.objects[0];
            ok += (r.background_color == scene.background.color
                && r.objects.first().is_some_and(|b| b.position == o.position))
                as usize;
        }
        assert!(ok >= 36, "{ok}/40");
    }

    #[test]
    fn tiny_specks_are_ignored() {
        let scene = crate::Scene {
            background: crate::Background {
                kind: BackgroundKind::Solid,
                color: Color::White,
            },
            objects: vec![],
        };
        let mut img = scene.render(64);
        img.put_pixel(10, 10, image::Rgb([0, 0, 0]));
        img.put_pixel(11, 10, image::Rgb([0, 0, 0]));
        assert!(read_objects(&img, Color::White).is_empty());
    }
}
