//! The caption grammar: writing what a caption asks for ([`Requested::write`]) and reading it
//! back ([`parse_caption`]).
//!
//! # Grammar
//!
//! ```text
//! caption    := objects [ link background ]
//! objects    := object ( " and " object )*                 (", " also separates when parsing)
//! object     := article [size] ["plain"] [color] subject* [shape] [pattern] [" at the " position]
//! article    := "a" | "an"                                 ("an" before a vowel)
//! size       := "small" | "big"                            (medium is unspoken; "medium" parses)
//! subject    := any other word, e.g. "sks", "<my-toy>", "photo of <concept>"
//! shape      := "circle" | "square" | … | "shape"          ("shape" = an object of unnamed shape)
//! pattern    := " with " [color] ("stripes" | "dots" | "checks" | "zigzags" | "halves")
//! position   := "top left" | "top" | "top right" | "left" | "center" | "right"
//!             | "bottom left" | "bottom" | "bottom right"
//! link       := " of " (one object that has a position)  | " on " (otherwise; both parse)
//! background := "a solid C background" | "a striped C background"
//!             | "a checkered C background" | "a C gradient background"
//! ```
//!
//! Examples: "a small green star at the top left of a striped blue background", "a big red
//! circle with yellow stripes at the center of a solid white background", "a red circle at the
//! left and a blue square at the right on a checkered yellow background", "an orange heart".
//!
//! Parsing is lenient where captions come from people or other tools: words it does not know in
//! an object phrase are kept, in order, as [`RequestedObject::subject_words`] (the personalization
//! token: "a sks star", "a <my-toy> star", "a photo of <concept> at the right"), and an object
//! phrase without a shape word is still an object, with `shape: None`. Unknown words in the
//! background phrase or after "at the" are errors. Writing then parsing gives back exactly the
//! same [`Requested`].

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::scene::{BackgroundKind, Color, Pattern, Position, Scene, Shape, Size};

/// The generic noun for an object whose shape is not named ("a red shape at the left").
pub const GENERIC_NOUN: &str = "shape";

/// What a caption asks for: one entry per object phrase, in order, and the background.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Requested {
    pub objects: Vec<RequestedObject>,
    pub background_kind: Option<BackgroundKind>,
    pub background_color: Option<Color>,
}

/// What one object phrase asks for; `None` where the phrase is silent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RequestedObject {
    /// Words that are not part of the grammar (a personalization token), in caption order.
    pub subject_words: Vec<String>,
    pub shape: Option<Shape>,
    pub color: Option<Color>,
    pub size: Option<Size>,
    pub position: Option<Position>,
    pub pattern: Option<Pattern>,
    /// Only written inside a pattern phrase ("with yellow stripes").
    pub pattern_color: Option<Color>,
}

impl RequestedObject {
    /// Everything a full caption says about `object` (a medium size and a plain pattern are
    /// unspoken).
    pub fn full(object: &crate::scene::Object) -> Self {
        let patterned = object.pattern != Pattern::Plain;
        RequestedObject {
            subject_words: Vec::new(),
            shape: Some(object.shape),
            color: Some(object.color),
            size: object.size.is_spoken().then_some(object.size),
            position: Some(object.position),
            pattern: patterned.then_some(object.pattern),
            pattern_color: patterned.then_some(object.pattern_color),
        }
    }

    /// Whether every attribute this phrase states is true of `object` (subject words are not
    /// checked).
    pub fn agrees_with(&self, object: &crate::scene::Object) -> bool {
        fn ok<T: PartialEq>(want: Option<T>, have: T) -> bool {
            want.is_none_or(|w| w == have)
        }
        ok(self.shape, object.shape)
            && ok(self.color, object.color)
            && ok(self.size, object.size)
            && ok(self.position, object.position)
            && ok(self.pattern, object.pattern)
            && (self.pattern_color.is_none()
                || object.pattern == Pattern::Plain
                || self.pattern_color == Some(object.pattern_color))
    }

