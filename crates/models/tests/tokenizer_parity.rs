//! Token ids against transformers 5.24's `CLIPTokenizer` (fixture written by
//! `tools/reference/tokenizer.py`), for both folder formats and both pad settings.

use std::path::Path;

use imprint_models::tokenizer::{
    clip_vocab_and_merges, write_clip_tokenizer, write_clip_tokenizer_fast, ClipTokenizer,
};
use serde_json::Value;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Cases use either no added tokens (`base`) or the fixture's whole list (`with_added`).
fn check(base: &ClipTokenizer, with_added: &ClipTokenizer, pad_key: &str) {
    let fixture = fixture();
    let added_ids = ids(&fixture["added_ids"]);
    let mut failures = Vec::new();
    let cases = fixture["cases"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let added: Vec<String> = case["added"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        let tok = if added.is_empty() { base } else { with_added };
        for (token, id) in added.iter().zip(&added_ids) {
            assert_eq!(tok.token_id(token), Some(*id), "{token}");
        }
        let got = tok.encode(text).unwrap();
        if got != ids(&case[pad_key]) {
            failures.push(format!(
                "{pad_key} {text:?}:\n  got      {got:?}\n  expected {:?}",
                ids(&case[pad_key])
            ));
        }
        let got = tok.encode_unpadded(text).unwrap();
        if pad_key == "sd1" && got != ids(&case["unpadded"]) {
            failures.push(format!(
                "unpadded {text:?}:\n  got      {got:?}\n  expected {:?}",
                ids(&case["unpadded"])
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn run(fast: bool, pad: &str, pad_key: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_dir = dir.path().join("tokenizer");
    if fast {
        write_clip_tokenizer_fast(&tokenizer_dir, pad).unwrap();
        assert!(!tokenizer_dir.join("vocab.json").exists());
    } else {
        write_clip_tokenizer(&tokenizer_dir, pad).unwrap();
    }
    let base = ClipTokenizer::from_dir(&tokenizer_dir).unwrap();
    assert_eq!(base.vocab_size(), 49408);
    let mut with_added = ClipTokenizer::from_dir(&tokenizer_dir).unwrap();
    let fixture = fixture();
    let added_list = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["added"].as_array().unwrap())
        .max_by_key(|a| a.len())
        .unwrap();
    for token in added_list {
        with_added.add_token(token.as_str().unwrap()).unwrap();
    }
    check(&base, &with_added, pad_key);
}

#[test]
fn tokenizer_parity_vocab_merges_sd1() {
    run(false, "<|endoftext|>", "sd1");
}

#[test]
fn tokenizer_parity_vocab_merges_sd2() {
    run(false, "!", "sd2");
}

#[test]
fn tokenizer_parity_tokenizer_json_sd1() {
    run(true, "<|endoftext|>", "sd1");
}

#[test]
fn tokenizer_parity_tokenizer_json_sd2() {
    run(true, "!", "sd2");
}

/// The vocabulary and merges match the ones the reference script built (open_clip's
/// construction) and checked against transformers' own `save_pretrained` output.
#[test]
fn tokenizer_vocab_and_merges_digest() {
    let (vocab, merges) = clip_vocab_and_merges().unwrap();
    let mut data = String::new();
    for (i, v) in vocab.iter().enumerate() {
        data.push_str(&format!("{v}\t{i}\n"));
    }
    for (a, b) in &merges {
        data.push_str(&format!("{a} {b}\n"));
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in data.bytes() {
        h = (h ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    assert_eq!(
        format!("{h:016x}"),
        fixture()["vocab_merges_fnv1a64"].as_str().unwrap()
    );
}

/// A saved folder with a textual-inversion token in `added_tokens_decoder` reloads with it.
#[test]
fn tokenizer_added_tokens_from_config() {
    let dir = tempfile::tempdir().unwrap();
    write_clip_tokenizer(dir.path(), "<|endoftext|>").unwrap();
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["added_tokens_decoder"] = serde_json::json!({
        "49408": {"content": "<my-toy>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false, "special": false}
    });
    std::fs::write(&config_path, config.to_string()).unwrap();
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.vocab_size(), 49409);
    assert_eq!(
        tok.encode_unpadded("a <my-toy>, on a table").unwrap(),
        vec![49406, 320, 49408, 267, 525, 320, 2175, 49407]
    );
}

/// The original SD uploads' legacy config files (special tokens as AddedToken dicts with
/// `normalized: true`): transformers' precedence rules decide how `<|ENDOFTEXT|>` etc. tokenize.
fn legacy(key: &str, pad: &str) {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    write_clip_tokenizer(dir.path(), pad).unwrap();
    let configs = &fixture["legacy_configs"][key];
    for (name, file) in [
        ("tokenizer_config", "tokenizer_config.json"),
        ("special_tokens_map", "special_tokens_map.json"),
    ] {
        std::fs::write(dir.path().join(file), configs[name].to_string()).unwrap();
    }
    let base = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(base.pad_id(), if pad == "!" { 0 } else { 49407 });
    let mut with_added = ClipTokenizer::from_dir(dir.path()).unwrap();
    for token in added_list(&fixture) {
        with_added.add_token(&token).unwrap();
    }
    let mut failures = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let tok = if case["added"].as_array().unwrap().is_empty() {
            &base
        } else {
            &with_added
        };
        let (got, expected) = match case.get(format!("{key}_legacy_unpadded")) {
            Some(unpadded) => (tok.encode_unpadded(text).unwrap(), ids(unpadded)),
            None => (tok.encode(text).unwrap(), ids(&case[key])),
        };
        if got != expected {
            failures.push(format!(
                "{key} legacy {text:?}:\n  got      {got:?}\n  expected {expected:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn added_list(fixture: &Value) -> Vec<String> {
    let cases = fixture["cases"].as_array().unwrap();
    let list = cases
        .iter()
        .map(|c| c["added"].as_array().unwrap())
        .max_by_key(|a| a.len())
        .unwrap();
    list.iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn tokenizer_legacy_configs_sd1() {
    legacy("sd1", "<|endoftext|>");
}

#[test]
fn tokenizer_legacy_configs_sd2() {
    legacy("sd2", "!");
}
