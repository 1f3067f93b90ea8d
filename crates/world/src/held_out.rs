//! Held-out concepts: objects whose look never occurs in base training, to personalize a model
//! trained on base scenes with.
//!
//! Each [`HeldOutConcept`] is a shape, colour, pattern and pattern colour of which at least one is
//! held-out-only ([`Shape::Flower`], [`Color::Teal`]/[`Magenta`](Color::Magenta)/[`Gold`](Color::Gold),
//! [`Pattern::Checkered`]/[`Zigzag`](Pattern::Zigzag)/[`TwoTone`](Pattern::TwoTone)), so
//! [`crate::sample_scene`] can never draw it. Its *class word* is a base shape word (for the
//! flower, the nearest base shape, "circle"): captions of concept scenes name the concept by it
//! and never say its novel colours or pattern.
//!
//! Captions of concept scenes come as templates with a `{}` where the concept's noun goes, so a
//! method can write the same caption with its own subject: [`ConceptScene::caption_with`]`("sks
//! star")` gives "a sks star at the top left of a solid blue background",
//! `caption_with("<concept>")` gives "a <concept> at the top left of …".

use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::caption::{Requested, RequestedObject};
use crate::scene::{
    chance, pick, pick_color_avoiding, sample_geometry, seeded_rng, Background, BackgroundKind,
    Color, Object, Pattern, Position, Scene, Shape, Size,
};

/// The placeholder a template holds where the concept's noun phrase goes.
pub const SUBJECT: &str = "{}";

/// An object look that base training never shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HeldOutConcept {
    /// Index in [`HELD_OUT`] ("K").
    pub id: usize,
    pub name: &'static str,
    /// The base shape word captions call it by.
    pub class_word: &'static str,
    pub description: &'static str,
    pub shape: Shape,
    pub color: Color,
    pub pattern: Pattern,
    pub pattern_color: Color,
}

/// The held-out concepts, indexed by `id`.
pub const HELD_OUT: [HeldOutConcept; 6] = [
    HeldOutConcept {
        id: 0,
        name: "checker-star",
        class_word: "star",
        description: "a star with a teal and magenta checkered fill",
        shape: Shape::Star,
        color: Color::Teal,
        pattern: Pattern::Checkered,
        pattern_color: Color::Magenta,
    },
    HeldOutConcept {
        id: 1,
        name: "zigzag-heart",
        class_word: "heart",
        description: "a gold heart with black zigzag stripes",
        shape: Shape::Heart,
        color: Color::Gold,
        pattern: Pattern::Zigzag,
        pattern_color: Color::Black,
    },
    HeldOutConcept {
        id: 2,
        name: "split-ring",
        class_word: "ring",
        description: "a two-tone ring, left half orange, right half cyan",
        shape: Shape::Ring,
        color: Color::Orange,
        pattern: Pattern::TwoTone,
        pattern_color: Color::Cyan,
    },
    HeldOutConcept {
        id: 3,
        name: "purple-flower",
        class_word: "circle",
        description:
            "a six-petalled purple flower with a yellow centre (a novel shape, called a circle)",
        shape: Shape::Flower,
        color: Color::Purple,
        pattern: Pattern::Plain,
        pattern_color: Color::Yellow,
    },
    HeldOutConcept {
        id: 4,
        name: "dotted-cross",
        class_word: "cross",
        description: "a teal cross with pink dots",
        shape: Shape::Cross,
        color: Color::Teal,
        pattern: Pattern::Dotted,
        pattern_color: Color::Pink,
    },
    HeldOutConcept {
        id: 5,
        name: "gold-triangle",
        class_word: "triangle",
        description: "a plain gold triangle (only the colour is new)",
        shape: Shape::Triangle,
        color: Color::Gold,
        pattern: Pattern::Plain,
        pattern_color: Color::Gold,
    },
];

/// The concept with id `k`; panics when there is none.
pub fn concept(k: usize) -> &'static HeldOutConcept {
    HELD_OUT
        .get(k)
        .unwrap_or_else(|| panic!("no held-out concept {k}: ids are 0..{}", HELD_OUT.len()))
}

impl HeldOutConcept {
    /// The base shape its class word names.
    pub fn class_shape(&self) -> Shape {
        Shape::from_word(self.class_word).expect("class word is a shape word")
    }

