"""Qwen's byte-level BPE (nano_omni/bpe.py) against the `tokenizers` library.

The reference is a BPE trained inside the test with Qwen2's exact pipeline (NFC, Split on Qwen2's regex, byte
level, ByteLevel decoder) plus Qwen's special tokens and a few non-special added tokens. Ours loads the saved
files both ways (tokenizer.json; vocab.json + merges.txt + tokenizer_config.json) and must give identical ids
on random multilingual text, on the ChatML template, and identical decoded text.
"""
import json
import random
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from nano_omni.bpe import QWEN2_PRETOKENIZE_REGEX, QwenBPE, bytes_to_unicode, pretokenize  # noqa: E402
from nano_omni.tokenizer import MEDIA, SPECIAL_TEXT, chat_template  # noqa: E402

# Qwen2.5-Omni's added tokens as we know them (the loaders read the real list from the files); the
# non-special ones are matched even when special tokens are turned off.
SPECIALS = sorted(set(SPECIAL_TEXT.values())) + ["<|box_end|>", "<|quad_start|>", "<|quad_end|>"]
NON_SPECIAL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<|音频|>"]
STRIPPED = "<mask>"            # special, lstrip + rstrip: swallows the whitespace around it
NORMALIZED = "cafe\u0301!"     # non-special, normalized: matched in the NFC text (where it reads "café!")
PREFIX = "<|im_end"            # non-special, a prefix of a special token: the longer match must win

WORDS = ("the quick brown fox jumps over lazy dogs it's we're they've I'm you'll he'd DON'T "
         "def main(): return x + 1 if __name__ == '__main__': print(f'{x:>8}') {} [] <> // # -> => "
         "3.14159 2024-05-09 100,000 ٣٤٥ १२३ 一二三 ① Ⅻ ½ "
         "今天天气很好 我们去公园 日本語のテキスト 한국어 문장 "
         "مرحبا بالعالم السلام عليكم שלום עולם "
         "café naïve résumé Ångström über straße ﬁ ñ e\u0301 a\u0308 "
         "😀 👍🏽 🇯🇵 👨‍👩‍👧 ✨ ★ € £ ¥ © ™").split(" ")
SPACES = [" ", "  ", "\n", "\r\n", "\t", "\u3000", "\xa0", "\n\n", "    "]


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(WORDS) + rng.choice(SPACES) for _ in range(rng.randint(3, 15))) for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Train the reference tokenizer and save it as tokenizer.json and as vocab.json + merges.txt."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in NON_SPECIAL])
    tok.add_special_tokens([AddedToken(STRIPPED, special=True, lstrip=True, rstrip=True, normalized=False)])
    tok.add_tokens([AddedToken(NORMALIZED, special=False, normalized=True),
                    AddedToken(PREFIX, special=False, normalized=False)])

    root = tmp_path_factory.mktemp("bpe")
    (root / "json").mkdir()
    (root / "files").mkdir()
    tok.save(str(root / "json" / "tokenizer.json"))
    tok.model.save(str(root / "files"))  # vocab.json + merges.txt
    added = json.loads((root / "json" / "tokenizer.json").read_text())["added_tokens"]
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    (root / "files" / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    return root


@pytest.fixture(scope="module")
def toks(files):
    """(library, library with special tokens off, ours from tokenizer.json, ours from vocab + merges)."""
    lib = Tokenizer.from_file(str(files / "json" / "tokenizer.json"))
    lib_plain = Tokenizer.from_file(str(files / "json" / "tokenizer.json"))
    lib_plain.encode_special_tokens = True
    return _Quiet((lib, lib_plain, QwenBPE.from_dir(files / "json"), QwenBPE.from_dir(files / "files")))


class _Quiet(tuple):
    """Keeps Hypothesis' failure report short (a tokenizer's repr prints its whole vocabulary)."""

    def __repr__(self):
        return "toks"


def test_loaders_agree_on_the_vocabulary(toks):
    lib, _, ours_json, ours_files = toks
    assert ours_json.vocab_size == ours_files.vocab_size == lib.get_vocab_size(with_added_tokens=True)
    for s, i in lib.get_vocab(with_added_tokens=True).items():
        assert ours_json.token_id(s) == ours_files.token_id(s) == i
    assert set(ours_json.special) == set(SPECIALS) | {STRIPPED}
    assert ours_json.ranks == ours_files.ranks and len(ours_json.ranks) > 500


# Random multilingual text: any assigned Unicode character (see the gap noted in bpe.py's header), with the
# tokenizer's hard cases mixed in: special tokens and fragments of them, contractions, line breaks, wide spaces.
PIECES = SPECIALS + NON_SPECIAL + [STRIPPED, NORMALIZED, PREFIX, "café!", "<|im_", "|>", "'s", "'LL", "'ſ", "\r\n",
                                   "\n\n", "  ", "\u3000", "\x1c", "e\u0301", "😀", "2024"] + WORDS
TEXT = st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=12),
                          st.sampled_from(PIECES), st.sampled_from(SPACES)), max_size=12).map("".join)


