//! DreamBench (Ruiz et al. 2023, DreamBooth, §4.1 and the google/dreambooth repository): 30
//! subjects, 25 prompts each (object prompts, or live-subject prompts for cats and dogs), 4
//! generated images per prompt; DINO and CLIP-I against the subject's real images, CLIP-T against
//! the prompt with the class noun (the unique token removed).
//!
//! Layouts:
//! - `--data DIR`: the dataset folder of google/dreambooth — `DIR/<subject>/*.jpg` and
//!   `DIR/prompts_and_classes.txt` (a `subject_name,class` table, then the `Object Prompts` and
//!   `Live Subject Prompts` lists of `'a {0} {1} in the jungle'.format(unique_token, class_token)`).
//! - `--samples DIR`: `DIR/<subject>/<NN>…/*.png`, one folder per prompt whose name starts with the
//!   prompt's two-digit index (`00`, `07-in-the-snow`, …).

use crate::metrics::{image_files, mean_cosine_distinct, read_images, Evaluator, ImageFeatures};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// Classes whose subjects take the live-subject prompts.
const LIVE_CLASSES: [&str; 2] = ["cat", "dog"];

/// `prompts_and_classes.txt`.
#[derive(Clone, Debug)]
pub struct Protocol {
    /// `(subject folder, class noun)`.
    pub subjects: Vec<(String, String)>,
    pub object_prompts: Vec<String>,
    pub live_prompts: Vec<String>,
}

impl Protocol {
    pub fn parse(text: &str) -> Result<Self> {
        #[derive(PartialEq)]
        enum Section {
            None,
            Classes,
            Object,
            Live,
        }
        let mut section = Section::None;
        let (mut subjects, mut object_prompts, mut live_prompts) = (vec![], vec![], vec![]);
        for line in text.lines() {
            let t = line.trim();
            let lower = t.to_ascii_lowercase();
            if lower.starts_with("subject_name") {
                section = Section::Classes;
                continue;
            }
            if lower.starts_with("object prompts") {
                section = Section::Object;
                continue;
            }
            if lower.starts_with("live subject prompts") {
                section = Section::Live;
                continue;
            }
            match section {
                Section::Classes => {
                    if t.is_empty() || lower == "prompts" {
                        section = Section::None;
                    } else if let Some((s, c)) = t.split_once(',') {
                        subjects.push((s.trim().to_string(), c.trim().to_string()));
                    }
                }
                Section::Object | Section::Live => {
                    // 'a {0} {1} in the jungle'.format(unique_token, class_token),
                    let quote = if t.starts_with('\'') { '\'' } else { '"' };
                    if let Some(rest) = t.strip_prefix(quote) {
                        if let Some(end) = rest.find(quote) {
                            let p = rest[..end].to_string();
                            if section == Section::Object {
                                object_prompts.push(p)
                            } else {
                                live_prompts.push(p)
                            }
                        }
                    }
                }
                Section::None => {}
            }
        }
        if subjects.is_empty() {
            bail!("no 'subject_name,class' table")
        }
        if object_prompts.is_empty() || live_prompts.is_empty() {
            bail!("no 'Object Prompts' or 'Live Subject Prompts' list")
        }
        Ok(Self {
            subjects,
            object_prompts,
            live_prompts,
        })
    }

    pub fn load(data: &Path) -> Result<Self> {
        let path = data.join("prompts_and_classes.txt");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read (the dataset folder of google/dreambooth holds it)",
                path.display()
            )
        })?;
        Self::parse(&text)
            .with_context(|| format!("{}: not a DreamBench prompt file", path.display()))
    }

    /// The prompt templates of a subject's class.
    pub fn prompts_for(&self, class: &str) -> &[String] {
        if LIVE_CLASSES.contains(&class) {
            &self.live_prompts
        } else {
            &self.object_prompts
        }
    }
}

/// A template filled as the generator saw it (`{0}` the unique token, `{1}` the class).
pub fn fill(template: &str, token: &str, class: &str) -> String {
    let s = template.replace("{0}", token).replace("{1}", class);
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The scores of one subject.
#[derive(Clone, Debug, Serialize)]
pub struct SubjectScores {
    pub subject: String,
    pub class: String,
    pub prompts: usize,
    pub images: usize,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    /// Real images against each other (distinct pairs).
    pub real_dino: Option<f64>,
    pub real_clip_i: Option<f64>,
}

/// The protocol's result: means over subjects.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub subjects: usize,
    pub prompts: usize,
    pub images: usize,
    pub missing_prompts: usize,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    pub real_dino: Option<f64>,
    pub real_clip_i: Option<f64>,
    pub per_subject: Vec<SubjectScores>,
}

