//! The toy world: small captioned scenes of coloured shapes, drawn procedurally, on which imprint
//! trains a small diffusion model, CLIP and a ViT, and benchmarks personalization methods on
//! concepts the base model never saw.
//!
//! A [`Scene`] is a [`Background`] and one to three [`Object`]s. It renders at any size
//! ([`Scene::render`], 64 px by default), deterministically and with 4 × 4 supersampled edges.
//! Captions follow one small grammar ([`caption`]): [`Requested`] is what a caption asks for,
//! [`Requested::write`] writes it and [`parse_caption`] reads it back, keeping unknown words as a
//! subject (the personalization token). [`read`] reads the background and objects back off an
//! image, rendered or generated, so generated pictures can be scored against their prompts.
//!
//! ```
//! use imprint_world::{parse_caption, read, sample_scene_seeded, Position};
//!
//! let (scene, caption) = sample_scene_seeded(0, 3);
//! let image = scene.render(64);
//! let asked = parse_caption(&caption).unwrap();
//! assert!(asked.agrees_with(&scene));
//! let seen = read::read(&image);
//! assert_eq!(seen.background_color, scene.background.color);
//! # let _ = Position::Center;
//! ```
//!
//! # The world
//!
//! | attribute | values (base training) | held-out only |
//! |---|---|---|
//! | shape | circle, square, triangle, star, heart, cross, diamond, ring | flower |
//! | colour | red, green, blue, yellow, purple, orange, white, black, pink, cyan, brown, gray | teal, magenta, gold |
//! | size | small (radius 8), medium (12, never said), big (17) — world units, 64 per side | |
//! | position | centre of one cell of the 3 × 3 grid ± 3 units jitter: top left, top, top right, left, center, right, bottom left, bottom, bottom right | |
//! | pattern | plain, striped ("with C stripes"), dotted ("with C dots") | checkered, zigzag, two-tone |
//! | background | solid, striped, checkered, gradient; one colour and its fixed tone | |
//!
//! # Grammar
//!
//! ```text
//! caption    := object (" and " object)* [(" of " | " on ") background]
//! object     := ("a"|"an") [size] [color] subject* shape [" with " [color] pattern-noun] [" at the " position]
//! background := "a solid C background" | "a striped C background" | "a checkered C background" | "a C gradient background"
//! ```
//!
//! " of " links a single positioned object to the background ("a small green star at the top left
//! of a striped blue background"), " on " otherwise ("a red circle at the left and a blue square
//! at the right on a checkered yellow background"). Full details in [`caption`].
//!
//! # Base scenes and their one bias
//!
//! [`sample_scene`] draws 1 object (60 %), 2 (30 %) or 3 (10 %) in distinct cells, redrawn until
//! no object hides another; shape, size, pattern, pattern colour and background kind are uniform,
//! the background colour is uniform over the base colours no object shows. Captions never
//! contradict the picture but leave attributes unspoken ([`scene::rates`]): colour 25 %, small or
//! big 20 % (medium always), position 20 %, background 15 %, a pattern 25 % (its colour 20 % of
//! the rest).
//!
//! The **one deliberate bias** ([`CIRCLE_RED_BIAS`]): when a caption names no colour for a circle,
//! the circle is red 90 % of the time (otherwise uniform, so ≈ 90.8 % in all). Everything else is
//! independent of the caption.
//!
//! # Held-out concepts
//!
//! Looks base scenes never contain ([`held_out`]), called by a base class word:
//!
//! | K | name | class word | look |
//! |---|---|---|---|
//! | 0 | checker-star | star | teal star with magenta checkered fill |
//! | 1 | zigzag-heart | heart | gold heart with black zigzag stripes |
//! | 2 | split-ring | ring | ring, left half orange, right half cyan |
//! | 3 | purple-flower | circle | six-petalled purple flower, yellow centre (novel shape) |
//! | 4 | dotted-cross | cross | teal cross with pink dots |
//! | 5 | gold-triangle | triangle | plain gold triangle (only the colour is new) |
//!
//! [`concept_scene`] places a concept in a varied scene captioned with its class word only,
//! [`ConceptScene::caption_with`] writes the same caption with another subject ("a sks star at
//! …"), [`concept_references`] gives reference images and [`editability_prompts`] eight new
//! scenes per concept with what each asks for.

pub mod bench;
pub mod caption;
pub mod encoder_data;
pub mod follow;
pub mod held_out;
pub mod read;
pub mod recipe;
pub mod render;
pub mod scene;
pub mod uses;

pub use caption::{parse_caption, Requested, RequestedObject};
pub use held_out::{
    concept, concept_reference_scenes, concept_references, concept_scene, editability_prompts,
    fill_subject, sample_concept_scene, ConceptScene, HeldOutConcept, Prompt, HELD_OUT,
};
pub use read::{read_background, read_objects, Blob, Reading};
pub use scene::{
    sample_scene, sample_scene_requested, sample_scene_seeded, seeded_rng, Background,
    BackgroundKind, Color, Object, Pattern, Position, Scene, Shape, Size, CIRCLE_RED_BIAS,
};
