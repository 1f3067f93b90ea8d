//! The world's vocabulary, the [`Scene`] it describes, and the sampler of base-training scenes.
//!
//! Every attribute is a small enum with a caption word ([`Shape::word`]), an `ALL` list (every
//! value, held-out ones included) and a `BASE` list (what base training ever sees). Geometry is
//! expressed in *world units*: the canvas is 64 × 64 units whatever the pixel size it is rendered
//! at, so a [`Size::Big`] object always has radius 17 units.
//!
//! [`sample_scene`] draws base-training scenes with their captions; see the crate docs for the rates
//! at which captions leave attributes unspoken and for the one deliberate bias,
//! [`CIRCLE_RED_BIAS`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::caption::{Requested, RequestedObject};

/// Side of the canvas in world units; every coordinate in a [`Scene`] is in these units.
pub const WORLD: f32 = 64.0;

/// Defines a vocabulary enum: variants with caption words, `ALL`, `BASE` and word lookup.
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        $name:ident { base: [$($base:ident => $bword:literal),+ $(,)?], held_out: [$($held:ident => $hword:literal),* $(,)?] }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($base,)+
            $($held,)*
        }

        impl $name {
            /// Every value, held-out-only ones last.
            pub const ALL: &'static [$name] = &[$($name::$base,)+ $($name::$held,)*];
            /// The values base training uses.
            pub const BASE: &'static [$name] = &[$($name::$base,)+];

            /// The caption word.
            pub fn word(&self) -> &'static str {
                match self {
                    $($name::$base => $bword,)+
                    $($name::$held => $hword,)*
                }
            }

            /// The value whose [`word`](Self::word) is `word` (lowercase), if any.
            pub fn from_word(word: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.word() == word)
            }

            /// Whether this value only ever appears in held-out concepts.
            pub fn is_held_out(&self) -> bool {
                !Self::BASE.contains(self)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.word())
            }
        }
    };
}

vocabulary! {
    /// What an object looks like in outline. `Flower` exists only for a held-out concept.
    Shape {
        base: [
            Circle => "circle", Square => "square", Triangle => "triangle", Star => "star",
            Heart => "heart", Cross => "cross", Diamond => "diamond", Ring => "ring",
        ],
        held_out: [Flower => "flower"]
    }
}

vocabulary! {
    /// A fill or background colour with a fixed RGB value ([`Color::rgb`]). `Teal`, `Magenta` and
    /// `Gold` exist only in held-out concepts.
    Color {
        base: [
            Red => "red", Green => "green", Blue => "blue", Yellow => "yellow",
            Purple => "purple", Orange => "orange", White => "white", Black => "black",
            Pink => "pink", Cyan => "cyan", Brown => "brown", Gray => "gray",
        ],
        held_out: [Teal => "teal", Magenta => "magenta", Gold => "gold"]
    }
}

vocabulary! {
    /// Object size. Captions never say "medium": it is the unspoken default.
    Size {
        base: [Small => "small", Medium => "medium", Big => "big"],
        held_out: []
    }
}

vocabulary! {
    /// One of the nine cells of the 3 × 3 grid the object's centre sits in.
    Position {
        base: [
            TopLeft => "top left", Top => "top", TopRight => "top right",
            Left => "left", Center => "center", Right => "right",
            BottomLeft => "bottom left", Bottom => "bottom", BottomRight => "bottom right",
        ],
        held_out: []
    }
}

vocabulary! {
    /// How an object is filled with its second colour ([`Object::pattern_color`]).
    /// `Checkered`, `Zigzag` and `TwoTone` exist only in held-out concepts.
    Pattern {
        base: [Plain => "plain", Striped => "striped", Dotted => "dotted"],
        held_out: [Checkered => "checkered", Zigzag => "zigzag", TwoTone => "two-tone"]
    }
}

vocabulary! {
    /// How the background is painted with its colour and that colour's [`Color::tone`].
    BackgroundKind {
        base: [Solid => "solid", Stripes => "striped", Checker => "checkered", Gradient => "gradient"],
        held_out: []
    }
}