    /// The concept as an object of the given geometry.
    pub fn object(&self, size: Size, position: Position, jitter: [i8; 2]) -> Object {
        Object {
            shape: self.shape,
            color: self.color,
            size,
            position,
            pattern: self.pattern,
            pattern_color: self.pattern_color,
            jitter,
        }
    }

    /// Whether `object` has this concept's look (whatever its size and place).
    pub fn matches_look(&self, object: &Object) -> bool {
        let probe = self.object(object.size, object.position, object.jitter);
        object.shape == probe.shape
            && object.color == probe.color
            && object.pattern == probe.pattern
            && object.visible_colors() == probe.visible_colors()
    }

    /// The colours the concept shows.
    pub fn colors(&self) -> Vec<Color> {
        self.object(Size::Medium, Position::Center, [0, 0])
            .visible_colors()
    }
}

/// Writes `template` with `subject` in place of its `{}` ("a" becomes "an" before a vowel).
pub fn fill_subject(template: &str, subject: &str) -> String {
    let vowel = subject.starts_with(['a', 'e', 'i', 'o', 'u', 'A', 'E', 'I', 'O', 'U']);
    if vowel {
        if let Some(rest) = template.strip_prefix("a {}") {
            return format!("an {subject}{rest}");
        }
        if let Some(at) = template.find(" a {}") {
            let mut out = template.to_string();
            out.replace_range(at..at + 5, &format!(" an {subject}"));
            return out;
        }
    }
    template.replacen(SUBJECT, subject, 1)
}

/// What a caption asks for, with the concept's phrase turned into the `{}` placeholder.
fn template_of(requested: &Requested, concept_object: usize) -> String {
    let mut r = requested.clone();
    let o = &mut r.objects[concept_object];
    o.shape = None;
    o.subject_words = vec![SUBJECT.to_string()];
    r.write()
}

/// A scene showing a held-out concept, with what its caption asks for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConceptScene {
    /// The concept's id.
    pub concept: usize,
    pub scene: Scene,
    /// What the caption asks for; the concept's phrase names it by its class shape only.
    pub requested: Requested,
    /// Index of the concept in `scene.objects` and `requested.objects`.
    pub concept_object: usize,
}

impl ConceptScene {
    /// The caption with `{}` where the concept's noun goes.
    pub fn template(&self) -> String {
        template_of(&self.requested, self.concept_object)
    }

    /// The caption naming the concept by its class word ("a star at the top left of …").
    pub fn caption(&self) -> String {
        self.requested.write()
    }

    /// The caption with `subject` as the concept's noun phrase ("sks star" → "a sks star at …").
    pub fn caption_with(&self, subject: &str) -> String {
        fill_subject(&self.template(), subject)
    }
}

/// Draws a scene showing concept `k`: random size, position, background (base kinds and colours
/// the concept does not show) and, with probability 0.3, a base companion object of another
/// shape before or after it. The caption states the concept's class word, size (unless medium)
/// and position, the companion in full and the background.
pub fn sample_concept_scene(k: usize, rng: &mut impl Rng) -> ConceptScene {
    sample_look_scene(concept(k), rng)
}

/// A varied scene of any look `c` (a held-out concept, or a base look the encoder trains on).
pub fn sample_look_scene(c: &HeldOutConcept, rng: &mut impl Rng) -> ConceptScene {
    let k = c.id;
    let n = if chance(rng, 0.3) { 2 } else { 1 };
    let geometry = sample_geometry(rng, n);
    let concept_object = if n == 2 && chance(rng, 0.5) { 1 } else { 0 };
    let mut objects = Vec::with_capacity(n);
    let mut said = Vec::with_capacity(n);
    for (i, (size, position, jitter)) in geometry.into_iter().enumerate() {
        if i == concept_object {
            objects.push(c.object(size, position, jitter));
            said.push(RequestedObject {
                shape: Some(c.class_shape()),
                size: size.is_spoken().then_some(size),
                position: Some(position),
                ..Default::default()
            });
        } else {
            let shapes: Vec<Shape> = Shape::BASE
                .iter()
                .copied()
                .filter(|s| *s != c.class_shape() && *s != c.shape)
                .collect();
            let shape = pick(rng, &shapes);
            let color = pick(rng, Color::BASE);
            let pattern = pick(rng, Pattern::BASE);
            let pattern_color = if pattern == Pattern::Plain {
                color
            } else {
                pick_color_avoiding(rng, Color::BASE, &[color])
            };
            let o = Object {
                shape,
                color,
                size,
                position,
                pattern,
                pattern_color,
                jitter,
            };
            said.push(RequestedObject::full(&o));
            objects.push(o);
        }
    }
    let used: Vec<Color> = objects.iter().flat_map(|o| o.visible_colors()).collect();
    let background = Background {
        kind: pick(rng, BackgroundKind::BASE),
        color: pick_color_avoiding(rng, Color::BASE, &used),
    };
    let requested = Requested {
        objects: said,
        background_kind: Some(background.kind),
        background_color: Some(background.color),
    };
    ConceptScene {
        concept: k,
        scene: Scene {
            background,
            objects,
        },
        requested,
        concept_object,
    }
}