@settings(max_examples=5000, deadline=None)
@given(TEXT)
def test_ids_and_text_match_the_library(toks, text):
    lib, lib_plain, ours_json, ours_files = toks
    ids = lib.encode(text, add_special_tokens=False).ids
    assert ours_json.encode(text) == ids
    assert ours_files.encode(text) == ids
    assert ours_json.encode(text, allow_special=False) == lib_plain.encode(text, add_special_tokens=False).ids
    assert ours_json.decode(ids) == lib.decode(ids, skip_special_tokens=False)
    assert ours_json.decode(ids, skip_special=True) == lib.decode(ids, skip_special_tokens=True)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_decode_of_any_ids_matches_the_library(toks, data):
    """Arbitrary ids cut UTF-8 sequences anywhere: both replace invalid bytes with U+FFFD the same way."""
    lib, _, ours, _ = toks
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=20))
    assert ours.decode(ids) == lib.decode(ids, skip_special_tokens=False)


def test_chatml_with_every_special_token(toks):
    lib, _, ours, _ = toks
    msgs = [{"role": "system", "content": "You are Qwen. Tools: <tool_call>{\"a\": 1}</tool_call>"},
            {"role": "user", "content": [{"type": m} for m in MEDIA] + ["What's this?\r\n" + " ".join(SPECIALS)]},
            {"role": "assistant", "content": "它说 \"مرحبا\" 😀 <mask> x <|音频|> " + " ".join(NON_SPECIAL)},
            {"role": "user", "content": [{"type": "text", "text": "And\u3000the video?"}, {"type": "video"}]}]
    text = chat_template(msgs)
    ids = ours.chat(msgs)
    assert ids == lib.encode(text, add_special_tokens=False).ids
    for s in SPECIALS:  # each special token text is one id, wherever it appears
        assert ids.count(ours.token_id(s)) == text.count(s) >= 1
    assert ours.decode(ids) == text.replace(" <mask> ", "<mask>")  # <mask> swallowed its spaces
    assert ours.decode(ids, skip_special=True) == lib.decode(ids, skip_special_tokens=True)


def test_pretokenize_every_assigned_code_point():
    """The scanner's letter / number / whitespace classes agree with the library's regex on every code point
    Python knows, in the contexts that tell the classes apart."""
    split = pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated")
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cs", "Cn", "Co")]
    chars += [chr(c) for c in range(0xE000, 0xF900, 64)]  # a sample of the private use areas
    for template in ("a{}'{}a\n", "{}{}!", " {}\r"):
        text = "".join(template.format(c, c) for c in chars)
        assert pretokenize(text) == [p for p, _ in split.pre_tokenize_str(text)], template


def test_old_merges_format_and_ignore_merges(files, toks):
    """tokenizer.json files written by older libraries store merges as "a b" strings; Llama-3-style files set
    ignore_merges (a word found whole in the vocabulary is one token)."""
    data = json.loads((files / "json" / "tokenizer.json").read_text())
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (files / "old.json").write_text(json.dumps(data))
    assert QwenBPE.from_tokenizer_json(files / "old.json").ranks == toks[2].ranks
    data["model"]["ignore_merges"] = True
    (files / "ignore.json").write_text(json.dumps(data))
    lib, ours = Tokenizer.from_file(str(files / "ignore.json")), QwenBPE.from_tokenizer_json(files / "ignore.json")
    for text in _corpus(200, seed=1):
        assert ours.encode(text) == lib.encode(text, add_special_tokens=False).ids