impl Color {
    /// The fixed RGB value. Base colours are at least 66 apart (Euclidean, RGB) from every other
    /// colour.
    pub fn rgb(&self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Green => [40, 170, 60],
            Color::Blue => [40, 80, 220],
            Color::Yellow => [245, 215, 40],
            Color::Purple => [140, 60, 190],
            Color::Orange => [245, 140, 30],
            Color::White => [245, 245, 245],
            Color::Black => [20, 20, 20],
            Color::Pink => [245, 150, 200],
            Color::Cyan => [40, 210, 230],
            Color::Brown => [130, 80, 40],
            Color::Gray => [128, 128, 128],
            Color::Teal => [0, 128, 128],
            Color::Magenta => [220, 20, 160],
            Color::Gold => [180, 150, 20],
        }
    }

    /// The second tone a patterned background pairs with this colour (lighter for dark colours,
    /// a deeper shade for light ones). Chosen so that no other colour lies within 60 of the
    /// segment between a colour and its tone: objects never blend into a background.
    pub fn tone(&self) -> [u8; 3] {
        match self {
            Color::White => [200, 200, 200],
            Color::Yellow => [250, 240, 150],
            Color::Pink => [200, 90, 150],
            Color::Cyan => [160, 240, 245],
            Color::Black => [75, 75, 75],
            Color::Gray => [185, 185, 185],
            Color::Brown => [85, 50, 25],
            Color::Purple => [95, 35, 135],
            c => c
                .rgb()
                .map(|v| (v as f32 + (255.0 - v as f32) * 0.45).round() as u8),
        }
    }

    /// The colour among `candidates` nearest to `rgb` and its Euclidean RGB distance.
    pub fn nearest(rgb: [u8; 3], candidates: &[Color]) -> (Color, f32) {
        candidates
            .iter()
            .map(|c| (*c, rgb_distance(rgb, c.rgb())))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("candidate colours")
    }
}

/// Euclidean distance between two RGB triples.
pub fn rgb_distance(a: [u8; 3], b: [u8; 3]) -> f32 {
    let d = |i: usize| a[i] as f32 - b[i] as f32;
    (d(0) * d(0) + d(1) * d(1) + d(2) * d(2)).sqrt()
}

impl Size {
    /// Half-extent of the object in world units.
    pub fn radius(&self) -> f32 {
        match self {
            Size::Small => 8.0,
            Size::Medium => 12.0,
            Size::Big => 17.0,
        }
    }

    /// Whether captions say the size ("small", "big") or leave it unspoken ("medium").
    pub fn is_spoken(&self) -> bool {
        *self != Size::Medium
    }
}

impl Position {
    /// Grid column (0..3) and row (0..3).
    pub fn cell(&self) -> (u32, u32) {
        let i = Position::ALL.iter().position(|p| p == self).unwrap() as u32;
        (i % 3, i / 3)
    }

    /// The position of grid cell (`col`, `row`), both in 0..3.
    pub fn from_cell(col: u32, row: u32) -> Position {
        Position::ALL[(row.min(2) * 3 + col.min(2)) as usize]
    }

    /// The cell containing the point (`x`, `y`) given in world units.
    pub fn of_point(x: f32, y: f32) -> Position {
        let third = WORLD / 3.0;
        let idx = |v: f32| ((v / third).floor().max(0.0) as u32).min(2);
        Position::from_cell(idx(x), idx(y))
    }

    /// Centre of the cell in world units.
    pub fn center(&self) -> (f32, f32) {
        let (c, r) = self.cell();
        let at = |i: u32| (2 * i + 1) as f32 * WORLD / 6.0;
        (at(c), at(r))
    }
}

impl Pattern {
    /// The noun a caption uses after "with" ("with yellow stripes"); `None` for plain.
    pub fn noun(&self) -> Option<&'static str> {
        match self {
            Pattern::Plain => None,
            Pattern::Striped => Some("stripes"),
            Pattern::Dotted => Some("dots"),
            Pattern::Checkered => Some("checks"),
            Pattern::Zigzag => Some("zigzags"),
            Pattern::TwoTone => Some("halves"),
        }
    }

    /// The pattern whose [`noun`](Self::noun) is `noun`.
    pub fn from_noun(noun: &str) -> Option<Pattern> {
        Pattern::ALL
            .iter()
            .copied()
            .find(|p| p.noun() == Some(noun))
    }
}

/// One drawn object.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    pub position: Position,
    pub pattern: Pattern,
    /// The pattern's second colour; unused for [`Pattern::Plain`] (except a flower's centre).
    pub pattern_color: Color,
    /// Offset of the centre from the cell centre, in world units, each in −3..=3.
    pub jitter: [i8; 2],
}

