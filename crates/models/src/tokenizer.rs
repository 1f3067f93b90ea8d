//! CLIP's byte-level BPE tokenizer, matching Hugging Face transformers 5.24's `CLIPTokenizer`
//! (`transformers/models/clip/tokenization_clip.py`) token for token.
//!
//! In transformers 5 `CLIPTokenizer` is a `tokenizers`-backed class whose `__init__` always builds
//! the same pipeline around the vocabulary and merges it loads (from `vocab.json` + `merges.txt`, or
//! extracted from a `tokenizer.json`, whose own normalizer / pre-tokenizer are ignored):
//!
//! 1. **Added tokens** are cut out first, leftmost-longest (tokenizers' `AddedVocabulary`):
//!    those with `normalized: false` (special tokens given as strings; `<|endoftext|>` and an SD 2.x
//!    `!` pad in the SD repos) are matched on the raw text, then the remaining pieces are normalized
//!    and those with `normalized: true` (`<|startoftext|>` in the SD repos, and tokens registered
//!    with `add_tokens`, e.g. a textual-inversion placeholder) are matched on the normalized text,
//!    so `<|STARTOFTEXT|>` is BOS but `<|ENDOFTEXT|>` is BPE'd. They match anywhere, even inside
//!    words (`"tasks"` with an added `"sks"` gives `ta</w>`, `sks`). How the flags come out of the
//!    config files is described at [`ClipTokenizer::from_dir`].
//! 2. **Normalizer**: `NFC`, then `Replace(\s+, " ")`, then `Lowercase` (char by char, so a final
//!    `Σ` becomes `σ`, not `ς`, and `İ` becomes `i` + U+0307 which is not re-composed).
//!    There is no ftfy and no BasicTokenizer fallback in transformers 5 (the slow tokenizer is gone),
//!    so none is applied here either: no HTML unescaping, no mojibake repair, no accent stripping.
//! 3. **Pre-tokenizer**: `Split` keeping only the matches of
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    (whitespace and nothing else is dropped; every digit is its own word), then `ByteLevel`
//!    (`add_prefix_space: false`, `use_regex: true`): GPT-2's split is applied again to each piece —
//!    a no-op except on a lowercased `<|ENDOFTEXT|>` that escaped the special-token match, which it
//!    cuts into `<|`, `endoftext`, `|>` — and every UTF-8 byte is mapped to its printable stand-in.
//! 4. **BPE** with `end_of_word_suffix: "</w>"`: a word's last symbol carries `</w>`; the adjacent
//!    pair of lowest merge rank (leftmost on ties) is merged until no pair has a rank.
//! 5. **Post-processor** `RobertaProcessing`: `<|startoftext|>` + ids + `<|endoftext|>`; the
//!    pipelines then truncate to `model_max_length` (keeping the EOS last) and pad with the pad id
//!    (`<|endoftext|>` for SD 1.x, `!` = id 0 for SD 2.x; the latter makes a literal `!` in a prompt
//!    the special token id 0 rather than BPE's `!</w>`).
//!
//! [`write_clip_tokenizer`] writes the real 49,408-token vocabulary from the shipped
//! `bpe_simple_vocab_16e6.txt.gz`, built as CLIP's / open_clip's `SimpleTokenizer` does.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

/// The BPE merges CLIP was trained with (OpenAI's `bpe_simple_vocab_16e6.txt.gz`).
const BPE_MERGES_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// CLIP keeps the first 49152 - 256 - 2 merges of the file so that the vocabulary is 49,408 tokens.
const CLIP_NUM_MERGES: usize = 49152 - 256 - 2;
const END_OF_WORD: &str = "</w>";
const BOS_TOKEN: &str = "<|startoftext|>";
const EOS_TOKEN: &str = "<|endoftext|>";
const DEFAULT_MAX_LENGTH: usize = 77;
/// Bound on the BPE cache so that a long-running process fed arbitrary text stays small
/// (tokenizers' own cache has the same kind of cap).
const CACHE_CAPACITY: usize = 10_000;

/// The pre-tokenizer's split of transformers' `CLIPTokenizer` (its matches are the words).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's split as `ByteLevel(use_regex=True)` applies it, without its whitespace alternatives:
/// the pieces it sees come out of [`CLIP_SPLIT_PATTERN`] and never contain whitespace.
const BYTE_LEVEL_SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// A BPE merge: the left and right symbols whose concatenation is a vocabulary token.
pub type Merge = (String, String);

/// A token matched whole before BPE (tokenizers' `AddedToken`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedToken {
    pub content: String,
    pub id: u32,
    /// Matched on the normalized (NFC, lowercased) text rather than the raw text.
    pub normalized: bool,
    pub special: bool,
}

