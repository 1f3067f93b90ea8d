"""Reference token ids for imprint's CLIP tokenizer (crates/models/src/tokenizer.rs).

Pinned reference environment: transformers 5.24.0 (tokenizers 0.23.3), torch 2.15.0, diffusers 0.42.1;
ftfy is NOT installed (and transformers 5's CLIPTokenizer, a tokenizers-backed class, never uses it).

The vocab.json / merges.txt are built here in Python, independently of the Rust writer, from the
same shipped `crates/models/assets/bpe_simple_vocab_16e6.txt.gz` with the construction of CLIP's /
open_clip's `SimpleTokenizer` (256 byte-level chars, the same with "</w>", the first 48894 merges
joined, then "<|startoftext|>", "<|endoftext|>").  They are loaded with `transformers.CLIPTokenizer`
for both SD 1.x (pad "<|endoftext|>") and SD 2.x (pad "!") settings, and every prompt is tokenized
the way the diffusers pipelines call the tokenizer:
`tokenizer(text, padding="max_length", max_length=77, truncation=True)`.

The folders get `tokenizer_config.json` / `special_tokens_map.json` as the SD repos ship them, in
the current format (`added_tokens_decoder`, what the Rust writer writes) and in the legacy format
of the original uploads (stored in the fixture; ids recorded only where they differ), since these
files decide whether a special token is matched before or after lowercasing.

The script also checks that what transformers' `save_pretrained` writes (only tokenizer.json +
tokenizer_config.json in v5) has the vocabulary and merges built here and reloads to the same ids,
and stores a digest of vocabulary + merges so the Rust test can check its writer's content.

Usage: /work/refvenv/bin/python tools/reference/tokenizer.py   (writes tests/fixtures/tokenizer.json)
       /work/refvenv/bin/python tools/reference/tokenizer.py --check-rust DIR
         checks the folders `cargo run -p imprint-models --example clip_tokenizer -- write DIR` wrote
         (DIR/{sd1,sd2} with vocab.json + merges.txt, DIR/{sd1,sd2}-fast with tokenizer.json):
         same vocabulary and merges as built here (merges.txt byte for byte), and transformers
         loading them (configs included) gives the fixture's ids.
"""
import gzip
import json
import os
import shutil
import tempfile

from transformers import CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GZ = os.path.join(ROOT, "crates/models/assets/bpe_simple_vocab_16e6.txt.gz")
OUT = os.path.join(ROOT, "tests/fixtures/tokenizer.json")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_files(d):
    lines = gzip.open(GZ).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab, [tuple(m.split()) for m in merges]


def digest(vocab, merges):
    """FNV-1a (64-bit) over "token\tid\n" lines in id order then "a b\n" merge lines: a content
    digest simple enough to recompute in the Rust test without a hashing dependency."""
    data = "".join(f"{v}\t{i}\n" for i, v in enumerate(vocab)) + "".join(f"{a} {b}\n" for a, b in merges)
    h = 0xCBF29CE484222325
    for byte in data.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "  leading and trailing spaces   ",
    "multiple   spaces\n\nnewlines\tand\ttabs\r\n",
    "hello, world! how's it going?",
    "it's don't we're I've I'm you'll he'd",
    "''s and 'S and 'tis",
    "1234 3.14 2x4 1,000,000",
    "café vs cafe\u0301 (NFC)",
    "naïve Æsir Œuvre ß straße",
    "ΟΔΟΣ Σίσυφος",
    "İstanbul ǅemal",
    "emoji 🐶🔥 👨‍👩‍👧 ❤️",
    "東京タワー の 夜景",
    "Москва ночью, масляная живопись",
    "مدينة عربية",
    "\u00a0non\u2003breaking\u3000spaces\u0085next\u200bzero",
    "hello!",
    "!!! wow!! great !",
    "a<|endoftext|>b <|startoftext|>",
    "<|ENDOFTEXT|> uppercase special",
    "<|StartOfText|>hi<|EndOfText|>",
    "trending on artstation, 8k, octane render, highly detailed",
    "masterpiece, (best quality:1.2), [ugly], {blue|red}",
    "snake_case-and-kebab/slashes\\back",
    "email@example.com https://example.com/a?b=c#d",
    "dollars $100 & 50% off ~ ^ `tick`",
    "tasks ask sks",
    "\u00bd \u2167 \u0663 \u00b2 superscripts",
    "\t",
    " ".join(["word"] * 100),
    "an astronaut riding a horse on the moon, " * 12,
    " ".join(str(i) for i in range(60)),
]

# Textual inversion placeholders, added as `tokenizer.add_tokens` does (normalized, not special).
ADDED = ["<my-toy>", "<my-toy>_1", "sks"]
ADDED_PROMPTS = [
    "a <my-toy>, on a table",
    "<my-toy>s",
    "A <My-Toy> photo",
    "<my-toy>_1 <my-toy> <my-toy>_2",
    "tasks with sks",
    "a<my-toy>!",
    "<my-toy>" * 3,
    "photo of <my-toy> " * 30,
]


def added(content, normalized, special=True, type_field=False):
    d = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    if special is not None:
        d["special"] = special
    return {"__type": "AddedToken", **d} if type_field else d