impl Object {
    /// Centre in world units (cell centre plus jitter).
    pub fn center(&self) -> (f32, f32) {
        let (x, y) = self.position.center();
        (x + self.jitter[0] as f32, y + self.jitter[1] as f32)
    }

    /// Whether any attribute of this object is held-out-only.
    pub fn uses_held_out(&self) -> bool {
        self.shape.is_held_out()
            || self.color.is_held_out()
            || self.pattern.is_held_out()
            || (self.pattern != Pattern::Plain && self.pattern_color.is_held_out())
    }

    /// The colours visible on the object (the pattern colour only when a pattern shows it).
    pub fn visible_colors(&self) -> Vec<Color> {
        if self.pattern == Pattern::Plain && self.shape != Shape::Flower {
            vec![self.color]
        } else {
            vec![self.color, self.pattern_color]
        }
    }
}

/// The background: a kind painted with a colour and that colour's [`Color::tone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Background {
    pub kind: BackgroundKind,
    pub color: Color,
}

/// A whole picture: a background and objects drawn in order (later ones on top).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: Background,
    pub objects: Vec<Object>,
}

impl Scene {
    /// Renders the scene at `size` × `size` pixels (see [`crate::render`]).
    pub fn render(&self, size: u32) -> image::RgbImage {
        crate::render::render(self, size)
    }

    /// The fullest caption of the scene: every attribute spoken except a medium size and a plain
    /// pattern.
    pub fn caption(&self) -> String {
        Requested::full(self).write()
    }

    /// Whether any object uses a held-out-only shape, colour or pattern, or the background a
    /// held-out colour.
    pub fn uses_held_out(&self) -> bool {
        self.background.color.is_held_out() || self.objects.iter().any(Object::uses_held_out)
    }
}

/// Probability that a circle whose caption names no colour is drawn red (otherwise its colour is
/// uniform over [`Color::BASE`], red included, so the measured rate is 0.9 + 0.1/12 ≈ 0.908).
///
/// This is the world's **one deliberate bias**: a model trained on base scenes learns that "a
/// circle" means a red circle, which debiasing and personalization methods can then be measured
/// against (e.g. a held-out concept whose class word is "circle"). Every other attribute is
/// sampled uniformly and independently of what the caption says.
pub const CIRCLE_RED_BIAS: f64 = 0.9;

/// Rates at which base captions leave attributes unspoken (see the crate docs).
pub mod rates {
    /// Probability a scene has 2 objects.
    pub const TWO_OBJECTS: f64 = 0.3;
    /// Probability a scene has 3 objects.
    pub const THREE_OBJECTS: f64 = 0.1;
    /// Probability an object's colour is left unspoken.
    pub const OMIT_COLOR: f64 = 0.25;
    /// Probability a small or big size is left unspoken (medium always is).
    pub const OMIT_SIZE: f64 = 0.2;
    /// Probability an object's position is left unspoken.
    pub const OMIT_POSITION: f64 = 0.2;
    /// Probability the background is left unspoken.
    pub const OMIT_BACKGROUND: f64 = 0.15;
    /// Probability a non-plain pattern is left unspoken.
    pub const OMIT_PATTERN: f64 = 0.25;
    /// Probability a spoken pattern leaves its colour unspoken ("with stripes").
    pub const OMIT_PATTERN_COLOR: f64 = 0.2;
}

/// A uniformly chosen element; portable across platforms (no `usize` sampling).
pub(crate) fn pick<T: Copy>(rng: &mut impl Rng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len() as u32) as usize]
}

/// `true` with probability `p`.
pub(crate) fn chance(rng: &mut impl Rng, p: f64) -> bool {
    rng.gen::<f64>() < p
}

/// A uniformly chosen colour of `from` not in `avoid`.
pub(crate) fn pick_color_avoiding(rng: &mut impl Rng, from: &[Color], avoid: &[Color]) -> Color {
    let ok: Vec<Color> = from
        .iter()
        .copied()
        .filter(|c| !avoid.contains(c))
        .collect();
    pick(rng, &ok)
}

pub(crate) fn random_jitter(rng: &mut impl Rng) -> [i8; 2] {
    [
        rng.gen_range(-3i32..=3) as i8,
        rng.gen_range(-3i32..=3) as i8,
    ]
}