/// A special or added token as transformers holds it before adding it to the backend: a plain
/// string (added as special, not normalized) or an `AddedToken` with its flags. Equality is
/// transformers' (strings by content, AddedTokens by content and every flag): it decides which
/// repeated settings are skipped.
#[derive(Debug, Clone, PartialEq)]
enum TokenSetting {
    Text(String),
    Token {
        content: String,
        normalized: bool,
        special: bool,
        lstrip: bool,
        rstrip: bool,
        single_word: bool,
    },
}

impl TokenSetting {
    /// Parses a string or an AddedToken object (`special_tokens_map.json` values are made
    /// special, as transformers does; `normalized` defaults to `!special`).
    fn parse(v: &Value, force_special: bool) -> Option<Self> {
        match v {
            Value::String(s) => Some(TokenSetting::Text(s.clone())),
            Value::Object(o) => {
                let flag = |k: &str| o.get(k).and_then(Value::as_bool);
                let special = force_special || flag("special").unwrap_or(false);
                Some(TokenSetting::Token {
                    content: o.get("content")?.as_str()?.to_string(),
                    normalized: flag("normalized").unwrap_or(!special),
                    special,
                    lstrip: flag("lstrip").unwrap_or(false),
                    rstrip: flag("rstrip").unwrap_or(false),
                    single_word: flag("single_word").unwrap_or(false),
                })
            }
            _ => None,
        }
    }

    fn content(&self) -> &str {
        match self {
            TokenSetting::Text(s) => s,
            TokenSetting::Token { content, .. } => content,
        }
    }

    /// (normalized, special) once added.
    fn flags(&self) -> (bool, bool) {
        match self {
            TokenSetting::Text(_) => (false, true),
            TokenSetting::Token {
                normalized,
                special,
                ..
            } => (*normalized, *special),
        }
    }
}

/// Where a piece of text stands after added tokens have been cut out.
enum Segment<'a> {
    Text(&'a str),
    Added(u32),
}

#[derive(Clone)]
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    added: Vec<AddedToken>,
    /// Patterns of the added tokens matched on the raw text, and on the normalized text.
    raw_patterns: Vec<(String, u32)>,
    normalized_patterns: Vec<(String, u32)>,
    byte_encoder: [char; 256],
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    model_max_length: usize,
    whitespace: Regex,
    clip_split: Regex,
    byte_level_split: Regex,
    cache: BpeCache,
}

/// Words already split by BPE; a clone starts with a copy of the entries.
#[derive(Default)]
struct BpeCache(Mutex<HashMap<String, Vec<u32>>>);

impl Clone for BpeCache {
    fn clone(&self) -> Self {
        let entries = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Self(Mutex::new(entries))
    }
}

impl std::ops::Deref for BpeCache {
    type Target = Mutex<HashMap<String, Vec<u32>>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("added", &self.added)
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

/// GPT-2's reversible byte -> printable char table (`bytes_to_unicode`): printable Latin-1 bytes
/// stand for themselves, the others are shifted to U+0100 onwards in byte order.
pub fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

/// CLIP's vocabulary (in id order) and merges (in rank order), as `SimpleTokenizer` builds them:
/// the 256 byte chars in `bytes_to_unicode` order, the same with `</w>`, the first 48,894 merges
/// joined, then `<|startoftext|>` and `<|endoftext|>`.
pub fn clip_vocab_and_merges() -> Result<(Vec<String>, Vec<Merge>)> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(BPE_MERGES_GZ)
        .read_to_string(&mut text)
        .context("bpe_simple_vocab_16e6.txt.gz: cannot decompress")?;
    // The first line is a header; merges follow one per line.
    let merges = text
        .split('\n')
        .skip(1)
        .take(CLIP_NUM_MERGES)
        .enumerate()
        .map(
            |(i, line)| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [a, b] => Ok((a.to_string(), b.to_string())),
                _ => Err(anyhow!(
                    "bpe_simple_vocab_16e6.txt.gz: line {}: expected two symbols, got {line:?}",
                    i + 2
                )),
            },
        )
        .collect::<Result<Vec<_>>>()?;
    if merges.len() != CLIP_NUM_MERGES {
        bail!(
            "bpe_simple_vocab_16e6.txt.gz: expected {CLIP_NUM_MERGES} merges, found {}",
            merges.len()
        );
    }
    // `bytes_to_unicode().values()` order: the printable bytes, then the shifted ones, which is
    // exactly code point order of the stand-in chars.
    let mut bytes = bytes_to_unicode();
    bytes.sort_unstable();
    let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    vocab.extend(bytes.iter().map(|c| format!("{c}{END_OF_WORD}")));
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push(BOS_TOKEN.to_string());
    vocab.push(EOS_TOKEN.to_string());
    Ok((vocab, merges))
}