def configs(pad):
    """`tokenizer_config.json` + `special_tokens_map.json` as the SD repos ship them.

    Current format (SD 1.x/2.x repos re-saved by transformers 4.3x, and what
    `write_clip_tokenizer` writes): an `added_tokens_decoder` in which `<|startoftext|>` is
    normalized and `<|endoftext|>` is not (the result of transformers' rules on the original files).
    Legacy format (the original runwayml / stabilityai uploads): special tokens as AddedToken dicts
    with `normalized: true` and the pad token as a string; transformers then resolves the flags.
    """
    decoder = {"49406": added("<|startoftext|>", True), "49407": added("<|endoftext|>", False)}
    if pad == "!":
        decoder = {"0": added("!", False), **decoder}
    current = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    current_map = {
        "bos_token": added("<|startoftext|>", True, None),
        "eos_token": added("<|endoftext|>", False, None),
        "pad_token": pad,
        "unk_token": added("<|endoftext|>", False, None),
    }
    legacy = {
        "add_prefix_space": False,
        "bos_token": added("<|startoftext|>", True, None, True),
        "do_lower_case": True,
        "eos_token": added("<|endoftext|>", True, None, True),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>", True, None, True),
    }
    legacy_map = {
        "bos_token": added("<|startoftext|>", True, None),
        "eos_token": added("<|endoftext|>", True, None),
        "pad_token": pad,
        "unk_token": added("<|endoftext|>", True, None),
    }
    return (current, current_map), (legacy, legacy_map)


def write_configs(d, config, special_map):
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(d, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2)


def encode(t, p):
    return t(p, padding="max_length", max_length=77, truncation=True)["input_ids"]


def main():
    cases = []
    legacy_configs = {}
    with tempfile.TemporaryDirectory() as root:
        base = os.path.join(root, "base")
        os.makedirs(base)
        vocab, merges = build_files(base)
        toks, fast = {}, {}
        for key, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
            current, legacy = configs(pad)
            legacy_configs[key] = {"tokenizer_config": legacy[0], "special_tokens_map": legacy[1]}
            for name, (config, special_map) in ((key, current), (key + "_legacy", legacy)):
                d = os.path.join(root, name)
                shutil.copytree(base, d)
                write_configs(d, config, special_map)
                t = CLIPTokenizer.from_pretrained(d)
                assert len(t) == 49408 and t.bos_token_id == 49406 and t.eos_token_id == 49407
                assert t.model_max_length == 77 and t.pad_token == pad
                toks[name] = t
            # transformers 5's own save (tokenizer.json + tokenizer_config.json only) reloads the same.
            saved = os.path.join(root, key + "_saved")
            toks[key].save_pretrained(saved)
            assert sorted(os.listdir(saved)) == ["tokenizer.json", "tokenizer_config.json"]
            with open(os.path.join(saved, "tokenizer.json"), encoding="utf-8") as f:
                saved_json = json.load(f)
            # The same vocabulary and merges as built here.
            assert saved_json["model"]["vocab"] == {v: i for i, v in enumerate(vocab)}
            assert [tuple(m) for m in saved_json["model"]["merges"]] == merges
            print(key, "saved added_tokens:", [(a["id"], a["content"], a["normalized"]) for a in saved_json["added_tokens"]])
            fast[key] = CLIPTokenizer.from_pretrained(saved)

        def run(prompts, added_tokens):
            for p in prompts:
                case = {"text": p, "added": added_tokens}
                for key in ("sd1", "sd2"):
                    case[key] = encode(toks[key], p)
                    assert encode(fast[key], p) == case[key], (key, p)
                case["unpadded"] = toks["sd1"](p)["input_ids"]
                for key in ("sd1_legacy", "sd2_legacy"):
                    ids = toks[key](p)["input_ids"]
                    if ids != (case["unpadded"] if key == "sd1_legacy" else toks["sd2"](p)["input_ids"]):
                        case[key + "_unpadded"] = ids
                cases.append(case)

        run(PROMPTS, [])
        for t in list(toks.values()) + list(fast.values()):
            assert t.add_tokens(ADDED) == len(ADDED)
        run(ADDED_PROMPTS, ADDED)
        added_ids = toks["sd1"].convert_tokens_to_ids(ADDED)

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write('{"versions": {"transformers": "5.24.0", "tokenizers": "0.23.3"},\n')
        f.write('"vocab_merges_fnv1a64": "' + digest(vocab, merges) + '",\n')
        f.write('"added_ids": ' + json.dumps(added_ids) + ",\n")
        f.write('"legacy_configs": ' + json.dumps(legacy_configs) + ",\n")
        f.write('"cases": [\n' + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]}\n")
    print(f"wrote {len(cases)} cases to {OUT}")


def check_rust(root):
    with open(OUT, encoding="utf-8") as f:
        fixture = json.load(f)
    with tempfile.TemporaryDirectory() as d:
        vocab, merges = build_files(d)
        with open(os.path.join(d, "merges.txt"), "rb") as f:
            merges_bytes = f.read()
    for name, key in (("sd1", "sd1"), ("sd2", "sd2"), ("sd1-fast", "sd1"), ("sd2-fast", "sd2")):
        path = os.path.join(root, name)
        if not name.endswith("fast"):
            with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
                assert json.load(f) == {v: i for i, v in enumerate(vocab)}, f"{name}/vocab.json differs"
            with open(os.path.join(path, "merges.txt"), "rb") as f:
                assert f.read() == merges_bytes, f"{name}/merges.txt differs"
        t = CLIPTokenizer.from_pretrained(path)
        assert t.model_max_length == 77 and len(t) == 49408, name
        saved = json.loads(t.backend_tokenizer.to_str())["model"]
        assert saved["vocab"] == {v: i for i, v in enumerate(vocab)} and [tuple(m) for m in saved["merges"]] == merges
        added_done = False
        for case in fixture["cases"]:
            if case["added"] and not added_done:
                t.add_tokens(case["added"])
                added_done = True
            got = t(case["text"], padding="max_length", max_length=77, truncation=True)["input_ids"]
            assert got == case[key], (name, case["text"], got, case[key])
        print(f"{name}: ok ({len(fixture['cases'])} cases)")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--check-rust":
        check_rust(sys.argv[2])
    else:
        main()