def test_files_written_by_transformers_qwen2_tokenizer(files, tmp_path):
    """transformers' own Qwen2Tokenizer, built from our vocabulary, saves files we read and encodes as we do."""
    transformers = pytest.importorskip("transformers")
    vocab = json.loads((files / "files" / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(m) for m in json.loads((files / "json" / "tokenizer.json").read_text())["model"]["merges"]]
    hf = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.save_pretrained(tmp_path)
    ours = QwenBPE.from_dir(tmp_path)
    text = chat_template([{"role": "user", "content": "\n".join(_corpus(100, seed=2))}]) + "<|endoftext|>"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.token_id("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")


def test_byte_table_and_bpe_order():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[0] == "Ā" and table[32] == "Ġ" and table[255] == "ÿ"
    vocab = {c: i for i, c in enumerate(table.values())}
    vocab.update({"aa": 256, "aaa": 257, "ba": 258})
    # ranks decide, not position: "ba" (rank 0) beats "aa" (rank 1); ties go to the leftmost pair
    tok = QwenBPE(vocab, [("b", "a"), ("a", "a"), ("aa", "a")])
    assert tok.bpe("aaba") == (256, 258) and tok.bpe("aaaa") == (256, 256) and tok.bpe("aaa") == (257,)


# ---- bad input ---------------------------------------------------------------------------------------------------
def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_json_names_the_file_and_position(tmp_path):
    bad = _write(tmp_path / "tokenizer.json", '{"model": {"vocab": {"a": 1,}}}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not valid JSON: .* line 1, column 29"):
        QwenBPE.from_tokenizer_json(bad)
    with pytest.raises(ValueError, match=r"tokenizer\.json: not valid JSON"):
        QwenBPE.from_dir(tmp_path)
    vocab = _write(tmp_path / "vocab.json", "{\n  oops\n}")
    with pytest.raises(ValueError, match=r"vocab\.json: not valid JSON: .* line 2, column 3"):
        QwenBPE.from_files(vocab, _write(tmp_path / "merges.txt", ""))
    (tmp_path / "tokenizer.json").unlink()
    _write(tmp_path / "tokenizer_config.json", "[1, 2")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        QwenBPE.from_dir(tmp_path)


def test_missing_and_malformed_keys_are_named(files, tmp_path):
    good = json.loads((files / "json" / "tokenizer.json").read_text())

    def load(edit):
        data = json.loads(json.dumps(good))
        edit(data)
        return QwenBPE.from_tokenizer_json(_write(tmp_path / "t.json", json.dumps(data)))

    with pytest.raises(ValueError, match=r"t\.json: missing key 'model'"):
        load(lambda d: d.pop("model"))
    with pytest.raises(ValueError, match=r"t\.json: missing key 'model\.vocab'"):
        load(lambda d: d["model"].pop("vocab"))
    with pytest.raises(ValueError, match=r"t\.json: missing key 'model\.merges'"):
        load(lambda d: d["model"].pop("merges"))
    with pytest.raises(ValueError, match=r"'model\.merges' must be a list, got dict"):
        load(lambda d: d["model"].update(merges={}))
    with pytest.raises(ValueError, match=r"model\.merges\[3\] must be 'a b' or \['a', 'b'\]"):
        load(lambda d: d["model"]["merges"].__setitem__(3, ["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"model\.merges\[0\] \('Ġ' 'zzz'\) uses 'zzz', which is not in the vocabulary"):
        load(lambda d: d["model"]["merges"].__setitem__(0, ["Ġ", "zzz"]))
    with pytest.raises(ValueError, match=r"model\.vocab\['hi'\] must be a non-negative integer id, got 'x'"):
        load(lambda d: d["model"]["vocab"].update(hi="x"))
    with pytest.raises(ValueError, match=r"lacks 1, e\.g\. 'Ā' \(byte 0x00\)"):
        load(lambda d: d["model"]["vocab"].pop("Ā"))
    with pytest.raises(ValueError, match=r"missing key 'added_tokens\[2\]\.content'"):
        load(lambda d: d["added_tokens"][2].pop("content"))
    with pytest.raises(ValueError, match=r"'pre_tokenizer' is not Qwen2's"):
        load(lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+"))
    with pytest.raises(ValueError, match=r"normalizer \{'type': 'NFKC'\} is not supported"):
        load(lambda d: d.update(normalizer={"type": "NFKC"}))
    with pytest.raises(ValueError, match=r"model\.byte_fallback is True"):
        load(lambda d: d["model"].update(byte_fallback=True))
    with pytest.raises(ValueError, match=r"sets single_word"):
        load(lambda d: d["added_tokens"][0].update(single_word=True))


def test_bad_merges_txt_names_the_line(files, tmp_path):
    vocab = files / "files" / "vocab.json"
    lines = (files / "files" / "merges.txt").read_text(encoding="utf-8").splitlines()
    bad = _write(tmp_path / "merges.txt", "\n".join(lines[:5] + ["Ġ nosuchtoken"] + lines[5:]))
    with pytest.raises(ValueError, match=r"merges\.txt: line 6 \('Ġ' 'nosuchtoken'\) uses 'nosuchtoken'"):
        QwenBPE.from_files(vocab, bad)
    bad = _write(tmp_path / "merges.txt", "\n".join(lines[:3] + ["a b c"]))
    with pytest.raises(ValueError, match=r"merges\.txt line 4: a merge is two tokens"):
        QwenBPE.from_files(vocab, bad)


def test_bad_calls(toks, tmp_path):
    ours = toks[2]
    with pytest.raises(KeyError, match="<\\|no_such\\|>"):
        ours.token_id("<|no_such|>")
    with pytest.raises(TypeError, match="text must be a str"):
        ours.encode(b"bytes")
    with pytest.raises(ValueError, match=f"token id {ours.vocab_size} is not in the vocabulary"):
        ours.decode([1, ours.vocab_size])
    with pytest.raises(ValueError, match="lone surrogate"):
        ours.encode("a\ud800b")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.json"):
        QwenBPE.from_dir(tmp_path)


def test_learnt_bpe_writes_files_the_library_reads(tmp_path):
    """QwenBPE.learn: bytes keep their ids, specials keep theirs, merges fill the free ids; the files it writes
    load in the `tokenizers` library and in ours with the same ids."""
    special = {s: 256 + i for i, s in enumerate(sorted(set(SPECIAL_TEXT.values())))}
    first = 256 + len(special) + 4                       # four ids left free (the tiny models' voice tokens)
    ours = QwenBPE.learn(_corpus(400), special, vocab_size=700, first_id=first)
    assert all(ours.vocab[c] == b for b, c in bytes_to_unicode().items())
    assert all(ours.token_id(s) == i for s, i in special.items())
    merged = sorted(i for s, i in ours.vocab.items() if len(s) > 1)
    assert merged == list(range(first, 700)) and ours.vocab_size == 700          # the corpus fills the budget
    for name, data in ours.files().items():
        (tmp_path / name).write_bytes(data)
    lib = Tokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    lib.normalizer = normalizers.NFC()
    lib.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    again = QwenBPE.from_dir(tmp_path)
    for text in _corpus(200, seed=1):
        ids = ours.encode(text)
        assert ids == lib.encode(text).ids == again.encode(text)
        assert ours.decode(ids) == unicodedata.normalize("NFC", text)
    chat = chat_template([{"role": "user", "content": [{"type": "audio"}, "what is said?"]}])
    assert again.encode(chat) == ours.encode(chat) and ours.encode(chat)[:1] == [special["<|im_start|>"]]


def test_learn_merges_most_frequent_pair_first():
    from nano_omni.bpe import learn_merges
    # "aaab", "Ġaab", "Ġab": (a, a) and (a, b) both occur 3 times, the smaller pair wins; then (a, b) twice;
    # then no pair is left twice
    assert learn_merges(["aaab aab ab"], 10) == [("a", "a"), ("a", "b")]
    assert learn_merges(["abc abd"], 10, min_count=1) == [("a", "b"), ("ab", "c"), ("ab", "d"), ("Ġ", "abd")]
    assert learn_merges(["abc abd"], 2, min_count=1) == [("a", "b"), ("ab", "c")]
    assert learn_merges(["abc"], 0) == [] and learn_merges([], 5) == []