/// The special tokens of a CLIP tokenizer with their `normalized` flag and id, as the SD repos
/// record them: `<|startoftext|>` is matched after normalization (so also `<|STARTOFTEXT|>`),
/// `<|endoftext|>` and an SD 2.x `!` pad on the raw text. These flags are what transformers' rules
/// make of the original SD uploads' files (see [`ClipTokenizer::from_dir`]); the repos re-saved
/// since carry them explicitly.
fn clip_special_tokens(vocab: &[String], pad_token: &str) -> Result<Vec<(String, bool, usize)>> {
    let mut tokens = Vec::new();
    if pad_token != EOS_TOKEN {
        let id = vocab
            .iter()
            .position(|t| t == pad_token)
            .ok_or_else(|| anyhow!("pad token {pad_token:?} is not in the CLIP vocabulary"))?;
        tokens.push((pad_token.to_string(), false, id));
    }
    tokens.push((BOS_TOKEN.to_string(), true, vocab.len() - 2));
    tokens.push((EOS_TOKEN.to_string(), false, vocab.len() - 1));
    Ok(tokens)
}

fn added_token_json(content: &str, normalized: bool) -> serde_json::Map<String, Value> {
    let Value::Object(map) = serde_json::json!({"content": content, "lstrip": false,
        "normalized": normalized, "rstrip": false, "single_word": false})
    else {
        unreachable!()
    };
    map
}

/// `tokenizer_config.json` as the SD repos have it; with `added_tokens_decoder` (the tokens'
/// flags) unless `with_decoder` is false, as transformers 5's `save_pretrained` writes it.
fn tokenizer_config_json(
    specials: &[(String, bool, usize)],
    pad_token: &str,
    with_decoder: bool,
) -> Value {
    let mut config = serde_json::json!({
        "add_prefix_space": false,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": true,
        "do_lower_case": true,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": DEFAULT_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS_TOKEN,
    });
    if with_decoder {
        let decoder: serde_json::Map<String, Value> = specials
            .iter()
            .map(|(content, normalized, id)| {
                let mut token = added_token_json(content, *normalized);
                token.insert("special".into(), Value::Bool(true));
                (id.to_string(), Value::Object(token))
            })
            .collect();
        config["added_tokens_decoder"] = Value::Object(decoder);
    }
    config
}

fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes a complete diffusers `tokenizer/` folder (`vocab.json`, `merges.txt`,
/// `tokenizer_config.json`, `special_tokens_map.json`) with the real CLIP vocabulary.
/// `pad_token` is `"<|endoftext|>"` (SD 1.x) or `"!"` (SD 2.x).
pub fn write_clip_tokenizer(dir: &Path, pad_token: &str) -> Result<()> {
    let (vocab, merges) = clip_vocab_and_merges()?;
    write_clip_tokenizer_with(dir, pad_token, &vocab, &merges)
}

/// CLIP's vocabulary cut down to what `words` need: the 512 byte tokens, the merges CLIP's BPE
/// applies to those words (in their original rank order) and the two special tokens. The words
/// tokenize exactly as with the full vocabulary (BPE takes the lowest-ranked merge present at
/// each step; every merge it took is kept, in the same order), and any other text still
/// tokenizes, in smaller pieces. A small world's text encoder needs a few hundred rows, not 49,408.
pub fn pruned_clip_vocab_and_merges(words: &[&str]) -> Result<(Vec<String>, Vec<Merge>)> {
    let (full_vocab, merges) = clip_vocab_and_merges()?;
    let rank: HashMap<(&str, &str), usize> = merges
        .iter()
        .enumerate()
        .map(|(i, (a, b))| ((a.as_str(), b.as_str()), i))
        .collect();
    let mut used = std::collections::BTreeSet::new();
    for word in words {
        let chars: Vec<char> = word.to_lowercase().chars().collect();
        if chars.is_empty() {
            continue;
        }
        let mut symbols: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str(END_OF_WORD);
        }
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|w| rank.get(&(w[0].as_str(), w[1].as_str())).copied())
                .min();
            let Some(r) = best else { break };
            used.insert(r);
            let (a, b) = &merges[r];
            let mut next = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && &symbols[i] == a && &symbols[i + 1] == b {
                    next.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    next.push(symbols[i].clone());
                    i += 1;
                }
            }
            symbols = next;
        }
    }
    let kept: Vec<Merge> = used.iter().map(|&r| merges[r].clone()).collect();
    let mut vocab: Vec<String> = full_vocab[..512].to_vec();
    vocab.extend(kept.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push(BOS_TOKEN.to_string());
    vocab.push(EOS_TOKEN.to_string());
    Ok((vocab, kept))
}

