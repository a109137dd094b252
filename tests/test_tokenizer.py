"""Byte-level tokenizer: round trip on any Unicode, Qwen's special tokens, the ChatML template."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nano_omni.config import get_config
from nano_omni.tokenizer import ByteTokenizer, SPECIAL_TEXT, chat_template

CFG = get_config("tiny")
TOK = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_on_arbitrary_unicode(text):
    assert TOK.decode(TOK.encode(text)) == text
    ids = TOK.encode(text, allow_special=False)
    assert all(0 <= i < 256 for i in ids) and TOK.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(sorted(SPECIAL_TEXT.values()))), max_size=8))
def test_special_tokens_become_single_ids(parts):
    text = "".join(parts)
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    n_special = sum(1 for i in ids if i >= 256)
    assert n_special == sum(text.count(s) for s in SPECIAL_TEXT.values())


def test_chat_template_layout_and_ids():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = chat_template(msgs)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_bos|><|IMAGE|><|vision_eos|>How many?<|im_end|>\n<|im_start|>assistant\n")
    ids = TOK.chat(msgs)
    tk = CFG.tokens
    assert ids[0] == tk.im_start and ids.count(tk.image_pad) == 1 and ids[-len("assistant\n") - 1] == tk.im_start
    assert TOK.decode(ids, skip_special=True).startswith("system\nYou are")


def test_bad_input():
    with pytest.raises(TypeError, match="text must be a str"):
        TOK.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.decode([1, 5000])
    with pytest.raises(ValueError, match="unknown type"):
        chat_template([{"role": "user", "content": [{"type": "smell"}]}])
    with pytest.raises(ValueError, match="non-empty list"):
        chat_template([])
