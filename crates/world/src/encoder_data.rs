//! The toy world's unlimited supply of concepts for `imprint train encoder --data world`: each
//! example is a random base look (shape, colour, pattern and pattern colour from the base
//! vocabulary, so the encoder never sees a held-out look) drawn in varied scenes; the shape word
//! is its class word.

use crate::held_out::{sample_look_scene, HeldOutConcept};
use crate::scene::{pick, pick_color_avoiding, seeded_rng, Color, Pattern, Shape};
use anyhow::Result;
use imprint_train::methods::encoder::{ConceptSample, ConceptSource};

/// World concepts drawn from a seed.
pub struct WorldConcepts {
    pub seed: u64,
}

/// The random base look of example `index`.
pub fn random_look(seed: u64, index: u64) -> HeldOutConcept {
    let mut rng = seeded_rng(seed ^ 0xE4_7000, index);
    let shape = pick(&mut rng, Shape::BASE);
    let color = pick(&mut rng, Color::BASE);
    let pattern = pick(&mut rng, Pattern::BASE);
    let pattern_color = if pattern == Pattern::Plain {
        color
    } else {
        pick_color_avoiding(&mut rng, Color::BASE, &[color])
    };
    HeldOutConcept {
        id: usize::MAX,
        name: "random base look",
        class_word: shape.word(),
        description: "",
        shape,
        color,
        pattern,
        pattern_color,
    }
}

impl ConceptSource for WorldConcepts {
    fn sample(&mut self, index: u64, references: usize) -> Result<ConceptSample> {
        let look = random_look(self.seed, index);
        let mut rng = seeded_rng(self.seed ^ 0xE4_7001, index);
        let refs = (0..references.max(1))
            .map(|_| sample_look_scene(&look, &mut rng).scene.render(64))
            .collect();
        let target = sample_look_scene(&look, &mut rng);
        Ok(ConceptSample {
            class_word: look.class_word.to_string(),
            references: refs,
            target: target.scene.render(64),
            caption: target.caption_with("{}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_base_looks_and_deterministic() {
        let mut w = WorldConcepts { seed: 3 };
        for i in 0..20 {
            let look = random_look(3, i);
            let probe = look.object(
                crate::scene::Size::Medium,
                crate::scene::Position::Center,
                [0, 0],
            );
            assert!(!probe.uses_held_out());
            let s = w.sample(i, 2).unwrap();
            assert_eq!(s.references.len(), 2);
            assert!(s.caption.contains("{}"), "{}", s.caption);
            assert_eq!(s.class_word, look.class_word);
        }
        let a = w.sample(7, 1).unwrap();
        let b = w.sample(7, 1).unwrap();
        assert_eq!(a.target, b.target);
        assert_eq!(a.caption, b.caption);
    }
}