/// [`write_clip_tokenizer`] with a given vocabulary (in id order, the special tokens last) and
/// merges (in rank order).
pub fn write_clip_tokenizer_with(
    dir: &Path,
    pad_token: &str,
    vocab: &[String],
    merges: &[Merge],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    // vocab.json in id order (serde_json's map would sort the keys).
    let mut json = String::from("{");
    for (id, token) in vocab.iter().enumerate() {
        if id > 0 {
            json.push(',');
        }
        json.push_str(&serde_json::to_string(token)?);
        json.push(':');
        json.push_str(&id.to_string());
    }
    json.push('}');
    write_file(&dir.join("vocab.json"), json.as_bytes())?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in merges {
        text.push_str(a);
        text.push(' ');
        text.push_str(b);
        text.push('\n');
    }
    write_file(&dir.join("merges.txt"), text.as_bytes())?;
    let specials = clip_special_tokens(vocab, pad_token)?;
    write_file(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tokenizer_config_json(&specials, pad_token, true))?
            .as_bytes(),
    )?;
    // For readers of the older format; transformers ignores it when the config has
    // `added_tokens_decoder`.
    let flags = |content: &str| {
        specials
            .iter()
            .find(|t| t.0 == content)
            .is_some_and(|t| t.1)
    };
    let special = serde_json::json!({
        "bos_token": added_token_json(BOS_TOKEN, flags(BOS_TOKEN)),
        "eos_token": added_token_json(EOS_TOKEN, flags(EOS_TOKEN)),
        "pad_token": pad_token,
        "unk_token": added_token_json(EOS_TOKEN, flags(EOS_TOKEN)),
    });
    write_file(
        &dir.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&special)?.as_bytes(),
    )?;
    Ok(())
}

/// Writes the tokenizer as transformers 5's `save_pretrained` does: a `tokenizer.json` (HF fast
/// format, the full pipeline described in the module doc) and a `tokenizer_config.json`.
pub fn write_clip_tokenizer_fast(dir: &Path, pad_token: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let (vocab, merges) = clip_vocab_and_merges()?;
    let vocab_map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), Value::from(i as u64)))
        .collect();
    let merges: Vec<Value> = merges
        .iter()
        .map(|(a, b)| serde_json::json!([a, b]))
        .collect();
    let specials = clip_special_tokens(&vocab, pad_token)?;
    let added: Vec<Value> = specials
        .iter()
        .map(|(content, normalized, id)| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": normalized, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_PATTERN}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS_TOKEN, vocab.len() - 1],
            "cls": [BOS_TOKEN, vocab.len() - 2], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": EOS_TOKEN, "continuing_subword_prefix": "",
            "end_of_word_suffix": END_OF_WORD, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab_map, "merges": merges},
    });
    write_file(
        &dir.join("tokenizer.json"),
        serde_json::to_string(&tokenizer)?.as_bytes(),
    )?;
    write_file(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tokenizer_config_json(&specials, pad_token, false))?
            .as_bytes(),
    )?;
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

fn read_json_optional(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn parse_vocab(v: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    let map = v
        .as_object()
        .ok_or_else(|| anyhow!("{}: vocabulary is not a JSON object", path.display()))?;
    map.iter()
        .map(|(token, id)| {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| {
                    anyhow!(
                        "{}: id of {token:?} is not a valid token id",
                        path.display()
                    )
                })?;
            Ok((token.clone(), id))
        })
        .collect()
}

/// `merges.txt`: an optional `#version` header, then one `left right` pair per line in rank order.
fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [a, b] => merges.push((a.to_string(), b.to_string())),
            _ => bail!(
                "{}: line {}: expected two symbols separated by a space, got {line:?}",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(merges)
}