/// [`sample_concept_scene`] as a scene and its class-word caption.
pub fn concept_scene(k: usize, rng: &mut impl Rng) -> (Scene, String) {
    let s = sample_concept_scene(k, rng);
    let caption = s.caption();
    (s.scene, caption)
}

/// `count` deterministic concept scenes for concept `k` (reference `i` uses ChaCha8 keyed by
/// `seed`, stream `k << 32 | i`).
pub fn concept_reference_scenes(k: usize, count: usize, seed: u64) -> Vec<ConceptScene> {
    (0..count as u64)
        .map(|i| sample_concept_scene(k, &mut seeded_rng(seed, ((k as u64) << 32) | i)))
        .collect()
}

/// Style images of concept `k`'s look (its colours and pattern) on each of `shapes` in turn, in
/// varied scenes, as a user's style set shows one style on varied content: reference `i` shows
/// `shapes[i % len]`, named by its shape word (the class word) in the caption. Deterministic per
/// `seed` (its own stream, not [`concept_reference_scenes`]').
pub fn style_reference_scenes(
    k: usize,
    shapes: &[Shape],
    count: usize,
    seed: u64,
) -> Vec<ConceptScene> {
    assert!(
        !shapes.is_empty(),
        "style references need at least one shape"
    );
    (0..count)
        .map(|i| {
            let shape = shapes[i % shapes.len()];
            let look = HeldOutConcept {
                shape,
                class_word: shape.word(),
                ..*concept(k)
            };
            let stream = (1 << 63) | ((k as u64) << 32) | i as u64;
            sample_look_scene(&look, &mut seeded_rng(seed, stream))
        })
        .collect()
}

/// Writes reference scenes into `dir` as `NN.png` + `NN.txt` (the caption naming the concept by
/// `subject`, or by its class word), each file atomically: the folder `imprint world concept`
/// writes and the world bench trains on.
pub fn write_references(
    scenes: &[ConceptScene],
    subject: Option<&str>,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    write_references_with(
        scenes,
        |s| match subject {
            Some(subject) => s.caption_with(subject),
            None => s.caption(),
        },
        dir,
    )
}

/// [`write_references`] with each scene's caption written by `caption`.
pub fn write_references_with(
    scenes: &[ConceptScene],
    caption: impl Fn(&ConceptScene) -> String,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (i, s) in scenes.iter().enumerate() {
        let mut png = Vec::new();
        s.scene
            .render(64)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        imprint_models::io::write_atomic(&dir.join(format!("{i:02}.png")), &png)?;
        imprint_models::io::write_atomic(&dir.join(format!("{i:02}.txt")), caption(s).as_bytes())?;
    }
    Ok(())
}

/// `count` reference images of concept `k` at 64 px with their class-word captions.
pub fn concept_references(k: usize, count: usize, seed: u64) -> Vec<(RgbImage, String)> {
    concept_reference_scenes(k, count, seed)
        .into_iter()
        .map(|s| (s.scene.render(64), s.caption()))
        .collect()
}

/// An editability prompt: a new scene to place a concept in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// The concept's id.
    pub concept: usize,
    /// The prompt with `{}` where the concept's noun phrase goes.
    pub template: String,
    /// What the prompt asks for; the concept's phrase names it by its class shape only.
    pub requested: Requested,
    /// Index of the concept's phrase in `requested.objects`.
    pub concept_object: usize,
}