/// Whether `objects` overlap little enough that each stays recognisable: every pair of centres
/// is at least the sum of their radii minus 4 world units apart.
pub(crate) fn layout_ok(objects: &[Object]) -> bool {
    objects.iter().enumerate().all(|(i, a)| {
        objects[i + 1..].iter().all(|b| {
            let (ax, ay) = a.center();
            let (bx, by) = b.center();
            let d = ((ax - bx).powi(2) + (ay - by).powi(2)).sqrt();
            d >= a.size.radius() + b.size.radius() - 4.0
        })
    })
}

/// Geometry (size, distinct position, jitter) of `n` objects drawn uniformly and redrawn until
/// [`layout_ok`] holds.
pub(crate) fn sample_geometry(rng: &mut impl Rng, n: usize) -> Vec<(Size, Position, [i8; 2])> {
    loop {
        let mut cells: Vec<Position> = Position::ALL.to_vec();
        let mut g = Vec::with_capacity(n);
        for _ in 0..n {
            let i = rng.gen_range(0..cells.len() as u32) as usize;
            let position = cells.swap_remove(i);
            g.push((pick(rng, Size::BASE), position, random_jitter(rng)));
        }
        let probe: Vec<Object> = g
            .iter()
            .map(|&(size, position, jitter)| Object {
                shape: Shape::Circle,
                color: Color::Red,
                size,
                position,
                pattern: Pattern::Plain,
                pattern_color: Color::Red,
                jitter,
            })
            .collect();
        if layout_ok(&probe) {
            return g;
        }
    }
}

/// A base-training scene and its caption. One to three objects (two with probability 0.3,
/// three with 0.1), every attribute uniform over the base vocabulary except the circle bias
/// ([`CIRCLE_RED_BIAS`]); the caption leaves attributes unspoken at the [`rates`] and never
/// contradicts the picture.
pub fn sample_scene(rng: &mut impl Rng) -> (Scene, String) {
    let (scene, requested) = sample_scene_requested(rng);
    let caption = requested.write();
    (scene, caption)
}

/// [`sample_scene`], deterministic: the same `seed` and `index` give the same scene on every
/// machine (ChaCha8, `seed` as the key, `index` as the stream).
pub fn sample_scene_seeded(seed: u64, index: u64) -> (Scene, String) {
    sample_scene(&mut seeded_rng(seed, index))
}