/// Merges in a `tokenizer.json`: `"a b"` strings (older files) or `["a", "b"]` pairs.
fn parse_merges_json(v: &Value, path: &Path) -> Result<Vec<(String, String)>> {
    let list = v
        .as_array()
        .ok_or_else(|| anyhow!("{}: model.merges is not a list", path.display()))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let pair = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                    (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| {
                anyhow!(
                    "{}: model.merges[{i}] is not a pair of symbols: {m}",
                    path.display()
                )
            })
        })
        .collect()
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder as transformers 5's `CLIPTokenizer.from_pretrained`
    /// does: `tokenizer.json` when present (only its vocabulary, merges and added tokens are used,
    /// the pipeline being fixed), else `vocab.json` + `merges.txt`; `tokenizer_config.json` and
    /// `special_tokens_map.json`, when present, give bos/eos/unk/pad (defaults: CLIP's),
    /// `model_max_length` (default 77) and the added tokens.
    ///
    /// Which special tokens are matched before or after normalization follows transformers' rules:
    /// with an `added_tokens_decoder` in `tokenizer_config.json`, its flags; otherwise (legacy
    /// files) the special-token settings (`special_tokens_map.json` over `tokenizer_config.json`,
    /// a plain string meaning "not normalized") are taken in the order bos, eos, unk, pad, an
    /// exact repeat of an earlier setting skipped, and for one content the last setting wins.
    /// (So the original SD 2.x files, pad `"!"`, match `<|ENDOFTEXT|>` as EOS; SD 1.x's don't.)
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: tokenizer folder not found", dir.display());
        }
        let tokenizer_json = dir.join("tokenizer.json");
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let config_path = dir.join("tokenizer_config.json");
        let special_map_path = dir.join("special_tokens_map.json");
        let config = read_json_optional(&config_path)?;
        let special_map = read_json_optional(&special_map_path)?;
        let saved_decoder = config
            .as_ref()
            .and_then(|c| c.get("added_tokens_decoder"))
            .map(|d| {
                d.as_object().ok_or_else(|| {
                    anyhow!(
                        "{}: added_tokens_decoder is not an object",
                        config_path.display()
                    )
                })
            })
            .transpose()?;
        let legacy = saved_decoder.is_none();

        // Tokens with explicit flags, by id: the config's decoder, or (legacy) tokenizer.json's.
        let mut flagged: std::collections::BTreeMap<u32, TokenSetting> = Default::default();
        let (encoder, merges, merges_source) = if tokenizer_json.is_file() {
            let json = read_json(&tokenizer_json)?;
            let model = json
                .get("model")
                .ok_or_else(|| anyhow!("{}: no \"model\"", tokenizer_json.display()))?;
            match model.get("type").and_then(Value::as_str) {
                Some("BPE") | None => {}
                Some(other) => bail!(
                    "{}: model type {other:?} is not CLIP's BPE",
                    tokenizer_json.display()
                ),
            }
            let vocab = parse_vocab(
                model
                    .get("vocab")
                    .ok_or_else(|| anyhow!("{}: no model.vocab", tokenizer_json.display()))?,
                &tokenizer_json,
            )?;
            let merges = parse_merges_json(
                model
                    .get("merges")
                    .ok_or_else(|| anyhow!("{}: no model.merges", tokenizer_json.display()))?,
                &tokenizer_json,
            )?;
            if legacy {
                for t in json
                    .get("added_tokens")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let (Some(setting), Some(id)) = (
                        TokenSetting::parse(t, false),
                        t.get("id")
                            .and_then(Value::as_u64)
                            .and_then(|i| u32::try_from(i).ok()),
                    ) else {
                        bail!("{}: malformed added token {t}", tokenizer_json.display());
                    };
                    flagged.insert(id, setting);
                }
            }
            (vocab, merges, tokenizer_json.clone())
        } else if vocab_path.is_file() {
            if !merges_path.is_file() {
                bail!(
                    "{}: not found (needed with {})",
                    merges_path.display(),
                    vocab_path.display()
                );
            }
            let vocab = parse_vocab(&read_json(&vocab_path)?, &vocab_path)?;
            let text = std::fs::read_to_string(&merges_path)
                .with_context(|| format!("{}: cannot read", merges_path.display()))?;
            (
                vocab,
                parse_merges_txt(&text, &merges_path)?,
                merges_path.clone(),
            )
        } else {
            bail!(
                "{}: no tokenizer.json nor vocab.json + merges.txt",
                dir.display()
            );
        };

        // The special-token settings; in legacy files special_tokens_map.json overrides.
        let settings: Vec<(&str, TokenSetting)> = [
            ("bos_token", BOS_TOKEN),
            ("eos_token", EOS_TOKEN),
            ("unk_token", EOS_TOKEN),
            ("pad_token", EOS_TOKEN),
        ]
        .into_iter()
        .map(|(key, default)| {
            let from_config = config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(|v| TokenSetting::parse(v, false));
            let from_map = if legacy {
                special_map
                    .as_ref()
                    .and_then(|m| m.get(key))
                    .and_then(|v| TokenSetting::parse(v, true))
            } else {
                None
            };
            let setting = from_map
                .or(from_config)
                .unwrap_or_else(|| TokenSetting::Text(default.to_string()));
            (key, setting)
        })
        .collect();

        if let Some(decoder) = saved_decoder {
            for (id, t) in decoder {
                let id: u32 = id.parse().with_context(|| {
                    format!(
                        "{}: added_tokens_decoder key {id:?} is not an id",
                        config_path.display()
                    )
                })?;
                let setting = TokenSetting::parse(t, false)
                    .filter(|s| matches!(s, TokenSetting::Token { .. }));
                let setting = setting.ok_or_else(|| {
                    anyhow!("{}: malformed added token {t}", config_path.display())
                })?;
                flagged.insert(id, setting);
            }
        } else {
            // Older saves (transformers 4, diffusers textual inversion) keep user tokens here.
            let added_tokens_path = dir.join("added_tokens.json");
            if let Some(v) = read_json_optional(&added_tokens_path)? {
                for (content, id) in parse_vocab(&v, &added_tokens_path)? {
                    let special = settings.iter().any(|(_, s)| s.content() == content);
                    flagged.entry(id).or_insert(TokenSetting::Token {
                        content,
                        normalized: !special,
                        special,
                        lstrip: false,
                        rstrip: false,
                        single_word: false,
                    });
                }
            }
        }

        // A missing or "unbounded" (transformers writes 1e30) model_max_length means CLIP's 77.
        let model_max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_u64)
            .filter(|&n| n <= 1 << 20)
            .map(|n| n as usize)
            .unwrap_or(DEFAULT_MAX_LENGTH);
        if model_max_length < 2 {
            bail!(
                "{}: model_max_length {model_max_length} leaves no room for bos and eos",
                config_path.display()
            );
        }

        let mut tok = ClipTokenizer {
            decoder: encoder.iter().map(|(t, &i)| (i, t.clone())).collect(),
            merges: HashMap::with_capacity(merges.len()),
            encoder,
            added: Vec::new(),
            raw_patterns: Vec::new(),
            normalized_patterns: Vec::new(),
            byte_encoder: bytes_to_unicode(),
            bos_id: 0,
            eos_id: 0,
            pad_id: 0,
            unk_id: 0,
            model_max_length,
            whitespace: Regex::new(r"\s+").expect("valid regex"),
            clip_split: Regex::new(CLIP_SPLIT_PATTERN).expect("valid regex"),
            byte_level_split: Regex::new(BYTE_LEVEL_SPLIT_PATTERN).expect("valid regex"),
            cache: BpeCache::default(),
        };
        for (rank, (a, b)) in merges.iter().enumerate() {
            let id = |s: &str| {
                tok.encoder.get(s).copied().ok_or_else(|| {
                    anyhow!(
                        "{}: merge {} ({a} {b}) uses {s:?}, which is not in the vocabulary",
                        merges_source.display(),
                        rank + 1
                    )
                })
            };
            let key = (id(a)?, id(b)?);
            let merged = id(&format!("{a}{b}"))?;
            // The first occurrence of a pair defines its rank, as in tokenizers.
            tok.merges.entry(key).or_insert((rank as u32, merged));
        }

        // Stripping neighbouring spaces / whole-word matching are not implemented: no SD
        // tokenizer uses them, so refuse rather than tokenize differently.
        for setting in flagged.values().chain(settings.iter().map(|(_, s)| s)) {
            if let TokenSetting::Token {
                lstrip,
                rstrip,
                single_word,
                content,
                ..
            } = setting
            {
                if *lstrip || *rstrip || *single_word {
                    bail!(
                        "{}: added token {content:?} uses lstrip/rstrip/single_word, which imprint's CLIP tokenizer does not support",
                        dir.display()
                    );
                }
            }
        }
        // As transformers adds them: the flagged tokens in id order, then the special-token
        // settings whose content is not among them, an exact repeat skipped.
        let flagged_contents: Vec<String> =
            flagged.values().map(|s| s.content().to_string()).collect();
        for setting in flagged.into_values() {
            tok.upsert_added(&setting);
        }
        let mut pending: Vec<&TokenSetting> = Vec::new();
        for (_, setting) in &settings {
            if !flagged_contents.iter().any(|c| c == setting.content())
                && !pending.contains(&setting)
            {
                pending.push(setting);
            }
        }
        for setting in pending {
            tok.upsert_added(setting);
        }
        let source = if legacy && special_map_path.is_file() {
            &special_map_path
        } else {
            &config_path
        };
        let mut ids = [0u32; 4];
        for (slot, (key, setting)) in ids.iter_mut().zip(&settings) {
            *slot = tok.token_id(setting.content()).ok_or_else(|| {
                anyhow!(
                    "{}: {key} {:?} is not in the vocabulary",
                    source.display(),
                    setting.content()
                )
            })?;
        }
        let [bos_id, eos_id, unk_id, pad_id] = ids;
        Ok(ClipTokenizer {
            bos_id,
            eos_id,
            unk_id,
            pad_id,
            ..tok
        })
    }

    /// Adds a token as tokenizers' `add_tokens` does: a content already added keeps its id and
    /// takes the new flags (the last setting wins); a new one takes its vocabulary id if it has one,
    /// else the next free id.
    fn upsert_added(&mut self, setting: &TokenSetting) {
        let content = setting.content();
        if content.is_empty() {
            return;
        }
        let (normalized, special) = setting.flags();
        if let Some(existing) = self.added.iter_mut().find(|t| t.content == content) {
            existing.normalized = normalized;
            existing.special = special;
        } else {
            let id = self
                .encoder
                .get(content)
                .copied()
                .unwrap_or(self.vocab_size() as u32);
            self.decoder
                .entry(id)
                .or_insert_with(|| content.to_string());
            self.added.push(AddedToken {
                content: content.to_string(),
                id,
                normalized,
                special,
            });
        }
        self.rebuild_patterns();
    }

    fn rebuild_patterns(&mut self) {
        // A normalized token is matched on normalized text, so its own content is normalized
        // first (tokenizers does the same): "<My-Toy>" then matches "<my-toy>" and "<MY-TOY>".
        let (normalized, raw): (Vec<_>, Vec<_>) = self.added.iter().partition(|t| t.normalized);
        let normalized: Vec<(String, u32)> = normalized
            .iter()
            .map(|t| (self.normalize(&t.content), t.id))
            .collect();
        let raw: Vec<(String, u32)> = raw.iter().map(|t| (t.content.clone(), t.id)).collect();
        self.normalized_patterns = normalized;
        self.raw_patterns = raw;
    }

    /// Registers a new token (a textual-inversion placeholder such as `"<my-toy>"`) as
    /// transformers' `add_tokens` does: not special, normalized, matched whole before BPE, even
    /// inside words. Returns its id, the current vocabulary size. Errors if the token exists.
    pub fn add_token(&mut self, token: &str) -> Result<u32> {
        if token.is_empty() {
            bail!("cannot add an empty token");
        }
        if self.token_id(token).is_some() {
            bail!("token {token:?} already exists in the tokenizer; choose another placeholder");
        }
        self.upsert_added(&TokenSetting::Token {
            content: token.to_string(),
            normalized: true,
            special: false,
            lstrip: false,
            rstrip: false,
            single_word: false,
        });
        self.token_id(token)
            .ok_or_else(|| anyhow!("token {token:?} was not added"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.added
            .iter()
            .find(|t| t.content == token)
            .map(|t| t.id)
            .or_else(|| self.encoder.get(token).copied())
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.decoder.get(&id).map(String::as_str)
    }

    /// Number of ids, added tokens included (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.decoder.keys().max().map_or(0, |&m| m as usize + 1)
    }

    pub fn added_tokens(&self) -> &[AddedToken] {
        &self.added
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// Ids as the diffusers pipelines call the tokenizer
    /// (`padding="max_length", max_length=model_max_length, truncation=True`):
    /// BOS + tokens + EOS, the tokens truncated so that EOS stays last, padded with the pad id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut tokens = self.tokenize(text);
        tokens.truncate(self.model_max_length - 2);
        let mut ids = Vec::with_capacity(self.model_max_length);
        ids.push(self.bos_id);
        ids.extend(tokens);
        ids.push(self.eos_id);
        ids.resize(self.model_max_length, self.pad_id);
        Ok(ids)
    }

    /// BOS + tokens + EOS with neither truncation nor padding (to detect prompts over the limit).
    pub fn encode_unpadded(&self, text: &str) -> Result<Vec<u32>> {
        let tokens = self.tokenize(text);
        let mut ids = Vec::with_capacity(tokens.len() + 2);
        ids.push(self.bos_id);
        ids.extend(tokens);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// Token ids of `text` without the special tokens the post-processor adds.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for segment in split_added(text, &self.raw_patterns) {
            match segment {
                Segment::Added(id) => ids.push(id),
                Segment::Text(raw) => {
                    let normalized = self.normalize(raw);
                    for segment in split_added(&normalized, &self.normalized_patterns) {
                        match segment {
                            Segment::Added(id) => ids.push(id),
                            Segment::Text(piece) => self.tokenize_normalized(piece, &mut ids),
                        }
                    }
                }
            }
        }
        ids
    }

    /// NFC, runs of whitespace to one space, then lowercase char by char (tokenizers'
    /// `Lowercase` maps each char on its own: no final-sigma rule, unlike `str::to_lowercase`).
    fn normalize(&self, text: &str) -> String {
        let nfc: String = text.nfc().collect();
        self.whitespace
            .replace_all(&nfc, " ")
            .chars()
            .flat_map(char::to_lowercase)
            .collect()
    }

    fn tokenize_normalized(&self, text: &str, ids: &mut Vec<u32>) {
        for word in self.clip_split.find_iter(text) {
            for piece in self.byte_level_split.find_iter(word.as_str()) {
                let mapped: String = piece
                    .as_str()
                    .bytes()
                    .map(|b| self.byte_encoder[b as usize])
                    .collect();
                ids.extend(self.bpe(&mapped));
            }
        }
    }

    /// BPE of one byte-mapped word: its chars, the last one carrying `</w>`, merged by rank.
    fn bpe(&self, word: &str) -> Vec<u32> {
        if let Some(ids) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(word)
        {
            return ids.clone();
        }
        let chars: Vec<char> = word.chars().collect();
        let mut symbols: Vec<u32> = chars
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let symbol = if i + 1 == chars.len() {
                    format!("{c}{END_OF_WORD}")
                } else {
                    c.to_string()
                };
                // Byte-level chars are all in CLIP's vocabulary; an unknown one becomes unk, unfused.
                self.encoder.get(&symbol).copied().unwrap_or(self.unk_id)
            })
            .collect();
        // Merging the leftmost pair of lowest rank one at a time gives the same result as
        // tokenizers' priority queue ordered by (rank, position).
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(rank, id)| (rank, i, id))
                })
                .min();
            match best {
                Some((_, i, id)) => {
                    symbols[i] = id;
                    symbols.remove(i + 1);
                }
                None => break,
            }
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() < CACHE_CAPACITY {
            cache.insert(word.to_string(), symbols.clone());
        }
        symbols
    }
}