    fn write(&self, out: &mut String) {
        let mut words: Vec<&str> = Vec::new();
        if let Some(size) = self.size {
            words.push(size.word());
        }
        if self.pattern == Some(Pattern::Plain) {
            words.push(Pattern::Plain.word());
        }
        if let Some(color) = self.color {
            words.push(color.word());
        }
        words.extend(self.subject_words.iter().map(String::as_str));
        match self.shape {
            Some(shape) => words.push(shape.word()),
            None if self.subject_words.is_empty() => words.push(GENERIC_NOUN),
            None => {}
        }
        let first = words[0];
        let vowel = first.starts_with(['a', 'e', 'i', 'o', 'u', 'A', 'E', 'I', 'O', 'U']);
        out.push_str(if vowel { "an " } else { "a " });
        out.push_str(&words.join(" "));
        if let Some(noun) = self.pattern.and_then(|p| p.noun()) {
            out.push_str(" with ");
            if let Some(c) = self.pattern_color {
                out.push_str(c.word());
                out.push(' ');
            }
            out.push_str(noun);
        }
        if let Some(p) = self.position {
            out.push_str(" at the ");
            out.push_str(p.word());
        }
    }
}

impl Requested {
    /// Everything a full caption says about `scene`.
    pub fn full(scene: &Scene) -> Self {
        Requested {
            objects: scene.objects.iter().map(RequestedObject::full).collect(),
            background_kind: Some(scene.background.kind),
            background_color: Some(scene.background.color),
        }
    }

    /// Writes the caption (see the module docs for the grammar).
    pub fn write(&self) -> String {
        let mut out = String::new();
        for (i, o) in self.objects.iter().enumerate() {
            if i > 0 {
                out.push_str(" and ");
            }
            o.write(&mut out);
        }
        if self.background_kind.is_none() && self.background_color.is_none() {
            return out;
        }
        let link = match self.objects.as_slice() {
            [one] if one.position.is_some() => " of ",
            [] => "",
            _ => " on ",
        };
        out.push_str(link);
        out.push_str("a ");
        let color = self.background_color.map(|c| c.word());
        let words: Vec<&str> = match self.background_kind {
            Some(BackgroundKind::Gradient) => color.into_iter().chain(["gradient"]).collect(),
            Some(kind) => [Some(kind.word()), color].into_iter().flatten().collect(),
            None => color.into_iter().collect(),
        };
        if words[0].starts_with(['a', 'e', 'i', 'o', 'u']) {
            out.insert(out.len() - 1, 'n');
        }
        out.push_str(&words.join(" "));
        out.push_str(" background");
        out
    }

    /// Whether everything the caption states is true of `scene`: as many objects, each phrase
    /// agreeing with the object at the same index, and the background.
    pub fn agrees_with(&self, scene: &Scene) -> bool {
        self.objects.len() == scene.objects.len()
            && self
                .objects
                .iter()
                .zip(&scene.objects)
                .all(|(r, o)| r.agrees_with(o))
            && self
                .background_kind
                .is_none_or(|k| k == scene.background.kind)
            && self
                .background_color
                .is_none_or(|c| c == scene.background.color)
    }
}

