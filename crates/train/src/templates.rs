//! Caption templates of the Textual Inversion paper (Gal et al., 2022).
//!
//! When a training image has no caption of its own, Textual Inversion trains on a prompt drawn at
//! random from a small list of ImageNet-style templates with the placeholder word filled in:
//! `"a photo of a {}"` for objects, `"a painting in the style of {}"` for styles. The lists here
//! are the ones diffusers' `examples/textual_inversion/textual_inversion.py` uses
//! (`imagenet_templates_small`, `imagenet_style_templates_small`), string for string, so that a
//! run here sees the same prompts as a run of the reference script.
//!
//! This module only owns the lists and the filling-in; which caption a step uses (an image's own
//! caption or a template) is the trainer's decision.

use rand::seq::SliceRandom;
use rand::Rng;
use std::fmt;
use std::str::FromStr;

/// Which list of templates to draw captions from (diffusers' `--learnable_property`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TemplateSet {
    /// A thing: "a photo of a {}" and friends (`imagenet_templates_small`).
    #[default]
    Object,
    /// A look: "a painting in the style of {}" and friends (`imagenet_style_templates_small`).
    Style,
    /// Each image's own caption (`IMAGE.txt`) naming the new word, where the images have such
    /// captions (the toy world's references do); object templates for any image that has none.
    Captions,
}

impl FromStr for TemplateSet {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "object" => Ok(Self::Object),
            "style" => Ok(Self::Style),
            "captions" => Ok(Self::Captions),
            other => {
                anyhow::bail!(
                    "unknown template set {other:?}: expected \"object\", \"style\" or \"captions\""
                )
            }
        }
    }
}

impl fmt::Display for TemplateSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Object => "object",
            Self::Style => "style",
            Self::Captions => "captions",
        })
    }
}

/// diffusers' `imagenet_templates_small` (27 templates), in its order.
const OBJECT_TEMPLATES: [&str; 27] = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// diffusers' `imagenet_style_templates_small` (19 templates), in its order. Two entries repeat
/// ("a cropped painting…", "a close-up painting…"); the repeats are kept because they weight the
/// random choice exactly as the reference does.
const STYLE_TEMPLATES: [&str; 19] = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
];

/// The templates of a set; each holds one `{}` where the placeholder goes.
pub fn templates(set: TemplateSet) -> &'static [&'static str] {
    match set {
        TemplateSet::Object => &OBJECT_TEMPLATES,
        TemplateSet::Style => &STYLE_TEMPLATES,
        TemplateSet::Captions => &OBJECT_TEMPLATES,
    }
}

/// A training caption for one image: with [`TemplateSet::Captions`] the image's own caption when
/// it names `token` (the token replaced by the placeholder string, so multi-vector words expand),
/// otherwise a random template of the set filled with the placeholder.
pub fn caption_for_image(
    set: TemplateSet,
    image_caption: Option<&str>,
    token: &str,
    placeholder: &str,
    rng: &mut impl Rng,
) -> String {
    if set == TemplateSet::Captions {
        if let Some(c) = image_caption.filter(|c| c.contains(token)) {
            return c.replace(token, placeholder);
        }
    }
    random_caption(set, placeholder, rng)
}

/// Fills a template with the placeholder string, as Python's `template.format(placeholder)` does
/// for these templates: `{}` becomes the placeholder, and the placeholder itself is not scanned
/// again (so a trigger such as `<{}>` stays literal). `{{` and `}}` are Python's escapes for
/// literal braces and are honoured too, though no template above uses them.
pub fn caption(template: &str, placeholder: &str) -> String {
    let mut out = String::with_capacity(template.len() + placeholder.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{}") {
            out.push_str(placeholder);
        } else if tail.starts_with("{{") {
            out.push('{');
        } else if tail.starts_with("}}") {
            out.push('}');
        } else {
            // A lone brace (invalid for Python's format): keep it literally rather than fail.
            out.push_str(&tail[..1]);
            rest = &tail[1..];
            continue;
        }
        rest = &tail[2..];
    }
    out.push_str(rest);
    out
}