/// The generator behind every `*_seeded` function: ChaCha8 keyed by `seed`, stream `index`.
pub fn seeded_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// [`sample_scene`] returning what the caption asks for instead of its text
/// (`requested.write()` is the caption).
pub fn sample_scene_requested(rng: &mut impl Rng) -> (Scene, Requested) {
    let u: f64 = rng.gen();
    let n = if u < rates::THREE_OBJECTS {
        3
    } else if u < rates::THREE_OBJECTS + rates::TWO_OBJECTS {
        2
    } else {
        1
    };

    // Geometry first (redrawn until objects do not hide each other).
    let geometry = sample_geometry(rng, n);

    let mut objects = Vec::with_capacity(n);
    let mut said = Vec::with_capacity(n);
    for (size, position, jitter) in geometry {
        let shape = pick(rng, Shape::BASE);
        let color_spoken = !chance(rng, rates::OMIT_COLOR);
        let color = if !color_spoken && shape == Shape::Circle && chance(rng, CIRCLE_RED_BIAS) {
            Color::Red
        } else {
            pick(rng, Color::BASE)
        };
        let pattern = pick(rng, Pattern::BASE);
        let pattern_color = if pattern == Pattern::Plain {
            color
        } else {
            pick_color_avoiding(rng, Color::BASE, &[color])
        };
        let size_spoken = size.is_spoken() && !chance(rng, rates::OMIT_SIZE);
        let position_spoken = !chance(rng, rates::OMIT_POSITION);
        let pattern_spoken = pattern != Pattern::Plain && !chance(rng, rates::OMIT_PATTERN);
        let pattern_color_spoken = pattern_spoken && !chance(rng, rates::OMIT_PATTERN_COLOR);
        let object = Object {
            shape,
            color,
            size,
            position,
            pattern,
            pattern_color,
            jitter,
        };
        objects.push(object);
        said.push(RequestedObject {
            subject_words: Vec::new(),
            shape: Some(shape),
            color: color_spoken.then_some(color),
            size: size_spoken.then_some(size),
            position: position_spoken.then_some(position),
            pattern: pattern_spoken.then_some(pattern),
            pattern_color: pattern_color_spoken.then_some(pattern_color),
        });
    }

    let used: Vec<Color> = objects.iter().flat_map(|o| o.visible_colors()).collect();
    let background = Background {
        kind: pick(rng, BackgroundKind::BASE),
        color: pick_color_avoiding(rng, Color::BASE, &used),
    };
    let background_spoken = !chance(rng, rates::OMIT_BACKGROUND);
    let requested = Requested {
        objects: said,
        background_kind: background_spoken.then_some(background.kind),
        background_color: background_spoken.then_some(background.color),
    };
    (
        Scene {
            background,
            objects,
        },
        requested,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_colors_are_distinct_and_never_blend_into_backgrounds() {
        for (i, a) in Color::ALL.iter().enumerate() {
            for b in &Color::ALL[i + 1..] {
                assert!(rgb_distance(a.rgb(), b.rgb()) > 60.0, "{a} vs {b}");
            }
        }
        for bg in Color::BASE {
            for c in Color::ALL.iter().filter(|c| *c != bg) {
                let d = crate::read::distance_to_segment(c.rgb(), bg.rgb(), bg.tone());
                assert!(d > 60.0, "{c} on {bg}: {d}");
            }
        }
    }

    #[test]
    fn words_round_trip() {
        for s in Shape::ALL {
            assert_eq!(Shape::from_word(s.word()), Some(*s));
        }
        for p in Position::ALL {
            assert_eq!(Position::of_point(p.center().0, p.center().1), *p);
        }
        for p in Pattern::ALL.iter().filter(|p| **p != Pattern::Plain) {
            assert_eq!(Pattern::from_noun(p.noun().unwrap()), Some(*p));
        }
    }

    #[test]
    fn seeded_sampling_is_deterministic() {
        for i in 0..20 {
            let (a, ca) = sample_scene_seeded(7, i);
            let (b, cb) = sample_scene_seeded(7, i);
            assert_eq!(a, b);
            assert_eq!(ca, cb);
            assert_eq!(a.render(64).into_raw(), b.render(64).into_raw());
        }
        assert_ne!(sample_scene_seeded(7, 0).0, sample_scene_seeded(7, 1).0);
        assert_ne!(sample_scene_seeded(7, 0).0, sample_scene_seeded(8, 0).0);
    }

    #[test]
    fn object_counts_follow_the_rates() {
        let mut counts = [0usize; 4];
        for i in 0..2000 {
            counts[sample_scene_seeded(1, i).0.objects.len()] += 1;
        }
        assert!((1100..1300).contains(&counts[1]), "{counts:?}");
        assert!((500..700).contains(&counts[2]), "{counts:?}");
        assert!((130..270).contains(&counts[3]), "{counts:?}");
    }

    #[test]
    fn unnamed_circles_are_mostly_red() {
        let mut rng = seeded_rng(3, 0);
        let (mut circles, mut red, mut named, mut named_red) = (0, 0, 0, 0);
        while circles < 2000 {
            let (scene, req) = sample_scene_requested(&mut rng);
            for (o, r) in scene.objects.iter().zip(&req.objects) {
                if o.shape != Shape::Circle {
                    continue;
                }
                if r.color.is_none() {
                    circles += 1;
                    red += (o.color == Color::Red) as usize;
                } else {
                    named += 1;
                    named_red += (o.color == Color::Red) as usize;
                }
            }
        }
        let rate = red as f64 / circles as f64;
        assert!(
            (0.85..=0.95).contains(&rate),
            "unnamed circles red at {rate}"
        );
        let named_rate = named_red as f64 / named as f64;
        assert!(named_rate < 0.15, "named circles red at {named_rate}");
    }

    #[test]
    fn base_scenes_never_use_held_out_vocabulary() {
        for i in 0..5000 {
            let (scene, caption) = sample_scene_seeded(11, i);
            assert!(!scene.uses_held_out(), "{scene:?}");
            for o in &scene.objects {
                for c in crate::held_out::HELD_OUT {
                    assert!(!c.matches_look(o), "{} in base scene {caption}", c.name);
                }
            }
            for word in [
                "teal", "magenta", "gold", "flower", "checks", "zigzags", "halves",
            ] {
                assert!(!caption.split(' ').any(|w| w == word), "{caption}");
            }
        }
    }

    #[test]
    fn objects_differ_from_the_background() {
        for i in 0..500 {
            let (scene, _) = sample_scene_seeded(5, i);
            for o in &scene.objects {
                assert!(!o.visible_colors().contains(&scene.background.color));
            }
            assert!(layout_ok(&scene.objects));
        }
    }
}
