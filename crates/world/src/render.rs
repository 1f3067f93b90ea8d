//! The rasterizer: a [`Scene`] to an RGB image at any size.
//!
//! Each pixel averages a 4 × 4 grid of point samples (anti-aliased edges). A sample takes the
//! background's colour at that point, then each object in order paints over it where the point
//! falls inside the object's outline, with the colour its pattern gives there. Shapes are tested
//! in the object's unit frame (centre at the origin, radius 1, y down) with polynomial tests and
//! literal constants only — no `sin`/`cos` — so the bytes are identical on every machine.
//!
//! Patterns are laid out in world units relative to the object's centre, with a period that grows
//! with the object's radius; background stripes are 4 world units wide and checker cells 8.

use image::RgbImage;

use crate::scene::{Background, BackgroundKind, Object, Pattern, Scene, Shape, WORLD};

/// Samples per pixel along each axis.
const SUPERSAMPLE: u32 = 4;

/// Renders `scene` at `size` × `size` pixels. Deterministic; later objects cover earlier ones.
pub fn render(scene: &Scene, size: u32) -> RgbImage {
    assert!(size > 0, "render size must be positive");
    let scale = WORLD / size as f32;
    let step = 1.0 / SUPERSAMPLE as f32;
    let n = SUPERSAMPLE * SUPERSAMPLE;
    let mut img = RgbImage::new(size, size);
    for py in 0..size {
        for px in 0..size {
            let mut sum = [0u32; 3];
            for sy in 0..SUPERSAMPLE {
                for sx in 0..SUPERSAMPLE {
                    let x = (px as f32 + (sx as f32 + 0.5) * step) * scale;
                    let y = (py as f32 + (sy as f32 + 0.5) * step) * scale;
                    let c = sample(scene, x, y);
                    for k in 0..3 {
                        sum[k] += c[k] as u32;
                    }
                }
            }
            img.put_pixel(px, py, image::Rgb(sum.map(|s| ((s + n / 2) / n) as u8)));
        }
    }
    img
}

/// The colour of the scene at world point (`x`, `y`).
pub fn sample(scene: &Scene, x: f32, y: f32) -> [u8; 3] {
    let mut color = background_at(&scene.background, x, y);
    for object in &scene.objects {
        if let Some(c) = object_at(object, x, y) {
            color = c;
        }
    }
    color
}

/// The background's colour at world point (`x`, `y`).
pub fn background_at(bg: &Background, x: f32, y: f32) -> [u8; 3] {
    let (a, b) = (bg.color.rgb(), bg.color.tone());
    match bg.kind {
        BackgroundKind::Solid => a,
        BackgroundKind::Stripes => {
            if ((x / 4.0).floor() as i64).rem_euclid(2) == 0 {
                a
            } else {
                b
            }
        }
        BackgroundKind::Checker => {
            if ((x / 8.0).floor() as i64 + (y / 8.0).floor() as i64).rem_euclid(2) == 0 {
                a
            } else {
                b
            }
        }
        BackgroundKind::Gradient => {
            let t = (y / WORLD).clamp(0.0, 1.0);
            [0, 1, 2].map(|k| (a[k] as f32 + (b[k] as f32 - a[k] as f32) * t).round() as u8)
        }
    }
}

/// The object's colour at world point (`x`, `y`), or `None` outside its outline.
pub fn object_at(object: &Object, x: f32, y: f32) -> Option<[u8; 3]> {
    let (cx, cy) = object.center();
    let r = object.size.radius();
    let (dx, dy) = (x - cx, y - cy);
    if dx.abs() > r * 1.05 || dy.abs() > r * 1.05 {
        return None;
    }
    let (u, v) = (dx / r, dy / r);
    if !inside(object.shape, u, v) {
        return None;
    }
    if object.shape == Shape::Flower && u * u + v * v < 0.3 * 0.3 {
        return Some(object.pattern_color.rgb());
    }
    let second = pattern_on(object.pattern, dx, dy, r);
    Some(if second {
        object.pattern_color.rgb()
    } else {
        object.color.rgb()
    })
}

/// Whether the unit-frame point (`u`, `v`) lies inside `shape`.
pub fn inside(shape: Shape, u: f32, v: f32) -> bool {
    let d2 = u * u + v * v;
    match shape {
        Shape::Circle => d2 <= 1.0,
        Shape::Ring => (0.55 * 0.55..=1.0).contains(&d2),
        Shape::Square => u.abs() <= 0.85 && v.abs() <= 0.85,
        Shape::Diamond => u.abs() / 0.85 + v.abs() <= 1.0,
        Shape::Cross => {
            (u.abs() <= 0.33 && v.abs() <= 0.95) || (v.abs() <= 0.33 && u.abs() <= 0.95)
        }
        Shape::Triangle => in_polygon(u, v, &TRIANGLE),
        Shape::Star => in_polygon(u, v, &STAR),
        Shape::Heart => {
            let x = u * 1.15;
            let y = -v * 1.15 + 0.15;
            let a = x * x + y * y - 1.0;
            a * a * a - x * x * y * y * y <= 0.0
        }
        Shape::Flower => {
            if d2 <= 1e-12 {
                return true;
            }
            let d = d2.sqrt();
            let c = u / d;
            let cos3 = 4.0 * c * c * c - 3.0 * c;
            d <= 0.55 + 0.45 * cos3.abs()
        }
    }
}