/// The placeholder string of a multi-vector concept: its tokens joined by single spaces, as
/// diffusers' script passes `" ".join(tokenizer.convert_ids_to_tokens(placeholder_token_ids))`.
pub fn placeholder_string<S: AsRef<str>>(tokens: &[S]) -> String {
    tokens
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A caption drawn uniformly from a set with one `gen_range` over the list: the stream Textual
/// Inversion's trainer has always consumed (checkpoints resume on it), shared by the methods that
/// caption with templates (Textual Inversion, P+, Perfusion).
pub fn random_caption(set: TemplateSet, placeholder: &str, rng: &mut impl Rng) -> String {
    let list = templates(set);
    caption(list[rng.gen_range(0..list.len())], placeholder)
}

/// A caption drawn uniformly from a set (diffusers: `random.choice(self.templates).format(p)`).
pub fn sample_caption(set: TemplateSet, placeholder: &str, rng: &mut impl Rng) -> String {
    let template = templates(set)
        .choose(rng)
        .expect("template lists are never empty");
    caption(template, placeholder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn lists_match_diffusers() {
        assert_eq!(templates(TemplateSet::Object).len(), 27);
        assert_eq!(templates(TemplateSet::Style).len(), 19);
        assert_eq!(templates(TemplateSet::Object)[0], "a photo of a {}");
        assert_eq!(templates(TemplateSet::Object)[26], "a photo of a small {}");
        assert_eq!(
            templates(TemplateSet::Style)[18],
            "a large painting in the style of {}"
        );
        for t in templates(TemplateSet::Object)
            .iter()
            .chain(templates(TemplateSet::Style))
        {
            assert_eq!(t.matches("{}").count(), 1, "{t}");
        }
    }

    #[test]
    fn captions_fill_like_python_format() {
        assert_eq!(
            caption("a photo of a {}", "<cat-toy>"),
            "a photo of a <cat-toy>"
        );
        assert_eq!(
            caption("a painting in the style of {}", "sks"),
            "a painting in the style of sks"
        );
        // The placeholder is inserted verbatim, never re-scanned.
        assert_eq!(caption("a photo of a {}", "<{}>"), "a photo of a <{}>");
        assert_eq!(caption("{{literal}} {}", "x"), "{literal} x");
        assert_eq!(placeholder_string(&["<t>", "<t>_1"]), "<t> <t>_1");
    }

    #[test]
    fn sets_parse_and_sample() -> anyhow::Result<()> {
        assert_eq!("object".parse::<TemplateSet>()?, TemplateSet::Object);
        assert_eq!("style".parse::<TemplateSet>()?, TemplateSet::Style);
        assert!("Style ".parse::<TemplateSet>().is_err());
        let mut a = ChaCha8Rng::seed_from_u64(7);
        let mut b = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..5 {
            let c = sample_caption(TemplateSet::Style, "sks", &mut a);
            assert!(c.ends_with("style of sks"));
            assert_eq!(c, sample_caption(TemplateSet::Style, "sks", &mut b));
        }
        Ok(())
    }
}

/// Things and scenes [`everyday_captions`] name.
const NOUNS: &[&str] = &[
    "dog",
    "cat",
    "toy",
    "car",
    "house",
    "tree",
    "person",
    "woman",
    "man",
    "child",
    "bird",
    "horse",
    "flower",
    "chair",
    "table",
    "cup",
    "book",
    "mountain",
    "river",
    "city",
    "street",
    "beach",
    "forest",
    "robot",
    "teddy bear",
    "backpack",
    "sneaker",
    "clock",
    "vase",
    "bowl",
    "guitar",
    "bicycle",
    "boat",
    "castle",
    "bridge",
    "cake",
    "apple",
    "lamp",
    "sofa",
    "statue",
    "painting",
    "sunset",
    "garden",
    "kitchen",
    "room",
    "face",
    "portrait",
    "landscape",
    "animal",
    "building",
    "shirt",
    "hat",
    "glasses",
    "bottle",
    "candle",
    "teapot",
    "plush toy",
    "monster",
    "dragon",
    "wolf",
    "fox",
    "rabbit",
    "bear",
    "lion",
];

/// `n` everyday captions, deterministic: the object and style templates, alternating, filled
/// with "a <noun>". imprint ships them as the caption corpus that Perfusion's text covariance and
/// Custom Diffusion's closed-form merge (its regularization captions) are computed from.
pub fn everyday_captions(n: usize) -> Vec<String> {
    let sets = [
        templates(TemplateSet::Object),
        templates(TemplateSet::Style),
    ];
    (0..n)
        .map(|i| {
            let set = sets[i % 2];
            let template = set[(i / 2) % set.len()];
            let noun = NOUNS[(i * 7) % NOUNS.len()];
            caption(template, &format!("a {noun}"))
        })
        .collect()
}