/// Cuts `text` at the added tokens, leftmost-longest as tokenizers' Aho-Corasick matcher does.
fn split_added<'a>(text: &'a str, patterns: &[(String, u32)]) -> Vec<Segment<'a>> {
    if patterns.is_empty() {
        return vec![Segment::Text(text)];
    }
    let mut segments = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let longest = patterns
            .iter()
            .filter(|(p, _)| rest.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len());
        if let Some((p, id)) = longest {
            if start < pos {
                segments.push(Segment::Text(&text[start..pos]));
            }
            segments.push(Segment::Added(*id));
            pos += p.len();
            start = pos;
        } else {
            pos += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    if start < text.len() {
        segments.push(Segment::Text(&text[start..]));
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd1() -> (tempfile::TempDir, ClipTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        write_clip_tokenizer(dir.path(), EOS_TOKEN).unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        (dir, tok)
    }

    #[test]
    fn vocabulary_and_special_ids() {
        let (_dir, tok) = sd1();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!(tok.bos_id(), 49406);
        assert_eq!(tok.eos_id(), 49407);
        assert_eq!(tok.pad_id(), 49407);
        assert_eq!(tok.model_max_length(), 77);
        assert_eq!(tok.token_id("a</w>"), Some(320));
        assert_eq!(tok.id_to_token(49406), Some(BOS_TOKEN));
        assert_eq!(
            tok.encode_unpadded("a photo of a cat").unwrap(),
            vec![49406, 320, 1125, 539, 320, 2368, 49407]
        );
    }

    #[test]
    fn sd2_pad_is_exclamation_mark() {
        let dir = tempfile::tempdir().unwrap();
        write_clip_tokenizer(dir.path(), "!").unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.pad_id(), 0);
        let ids = tok.encode("hi").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(&ids[..4], &[49406, 1883, 49407, 0]);
    }

    #[test]
    fn add_token_gets_next_id_and_rejects_existing() {
        let (_dir, mut tok) = sd1();
        assert_eq!(tok.add_token("<my-toy>").unwrap(), 49408);
        assert_eq!(tok.vocab_size(), 49409);
        assert_eq!(tok.id_to_token(49408), Some("<my-toy>"));
        assert!(tok.add_token("<my-toy>").is_err());
        assert!(tok.add_token("cat</w>").is_err());
        assert!(tok.add_token(EOS_TOKEN).is_err());
        assert_eq!(
            tok.encode_unpadded("<my-toy>s").unwrap(),
            vec![49406, 49408, 338, 49407]
        );
    }

    #[test]
    fn missing_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipTokenizer::from_dir(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("vocab.json"), "{err}");
        write_clip_tokenizer(dir.path(), EOS_TOKEN).unwrap();
        std::fs::remove_file(dir.path().join("merges.txt")).unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("merges.txt"), "{err}");
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\ni n x\n").unwrap();
        let err = format!("{:#}", ClipTokenizer::from_dir(dir.path()).unwrap_err());
        assert!(err.contains("merges.txt: line 2"), "{err}");
        std::fs::write(dir.path().join("vocab.json"), "{").unwrap();
        let err = format!("{:#}", ClipTokenizer::from_dir(dir.path()).unwrap_err());
        assert!(err.contains("vocab.json: invalid JSON"), "{err}");
    }

    #[test]
    fn unsupported_added_token_flags_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_clip_tokenizer(dir.path(), EOS_TOKEN).unwrap();
        let config = serde_json::json!({"added_tokens_decoder": {"49408": {"content": "<x>",
            "lstrip": true, "normalized": true, "rstrip": false, "single_word": false, "special": false}}});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("lstrip"), "{err}");
    }

    #[test]
    fn truncation_keeps_eos_last() {
        let (_dir, tok) = sd1();
        let text = "word ".repeat(100);
        let ids = tok.encode(&text).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], 49407);
        assert_eq!(tok.encode_unpadded(&text).unwrap().len(), 102);
    }
}