/// Whether the pattern shows its second colour at offset (`dx`, `dy`) from a centre of an object
/// of radius `r` (all in world units).
fn pattern_on(pattern: Pattern, dx: f32, dy: f32, r: f32) -> bool {
    let fract = |t: f32| t - t.floor();
    match pattern {
        Pattern::Plain => false,
        Pattern::Striped => {
            let period = (r * 0.5).max(5.0);
            fract((dx + dy) * std::f32::consts::FRAC_1_SQRT_2 / period) < 0.4
        }
        Pattern::Dotted => {
            let spacing = (r * 0.55).max(4.5);
            let gx = dx / spacing - (dx / spacing).round();
            let gy = dy / spacing - (dy / spacing).round();
            gx * gx + gy * gy < 0.3 * 0.3
        }
        Pattern::Checkered => {
            let cell = (r * 0.4).max(3.5);
            ((dx / cell).floor() as i64 + (dy / cell).floor() as i64).rem_euclid(2) == 1
        }
        Pattern::Zigzag => {
            let period = (r * 0.5).max(5.0);
            let t = dx / period;
            let tri = (2.0 * (t - (t + 0.5).floor())).abs();
            fract((dy + tri * period * 0.5) / period) < 0.45
        }
        Pattern::TwoTone => dx >= 0.0,
    }
}

/// Equilateral triangle pointing up, circumradius 1, centroid at the origin.
const TRIANGLE: [(f32, f32); 3] = [(0.0, -1.0), (0.866_025_4, 0.5), (-0.866_025_4, 0.5)];

/// Five-pointed star, outer radius 1, inner radius 0.45, a point straight up.
const STAR: [(f32, f32); 10] = [
    (0.0, -1.0),
    (0.264_503_4, -0.364_057_6),
    (0.951_056_5, -0.309_017),
    (0.427_975_4, 0.139_057_6),
    (0.587_785_3, 0.809_017),
    (0.0, 0.45),
    (-0.587_785_3, 0.809_017),
    (-0.427_975_4, 0.139_057_6),
    (-0.951_056_5, -0.309_017),
    (-0.264_503_4, -0.364_057_6),
];

/// Crossing-number point-in-polygon test.
fn in_polygon(x: f32, y: f32, pts: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let (xi, yi) = pts[i];
        let (xj, yj) = pts[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::{Color, Position, Size};

    fn one(shape: Shape, pattern: Pattern) -> Scene {
        Scene {
            background: Background {
                kind: BackgroundKind::Solid,
                color: Color::White,
            },
            objects: vec![Object {
                shape,
                color: Color::Red,
                size: Size::Big,
                position: Position::Center,
                pattern,
                pattern_color: Color::Blue,
                jitter: [0, 0],
            }],
        }
    }

    fn count(img: &RgbImage, c: Color) -> usize {
        img.pixels().filter(|p| p.0 == c.rgb()).count()
    }

    #[test]
    fn every_shape_and_pattern_draws() {
        for &shape in Shape::ALL {
            let img = one(shape, Pattern::Plain).render(64);
            let red = count(&img, Color::Red);
            // Radius 17: areas from the star (~380 px) to the circle (~900 px).
            assert!((250..1000).contains(&red), "{shape}: {red} px");
            for &pattern in &Pattern::ALL[1..] {
                let img = one(shape, pattern).render(64);
                assert!(count(&img, Color::Blue) > 10, "{shape} {pattern}");
                assert!(count(&img, Color::Red) > 10, "{shape} {pattern}");
            }
        }
    }

    #[test]
    fn renders_at_any_size_and_later_objects_cover_earlier_ones() {
        let mut scene = one(Shape::Square, Pattern::Plain);
        let mut top = scene.objects[0];
        top.color = Color::Green;
        top.size = Size::Small;
        scene.objects.push(top);
        for size in [16, 64, 100, 256] {
            let img = scene.render(size);
            assert_eq!(img.dimensions(), (size, size));
            assert_eq!(img.get_pixel(size / 2, size / 2).0, Color::Green.rgb());
            assert_eq!(img.get_pixel(0, 0).0, Color::White.rgb());
        }
    }

    #[test]
    fn backgrounds_paint_both_tones() {
        for &kind in BackgroundKind::ALL {
            let scene = Scene {
                background: Background {
                    kind,
                    color: Color::Blue,
                },
                objects: vec![],
            };
            let img = scene.render(64);
            let blue = count(&img, Color::Blue);
            match kind {
                BackgroundKind::Solid => assert_eq!(blue, 64 * 64),
                BackgroundKind::Stripes | BackgroundKind::Checker => assert_eq!(blue, 32 * 64),
                BackgroundKind::Gradient => {
                    let near = |p: [u8; 3], q: [u8; 3]| (0..3).all(|k| p[k].abs_diff(q[k]) <= 3);
                    assert!(near(img.get_pixel(0, 0).0, Color::Blue.rgb()));
                    assert!(near(img.get_pixel(0, 63).0, Color::Blue.tone()));
                }
            }
        }
    }
}