/// Parses a caption into what it asks for (see the module docs for the grammar and leniency).
pub fn parse_caption(text: &str) -> Result<Requested> {
    let mut tokens: Vec<String> = Vec::new();
    for raw in text.split_whitespace() {
        let mut word = raw.trim_end_matches(['.', ';', '!']);
        let comma = word.ends_with(',');
        word = word.trim_end_matches(',');
        if !word.is_empty() {
            tokens.push(word.to_string());
        }
        if comma {
            tokens.push(",".to_string());
        }
    }
    if tokens.is_empty() {
        bail!("empty caption");
    }
    let lower: Vec<String> = tokens.iter().map(|t| t.to_lowercase()).collect();
    let is_article = |i: usize| matches!(lower.get(i).map(String::as_str), Some("a" | "an"));

    // Background: "… (of|on) a[n] WORDS background" at the very end.
    let mut requested = Requested::default();
    let mut end = tokens.len();
    if lower[end - 1] == "background" {
        let link = (0..end - 1)
            .rev()
            .find(|&i| matches!(lower[i].as_str(), "of" | "on") && is_article(i + 1));
        let Some(link) = link else {
            bail!("caption {text:?}: no \"of a\" or \"on a\" before \"background\"");
        };
        for word in &lower[link + 2..end - 1] {
            if let Some(c) = Color::from_word(word) {
                requested.background_color = Some(c);
            } else if let Some(k) = BackgroundKind::from_word(word) {
                requested.background_kind = Some(k);
            } else {
                bail!("caption {text:?}: unknown background word {word:?}");
            }
        }
        end = link;
    }

    // Objects: split before "and a" / ", a" / ", and a".
    let mut start = 0;
    let mut i = 0;
    while i <= end {
        let at_end = i == end;
        let split = !at_end
            && i > start
            && (lower[i] == "and" || lower[i] == ",")
            && (is_article(i + 1)
                || (lower[i] == ","
                    && lower.get(i + 1).is_some_and(|w| w == "and")
                    && is_article(i + 2)));
        if at_end || split {
            if i > start {
                let words: Vec<(&str, &str)> = (start..i)
                    .filter(|&k| lower[k] != "," && !(lower[k] == "and" && k + 1 == i))
                    .map(|k| (tokens[k].as_str(), lower[k].as_str()))
                    .collect();
                requested.objects.push(parse_object(text, &words)?);
            }
            if at_end {
                break;
            }
            // Skip the separators up to the article.
            while lower[i] == "," || lower[i] == "and" {
                i += 1;
            }
            start = i;
        }
        i += 1;
    }
    if requested.objects.is_empty() {
        bail!("caption {text:?} has no object phrase");
    }
    Ok(requested)
}