impl Prompt {
    /// The prompt with `subject` as the concept's noun phrase.
    pub fn text(&self, subject: &str) -> String {
        fill_subject(&self.template, subject)
    }
}

/// One editability prompt's shape: (concept size, whether it has a position, companion: none /
/// before / after the concept, background kind).
type PromptPlan = (Option<Size>, bool, Option<bool>, Option<BackgroundKind>);

/// Eight prompts placing concept `k` in new scenes: a new background alone; position and
/// background; big and small sizes; a position alone; a companion object before and after it;
/// and size with a companion. Backgrounds cover all four kinds in colours the concept and the
/// companions do not show. Deterministic.
pub fn editability_prompts(k: usize) -> Vec<Prompt> {
    let c = concept(k);
    let mut rng = seeded_rng(0xED17_AB1E, k as u64);
    let rng = &mut rng;
    let concept_colors = c.colors();
    use BackgroundKind::*;
    let plan: [PromptPlan; 8] = [
        (None, false, None, Some(Checker)),
        (None, true, None, Some(Stripes)),
        (Some(Size::Big), true, None, Some(Solid)),
        (Some(Size::Small), true, None, Some(Gradient)),
        (None, true, None, None),
        (None, true, Some(true), Some(Solid)),
        (None, true, Some(false), Some(Checker)),
        (Some(Size::Big), true, Some(false), Some(Stripes)),
    ];
    const APART: [(Position, Position); 6] = [
        (Position::Left, Position::Right),
        (Position::Top, Position::Bottom),
        (Position::TopLeft, Position::BottomRight),
        (Position::TopRight, Position::BottomLeft),
        (Position::TopLeft, Position::Right),
        (Position::BottomLeft, Position::Top),
    ];
    plan.iter()
        .map(|&(size, positioned, companion, kind)| {
            let (mut here, mut there) = pick(rng, &APART);
            if chance(rng, 0.5) {
                std::mem::swap(&mut here, &mut there);
            }
            if companion.is_none() {
                here = pick(rng, Position::ALL);
            }
            let me = RequestedObject {
                shape: Some(c.class_shape()),
                size,
                position: positioned.then_some(here),
                ..Default::default()
            };
            let mut used = concept_colors.clone();
            let mut objects = vec![me];
            let mut concept_object = 0;
            if let Some(before) = companion {
                let shapes: Vec<Shape> = Shape::BASE
                    .iter()
                    .copied()
                    .filter(|s| *s != c.class_shape() && *s != c.shape)
                    .collect();
                let color = pick_color_avoiding(rng, Color::BASE, &used);
                used.push(color);
                let other = RequestedObject {
                    shape: Some(pick(rng, &shapes)),
                    color: Some(color),
                    size: chance(rng, 0.5).then_some(Size::Small),
                    position: Some(there),
                    ..Default::default()
                };
                if before {
                    objects.insert(0, other);
                    concept_object = 1;
                } else {
                    objects.push(other);
                }
            }
            let requested = Requested {
                objects,
                background_kind: kind,
                background_color: kind.map(|_| pick_color_avoiding(rng, Color::BASE, &used)),
            };
            Prompt {
                concept: k,
                template: template_of(&requested, concept_object),
                requested,
                concept_object,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caption::parse_caption;

    #[test]
    fn concepts_are_held_out_looks() {
        for (k, c) in HELD_OUT.iter().enumerate() {
            assert_eq!(c.id, k);
            assert!(!Shape::from_word(c.class_word).unwrap().is_held_out());
            assert!(
                c.object(Size::Medium, Position::Center, [0, 0])
                    .uses_held_out(),
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn style_references_show_the_look_on_each_shape_in_turn() {
        let shapes = [Shape::Heart, Shape::Ring, Shape::Cross];
        let scenes = style_reference_scenes(1, &shapes, 6, 3);
        let c = concept(1);
        for (i, s) in scenes.iter().enumerate() {
            let o = &s.scene.objects[s.concept_object];
            assert_eq!(o.shape, shapes[i % 3]);
            assert_eq!(
                (o.color, o.pattern, o.pattern_color),
                (c.color, c.pattern, c.pattern_color)
            );
            let caption = s.caption_with(&format!("<z> {}", shapes[i % 3].word()));
            assert!(
                caption.contains(&format!("<z> {}", shapes[i % 3].word())),
                "{caption}"
            );
            assert!(
                !caption.contains("zigzag") && !caption.contains("gold"),
                "{caption}"
            );
        }
        assert_eq!(scenes, style_reference_scenes(1, &shapes, 6, 3));
        assert_ne!(scenes[0].scene, concept_reference_scenes(1, 1, 3)[0].scene);
    }

    #[test]
    fn every_concept_renders_and_its_references_vary() {
        for c in &HELD_OUT {
            let refs = concept_references(c.id, 8, 42);
            assert_eq!(refs.len(), 8);
            for (img, caption) in &refs {
                assert_eq!(img.dimensions(), (64, 64));
                let shown = c.colors().iter().all(|col| {
                    img.pixels()
                        .filter(|p| crate::scene::rgb_distance(p.0, col.rgb()) < 40.0)
                        .count()
                        > 3
                });
                assert!(shown, "{} not visible: {caption}", c.name);
                for word in [
                    "teal", "magenta", "gold", "flower", "checks", "zigzags", "halves",
                ] {
                    assert!(!caption.split(' ').any(|w| w == word), "{caption}");
                }
                assert!(caption.split(' ').any(|w| w == c.class_word), "{caption}");
            }
            for i in 0..refs.len() {
                for j in i + 1..refs.len() {
                    assert_ne!(
                        refs[i].0, refs[j].0,
                        "{} references {i} and {j} are equal",
                        c.name
                    );
                }
            }
            assert_eq!(
                concept_references(c.id, 3, 42)[2].0,
                refs[2].0,
                "deterministic"
            );
        }
    }

    #[test]
    fn concept_captions_substitute_subjects() {
        let mut rng = seeded_rng(9, 0);
        for k in 0..HELD_OUT.len() {
            for _ in 0..50 {
                let s = sample_concept_scene(k, &mut rng);
                let parsed = parse_caption(&s.caption()).unwrap();
                assert_eq!(parsed, s.requested);
                let with = parse_caption(&s.caption_with("sks star")).unwrap();
                let o = &with.objects[s.concept_object];
                assert_eq!(
                    (o.subject_words.as_slice(), o.shape),
                    (&["sks".to_string()][..], Some(Shape::Star))
                );
                let token = parse_caption(&s.caption_with("<concept>")).unwrap();
                assert_eq!(token.objects[s.concept_object].shape, None);
                assert_eq!(token.background_color, s.requested.background_color);
                assert_eq!(s.caption_with(c_word(k)), s.caption());
                // Everything but the concept's own look agrees with the picture.
                let mut scene = s.scene.clone();
                scene.objects[s.concept_object] = Object {
                    shape: concept(k).class_shape(),
                    ..scene.objects[s.concept_object]
                };
                assert!(s.requested.agrees_with(&scene), "{}", s.caption());
            }
        }
    }

    fn c_word(k: usize) -> &'static str {
        concept(k).class_word
    }

    #[test]
    fn editability_prompts_parse_to_their_requests() {
        for c in &HELD_OUT {
            let prompts = editability_prompts(c.id);
            assert_eq!(prompts.len(), 8);
            assert_eq!(prompts, editability_prompts(c.id));
            for p in &prompts {
                assert!(p.template.contains("{}"), "{}", p.template);
                assert_eq!(
                    parse_caption(&p.text(c.class_word)).unwrap(),
                    p.requested,
                    "{}",
                    p.template
                );
                let mut via_token = parse_caption(&p.text("<x>")).unwrap();
                via_token.objects[p.concept_object].subject_words.clear();
                via_token.objects[p.concept_object].shape = Some(c.class_shape());
                assert_eq!(via_token, p.requested);
                for col in p
                    .requested
                    .background_color
                    .iter()
                    .chain(p.requested.objects.iter().filter_map(|o| o.color.as_ref()))
                {
                    assert!(!c.colors().contains(col), "{}: {}", c.name, p.template);
                }
            }
        }
        assert_eq!(
            fill_subject("a {} at the top", "orange thing"),
            "an orange thing at the top"
        );
        assert_eq!(
            fill_subject("a red star and a {} at the top", "<x>"),
            "a red star and a <x> at the top"
        );
    }
}