fn mean(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.into_iter().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Runs the protocol; subjects without samples are skipped, prompts without a folder counted as
/// missing. `progress` is called after each subject.
pub fn run(
    eval: &Evaluator,
    data: &Path,
    samples: &Path,
    mut progress: impl FnMut(&str),
) -> Result<BenchResult> {
    let protocol = Protocol::load(data)?;
    let mut per_subject = Vec::new();
    let mut missing = 0;
    for (subject, class) in &protocol.subjects {
        let sdir = samples.join(subject);
        if !sdir.is_dir() {
            missing += protocol.prompts_for(class).len();
            continue;
        }
        let refs = read_images(&data.join(subject))?;
        let rf: ImageFeatures = eval.features(&refs)?;
        let entries: Vec<_> = std::fs::read_dir(&sdir)
            .with_context(|| format!("{}: cannot read folder", sdir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        let (mut dino, mut clip_i, mut clip_t, mut images, mut prompts) =
            (vec![], vec![], vec![], 0, 0);
        for (i, template) in protocol.prompts_for(class).iter().enumerate() {
            let tag = format!("{i:02}");
            let Some(dir) = entries.iter().find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n == tag
                        || n.starts_with(&format!("{tag}-"))
                        || n.starts_with(&format!("{tag}_"))
                })
            }) else {
                missing += 1;
                continue;
            };
            let files = image_files(dir)?;
            let gen = read_images(dir)?;
            let gf = eval.features(&gen)?;
            let s = eval.score(&gf, &rf, &fill(template, "", class))?;
            dino.push(s.dino);
            clip_i.push(s.clip_i);
            clip_t.push(s.clip_t);
            images += files.len();
            prompts += 1;
        }
        progress(subject);
        if prompts == 0 {
            continue;
        }
        per_subject.push(SubjectScores {
            subject: subject.clone(),
            class: class.clone(),
            prompts,
            images,
            dino: mean(dino).unwrap_or(0.0),
            clip_i: mean(clip_i).unwrap_or(0.0),
            clip_t: mean(clip_t).unwrap_or(0.0),
            real_dino: mean_cosine_distinct(&rf.dino)?,
            real_clip_i: mean_cosine_distinct(&rf.clip)?,
        });
    }
    if per_subject.is_empty() {
        bail!(
            "{}: no samples found (expected <subject>/<NN>/*.png for the subjects of prompts_and_classes.txt)",
            samples.display()
        )
    }
    Ok(BenchResult {
        subjects: per_subject.len(),
        prompts: per_subject.iter().map(|s| s.prompts).sum(),
        images: per_subject.iter().map(|s| s.images).sum(),
        missing_prompts: missing,
        dino: mean(per_subject.iter().map(|s| s.dino)).unwrap_or(0.0),
        clip_i: mean(per_subject.iter().map(|s| s.clip_i)).unwrap_or(0.0),
        clip_t: mean(per_subject.iter().map(|s| s.clip_t)).unwrap_or(0.0),
        real_dino: mean(per_subject.iter().filter_map(|s| s.real_dino)),
        real_clip_i: mean(per_subject.iter().filter_map(|s| s.real_clip_i)),
        per_subject,
    })
}

impl BenchResult {
    /// The paper's Table 1 layout: one row for the real images, one for the samples.
    pub fn table(&self, method: &str) -> String {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "—".into());
        let mut s = format!(
            "DreamBench: {} subjects, {} prompts, {} images ({} prompts missing)\n",
            self.subjects, self.prompts, self.images, self.missing_prompts
        );
        s += &format!(
            "{:<24} {:>7} {:>7} {:>7}\n",
            "method", "DINO", "CLIP-I", "CLIP-T"
        );
        s += &format!(
            "{:<24} {:>7} {:>7} {:>7}\n",
            "Real Images",
            f(self.real_dino),
            f(self.real_clip_i),
            "—"
        );
        s += &format!(
            "{:<24} {:>7.3} {:>7.3} {:>7.3}\n",
            method, self.dino, self.clip_i, self.clip_t
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_dataset_prompt_file() {
        let text = "Classes\nsubject_name,class\nbackpack,backpack\ndog,dog\n\nPrompts\nObject Prompts\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a {0} {1} in the snow'.format(unique_token, class_token),\n]\n\nLive Subject Prompts\nprompt_list = [\n'a {0} {1} wearing a red hat'.format(unique_token, class_token),\n]\n";
        let p = Protocol::parse(text).unwrap();
        assert_eq!(
            p.subjects,
            vec![
                ("backpack".into(), "backpack".into()),
                ("dog".into(), "dog".into())
            ]
        );
        assert_eq!(p.object_prompts.len(), 2);
        assert_eq!(
            p.prompts_for("dog"),
            &["a {0} {1} wearing a red hat".to_string()]
        );
        assert_eq!(
            fill(&p.object_prompts[0], "", "backpack"),
            "a backpack in the jungle"
        );
        assert_eq!(
            fill(&p.object_prompts[0], "sks", "backpack"),
            "a sks backpack in the jungle"
        );
        assert!(Protocol::parse("nothing here").is_err());
    }
}