/// Parses one object phrase given as (original, lowercase) words.
fn parse_object(text: &str, words: &[(&str, &str)]) -> Result<RequestedObject> {
    let mut o = RequestedObject::default();
    let mut head = words;
    if let Some((_, "a" | "an")) = head.first() {
        head = &head[1..];
    }
    // " at the POSITION" at the end.
    if let Some(at) = (0..head.len())
        .rev()
        .find(|&k| head[k].1 == "at" && head.get(k + 1).is_some_and(|w| w.1 == "the"))
    {
        let pos: Vec<&str> = head[at + 2..].iter().map(|w| w.1).collect();
        let pos = pos.join(" ");
        match Position::from_word(&pos) {
            Some(p) => o.position = Some(p),
            None => bail!("caption {text:?}: unknown position {pos:?}"),
        }
        head = &head[..at];
    }
    // " with [COLOR] NOUN" at the end.
    if let Some(with) = (0..head.len()).rev().find(|&k| head[k].1 == "with") {
        let rest = &head[with + 1..];
        let pattern = rest.last().and_then(|w| Pattern::from_noun(w.1));
        let color = match rest {
            [_] => Some(None),
            [c, _] => Color::from_word(c.1).map(Some),
            _ => None,
        };
        if let (Some(pattern), Some(color)) = (pattern, color) {
            o.pattern = Some(pattern);
            o.pattern_color = color;
            head = &head[..with];
        }
    }
    for &(orig, word) in head {
        if let Some(s) = Shape::from_word(word) {
            o.shape = Some(s);
        } else if word == GENERIC_NOUN {
        } else if let (None, Some(c)) = (o.color, Color::from_word(word)) {
            o.color = Some(c);
        } else if let (None, Some(s)) = (o.size, Size::from_word(word)) {
            o.size = Some(s);
        } else if word == Pattern::Plain.word() && o.pattern.is_none() {
            o.pattern = Some(Pattern::Plain);
        } else {
            o.subject_words.push(orig.to_string());
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::{sample_scene_requested, seeded_rng};

    #[test]
    fn sampled_captions_round_trip_and_agree_with_their_scenes() {
        let mut rng = seeded_rng(21, 0);
        for _ in 0..500 {
            let (scene, requested) = sample_scene_requested(&mut rng);
            let caption = requested.write();
            let parsed = parse_caption(&caption).unwrap();
            assert_eq!(parsed, requested, "{caption}");
            assert!(parsed.agrees_with(&scene), "{caption} vs {scene:?}");
            assert_eq!(
                parse_caption(&scene.caption()).unwrap(),
                Requested::full(&scene)
            );
        }
    }

    #[test]
    fn examples_parse() {
        let r = parse_caption("a small green star at the top left of a striped blue background")
            .unwrap();
        assert_eq!(r.objects.len(), 1);
        let o = &r.objects[0];
        assert_eq!(
            (o.shape, o.color, o.size, o.position),
            (
                Some(Shape::Star),
                Some(Color::Green),
                Some(Size::Small),
                Some(Position::TopLeft)
            )
        );
        assert_eq!(
            (r.background_kind, r.background_color),
            (Some(BackgroundKind::Stripes), Some(Color::Blue))
        );

        let r = parse_caption(
            "a big red circle with yellow stripes at the center of a solid white background",
        )
        .unwrap();
        assert_eq!(r.objects[0].pattern, Some(Pattern::Striped));
        assert_eq!(r.objects[0].pattern_color, Some(Color::Yellow));

        let r = parse_caption("a red circle at the left and a blue square at the right on a checkered yellow background").unwrap();
        assert_eq!(r.objects.len(), 2);
        assert_eq!(r.objects[1].position, Some(Position::Right));
        assert_eq!(r.background_kind, Some(BackgroundKind::Checker));

        let r =
            parse_caption("an orange heart, a cross, and a ring on a blue gradient background.")
                .unwrap();
        assert_eq!(
            r.objects
                .iter()
                .map(|o| o.shape.unwrap())
                .collect::<Vec<_>>(),
            [Shape::Heart, Shape::Cross, Shape::Ring]
        );
        assert_eq!(r.background_kind, Some(BackgroundKind::Gradient));
    }

    #[test]
    fn subjects_are_kept() {
        let r = parse_caption("a sks star at the top left of a solid blue background").unwrap();
        assert_eq!(r.objects[0].subject_words, ["sks"]);
        assert_eq!(r.objects[0].shape, Some(Shape::Star));

        let r = parse_caption("a big <My-Toy> star at the bottom").unwrap();
        assert_eq!(r.objects[0].subject_words, ["<My-Toy>"]);
        assert_eq!(r.objects[0].size, Some(Size::Big));
        assert_eq!(r.background_color, None);

        let r = parse_caption("a photo of <concept> at the right of a striped green background")
            .unwrap();
        let o = &r.objects[0];
        assert_eq!(o.subject_words, ["photo", "of", "<concept>"]);
        assert_eq!((o.shape, o.position), (None, Some(Position::Right)));
        assert_eq!(r.background_color, Some(Color::Green));

        let r = parse_caption(
            "a {} at the right and a small blue square at the left on a solid yellow background",
        )
        .unwrap();
        assert_eq!(r.objects[0].subject_words, ["{}"]);
        assert_eq!(r.objects[1].shape, Some(Shape::Square));
        assert_eq!(
            r.write(),
            "a {} at the right and a small blue square at the left on a solid yellow background"
        );
    }

    #[test]
    fn unusual_requests_round_trip() {
        let cases = [
            Requested {
                objects: vec![RequestedObject {
                    color: Some(Color::Red),
                    ..Default::default()
                }],
                ..Default::default()
            },
            Requested {
                objects: vec![RequestedObject {
                    pattern: Some(Pattern::Plain),
                    shape: Some(Shape::Ring),
                    size: Some(Size::Medium),
                    ..Default::default()
                }],
                background_kind: Some(BackgroundKind::Gradient),
                background_color: None,
            },
            Requested {
                objects: vec![RequestedObject {
                    pattern: Some(Pattern::Dotted),
                    shape: Some(Shape::Cross),
                    ..Default::default()
                }],
                background_kind: None,
                background_color: Some(Color::Orange),
            },
        ];
        for r in cases {
            assert_eq!(parse_caption(&r.write()).unwrap(), r, "{}", r.write());
        }
        assert_eq!(cases_text(), "a red shape");
    }

    fn cases_text() -> String {
        Requested {
            objects: vec![RequestedObject {
                color: Some(Color::Red),
                ..Default::default()
            }],
            ..Default::default()
        }
        .write()
    }

    #[test]
    fn bad_captions_fail() {
        assert!(parse_caption("").is_err());
        assert!(parse_caption("a star at the middle").is_err());
        assert!(parse_caption("a star on a fluffy background").is_err());
    }
}
