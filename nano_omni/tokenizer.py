"""Tokenizers and the ChatML template.

`ByteTokenizer` serves the tiny preset with random weights (tests, notebooks 01-08): every UTF-8 byte is a token
(ids 0-255) and Qwen's special tokens follow (ids from `config.tiny_tokens()`), so any text round-trips and the
special tokens behave as in the real model. The official models use Qwen's byte-level BPE (`bpe.py`); the trained
tiny models use the same BPE code with merges learnt on the toy texts (`data.toy_tokenizer`: a word is one token).
All share `chat_template` below.

ChatML (reference 1.7):
    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n
Media appear as <|audio_bos|><|AUDIO|><|audio_eos|>, <|vision_bos|><|IMAGE|><|vision_eos|>,
<|vision_bos|><|VIDEO|><|vision_eos|>, one placeholder each; the processor expands a placeholder to as many
tokens as its encoder returns.
"""
from __future__ import annotations

import re

from .config import SpecialTokens

DEFAULT_SYSTEM = "You are a helpful assistant."
SPEECH_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                 "auditory and visual inputs, as well as generating text and speech.")

# SpecialTokens field -> the token's text, as in Qwen's vocabulary.
SPECIAL_TEXT = {
    "pad": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
    "audio_pad": "<|AUDIO|>", "audio_bos": "<|audio_bos|>", "audio_eos": "<|audio_eos|>",
    "vision_bos": "<|vision_bos|>", "vision_eos": "<|vision_eos|>", "vision_pad": "<|vision_pad|>",
    "image_pad": "<|IMAGE|>", "video_pad": "<|VIDEO|>",
    "tts_text_pad": "<|tts_pad|>", "tts_text_bos": "<|tts_bos|>", "tts_text_eos": "<|tts_eos|>",
}
MEDIA = {"audio": ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"),
         "image": ("<|vision_bos|>", "<|IMAGE|>", "<|vision_eos|>"),
         "video": ("<|vision_bos|>", "<|VIDEO|>", "<|vision_eos|>")}


def chat_template(messages: list[dict], *, system: str | None = DEFAULT_SYSTEM, add_generation_prompt: bool = True) -> str:
    """ChatML text for a conversation. A message is {"role": ..., "content": str | list of items}; an item is a
    str, {"type": "text", "text": ...} or {"type": "audio" | "image" | "video", ...} (one placeholder each).

    >>> chat_template([{"role": "user", "content": [{"type": "audio"}, "What is said?"]}], system=None)
    '<|im_start|>user\\n<|audio_bos|><|AUDIO|><|audio_eos|>What is said?<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    parts = []
    if system is not None and messages[0].get("role") != "system":
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        content = m["content"]
        items = [content] if isinstance(content, str) else content
        text = []
        for item in items:
            if isinstance(item, str):
                text.append(item)
            elif isinstance(item, dict) and item.get("type") == "text":
                text.append(item["text"])
            elif isinstance(item, dict) and item.get("type") in MEDIA:
                text.append("".join(MEDIA[item["type"]]))
            else:
                raise ValueError(f"messages[{i}] holds an item of unknown type: {item!r}")
        parts.append(f"<|im_start|>{m['role']}\n{''.join(text)}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def special_ids(tokens: SpecialTokens) -> dict[str, int]:
    """Each special token's text -> its id in `tokens`."""
    return {SPECIAL_TEXT[name]: getattr(tokens, name) for name in SPECIAL_TEXT}


class ByteTokenizer:
    """UTF-8 bytes plus special tokens. `extra` adds named specials (e.g. speaker tokens) at given ids."""

    def __init__(self, tokens: SpecialTokens, vocab_size: int, extra: dict[str, int] | None = None):
        self.tokens = tokens
        self.vocab_size = vocab_size
        self.special = special_ids(tokens)
        self.special.update(extra or {})
        for text, i in self.special.items():
            if not (256 <= i < vocab_size):
                raise ValueError(f"special token {text} has id {i}; ids 0-255 are bytes and the vocabulary has {vocab_size}")
        self.id_to_special = {i: t for t, i in self.special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)) + ")")

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With allow_special, the text of a special token becomes its id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.special:
                ids.append(self.special[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids -> text. Invalid UTF-8 byte runs decode to U+FFFD; ids outside the vocabulary are an error."""
        out, buf = [], bytearray()
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if i in self.id_to_special:
                if not skip_special:
                    out.append(self.id_to_special[i])
            elif not (0 <= i < self.vocab_size):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def chat(self, messages: list[dict], **kw) -> list[int]:
        """ChatML ids for a conversation (see chat_template)."""
        return self.encode(chat_template(messages, **kw))

    def files(self) -> dict[str, bytes]:
        """The files that describe it in a checkpoint: none (its special ids are the config's)."""
        return {}
