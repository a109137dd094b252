"""Qwen's byte-level BPE tokenizer, written out by hand (no `tokenizers`, no `regex` package).

The official Qwen2.5-Omni checkpoints ship Qwen2's tokenizer (tokenizer.json, or vocab.json + merges.txt plus
tokenizer_config.json). Encoding a string runs five steps, in the order the `tokenizers` library runs them:

    1. added tokens    <|im_start|>, <|AUDIO|>, ... are cut out of the raw text first (leftmost, then longest)
    2. normalizer      each remaining piece is put in Unicode NFC
    3. pre-tokenizer   Qwen2's regex splits a piece into words (`pretokenize`, below)
    4. byte level      each word becomes its UTF-8 bytes, each byte one printable character (GPT-2's table)
    5. BPE             adjacent symbols are merged, lowest merge rank first, until no ranked pair is left

Decoding maps ids back to their strings, the strings back to bytes (GPT-2's table, inverted) and the bytes to
text (invalid UTF-8 becomes U+FFFD).

The pre-tokenizer regex (transformers/models/qwen2/tokenization_qwen2.py, PRETOKENIZE_REGEX; the same string
is stored in Qwen2.5's tokenizer.json) needs Unicode classes that Python's `re` lacks, so `pretokenize` is a
small scanner that tries the seven alternatives in order at each position, exactly as a backtracking regex
engine does. \\p{L} and \\p{N} come from `unicodedata`; \\s is Unicode's White_Space list (`WHITESPACE`).

Simplifications, each refused with a clear error rather than guessed: only Qwen2's pipeline (NFC, the regex
above, byte level, BPE without dropout or byte fallback) is read from tokenizer.json; added tokens with
`single_word` are not supported. Out-of-vocabulary ids in `decode` are an error (the library drops them).
Known gap: character classes follow Python's Unicode tables (14.0 on Python 3.11) while the `tokenizers`
library follows a newer Unicode; the ~9,400 code points assigned since (unassigned for Python) may split
differently. Text in any script of Unicode 14 splits identically (tests/test_bpe.py).
"""
from __future__ import annotations

import heapq
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .tokenizer import chat_template

# The pattern this file reproduces, kept to check that a tokenizer.json really is Qwen2's.
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# \s in the regex engine (Oniguruma) is Unicode's White_Space property: 25 code points. Python's str.isspace()
# differs (it also accepts U+001C..U+001F), so the set is written out.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                       "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# (?i:...) folds case: besides the ASCII capitals, LATIN SMALL LETTER LONG S (U+017F) folds to "s".
_FOLD = {"S": "s", "\u017f": "s", "T": "t", "R": "r", "E": "e", "V": "v", "M": "m", "L": "l", "D": "d"}


def _fold(s: str) -> str:
    return "".join(_FOLD.get(ch, ch) for ch in s)


class _Kinds(dict):
    """char code -> kind letter, for str.translate: L letter, N number, W whitespace, O anything else."""

    def __missing__(self, code: int) -> str:
        ch = chr(code)
        kind = "W" if ch in WHITESPACE else unicodedata.category(ch)[0]  # e.g. "Lo" -> "L", "Sc" -> "S"
        kind = kind if kind in "LNW" else "O"
        self[code] = kind
        return kind


_KINDS = _Kinds()


def pretokenize(text: str) -> list[str]:
    """Split text into words as Qwen2's regex does (leftmost match, first alternative that matches).

    >>> pretokenize("Hello world's 2024!\\n\\n  ok")
    ['Hello', ' world', "'s", ' ', '2', '0', '2', '4', '!\\n\\n', ' ', ' ok']
    """
    kinds = text.translate(_KINDS)  # one kind letter per character
    n, i, words = len(text), 0, []
    while i < n:
        c, k = text[i], kinds[i]
        nk = kinds[i + 1] if i + 1 < n else ""
        if c == "'" and _fold(text[i + 1:i + 2]) in ("s", "t", "m", "d"):
            j = i + 2                                       # (?i:'s|'t|'m|'d)
        elif c == "'" and _fold(text[i + 1:i + 3]) in ("re", "ve", "ll"):
            j = i + 3                                       # (?i:'re|'ve|'ll)
        elif k == "L" or (nk == "L" and k != "N" and c not in "\r\n"):
            j = i + 1                                       # [^\r\n\p{L}\p{N}]?\p{L}+ : one optional lead, letters
            while j < n and kinds[j] == "L":
                j += 1
        elif k == "N":
            j = i + 1                                       # \p{N} : one digit at a time
        elif k == "O" or (c == " " and nk == "O"):
            j = i + 1                                       # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
            while j < n and kinds[j] == "O":
                j += 1
            while j < n and text[j] in "\r\n":
                j += 1
        else:                                               # whitespace: the last three alternatives
            end = i
            while end < n and kinds[end] == "W":
                end += 1
            last_newline = max(text.rfind("\r", i, end), text.rfind("\n", i, end))
            if last_newline >= 0:
                j = last_newline + 1                        # \s*[\r\n]+ : up to the run's last line break
            elif end == n or end - i == 1:
                j = end                                     # \s+(?!\S) at the end, or \s+ for a lone space
            else:
                j = end - 1                                 # \s+(?!\S) backs off one: the last space leads the next word
        words.append(text[i:j])
        i = j
    return words


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte -> a printable character. Printable Latin-1 bytes stand for themselves; the other 68
    (controls, space, soft hyphen, ...) take the code points from 256 upwards, in byte order.

    >>> t = bytes_to_unicode(); t[ord("a")], t[ord(" ")], t[ord("\\n")], len(set(t.values()))
    ('a', 'Ġ', 'Ċ', 256)
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_LATIN1_TO_CHAR = {b: c for b, c in BYTE_TO_CHAR.items()}  # str.translate table over latin-1 decoded bytes


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the raw text before BPE (tokenizer.json "added_tokens")."""
    content: str
    id: int
    special: bool = True        # special tokens can be skipped in decode and disabled in encode
    lstrip: bool = False        # the match swallows whitespace on its left
    rstrip: bool = False        # ... and on its right
    normalized: bool = False    # matched in the NFC text instead of the raw text


class QwenBPE:
    """Qwen2's tokenizer. Same interface as `ByteTokenizer`: encode, decode, chat, vocab_size, special."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: list[AddedToken] = (),
                 *, nfc: bool = True, ignore_merges: bool = False, source: str = "the vocabulary",
                 merge_names: list[str] | None = None):
        self.vocab, self.nfc, self.ignore_merges = vocab, nfc, ignore_merges
        missing = [c for c in BYTE_TO_CHAR.values() if c not in vocab]
        if missing:
            raise ValueError(f"{source}: a byte-level vocabulary needs all 256 byte symbols; it lacks "
                             f"{len(missing)}, e.g. {missing[0]!r} (byte {CHAR_TO_BYTE[missing[0]]:#04x})")
        # (left, right) -> rank; the merged symbol is left + right and must be in the vocabulary.
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(merges):
            for part in (a, b, a + b):
                if part not in vocab:
                    name = merge_names[rank] if merge_names else f"merge {rank + 1}"
                    raise ValueError(f"{source}: {name} ({a!r} {b!r}) uses {part!r}, which is not in the vocabulary")
            self.ranks[(a, b)] = rank
        self.added = {t.content: t for t in added}
        self.special = {t.content: t.id for t in added if t.special}
        self.id_to_token = {i: s for s, i in vocab.items()}
        # Added tokens win over the vocabulary; a normalized one is known by its normalized text, as in the library
        self.id_to_token.update({t.id: self._normalize(t.content) if t.normalized else t.content for t in added})
        self.vocab_size = max(self.id_to_token) + 1
        # Normalized tokens are looked for in the NFC text, by their NFC form.
        self._norm_added = {self._normalize(t.content): t for t in added if t.normalized}
        self._raw_match = _matcher([t.content for t in added if not t.normalized])
        self._norm_match = _matcher(list(self._norm_added))
        self._cache: dict[str, tuple[int, ...]] = {}
        self._bytes: dict[int, bytes] = {}

    # ---- loaders ---------------------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_json, merges_txt, added_tokens=None) -> "QwenBPE":
        """vocab.json + merges.txt. `added_tokens`: a list of AddedToken / tokenizer.json-style dicts, or a
        {content: id} dict of special tokens."""
        vocab = _check_vocab(_read_json(vocab_json), vocab_json, "the top level")
        merges, names = [], []
        for n, line in enumerate(Path(merges_txt).read_text(encoding="utf-8").splitlines(), 1):
            if (n == 1 and line.startswith("#version")) or not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{merges_txt} line {n}: a merge is two tokens separated by one space, got {line!r}")
            merges.append((parts[0], parts[1]))
            names.append(f"line {n}")
        if isinstance(added_tokens, dict):
            added_tokens = [AddedToken(c, i) for c, i in added_tokens.items()]
        added = [_added_token(t, f"added_tokens[{k}]", "added_tokens") for k, t in enumerate(added_tokens or [])]
        return cls(vocab, merges, added, source=str(merges_txt), merge_names=names)

    @classmethod
    def from_tokenizer_json(cls, path, extra_added: list[AddedToken] = ()) -> "QwenBPE":
        """A `tokenizers` tokenizer.json with Qwen2's pipeline."""
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
        model = _key(data, "model", path, dict)
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{path}: model.type is {model.get('type')!r}; only 'BPE' is supported")
        for key, ok in (("dropout", (None, 0, 0.0)), ("byte_fallback", (None, False)),
                        ("continuing_subword_prefix", (None, "")), ("end_of_word_suffix", (None, ""))):
            if model.get(key) not in ok:
                raise ValueError(f"{path}: model.{key} is {model.get(key)!r}; Qwen2's BPE uses {ok[-1]!r}")
        vocab = _check_vocab(_key(model, "vocab", path, dict, "model."), path, "model.vocab")
        merges = []
        for k, m in enumerate(_key(model, "merges", path, list, "model.")):
            pair = m.split(" ") if isinstance(m, str) else m
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
                raise ValueError(f"{path}: model.merges[{k}] must be 'a b' or ['a', 'b'], got {m!r}")
            merges.append((pair[0], pair[1]))
        _check_pipeline(data, path)
        added = [_added_token(t, f"added_tokens[{k}]", path) for k, t in enumerate(data.get("added_tokens") or [])]
        added = _union(added, extra_added, path)
        return cls(vocab, merges, added, nfc=data.get("normalizer") is not None, source=str(path),
                   ignore_merges=bool(model.get("ignore_merges", False)),
                   merge_names=[f"model.merges[{k}]" for k in range(len(merges))])

    @classmethod
    def from_dir(cls, directory) -> "QwenBPE":
        """tokenizer.json if present, else vocab.json + merges.txt; plus tokenizer_config.json's added tokens."""
        d = Path(directory)
        extra = []
        if (d / "tokenizer_config.json").is_file():
            cfg_path = d / "tokenizer_config.json"
            decoder = _read_json(cfg_path).get("added_tokens_decoder") or {}
            if not isinstance(decoder, dict):
                raise ValueError(f"{cfg_path}: added_tokens_decoder must be an object {{id: token}}")
            for i, t in decoder.items():
                if not (isinstance(t, dict) and str(i).isdigit()):
                    raise ValueError(f"{cfg_path}: added_tokens_decoder[{i!r}] must map a numeric id to a token object")
                extra.append(_added_token({**t, "id": int(i)}, f"added_tokens_decoder[{i!r}]", cfg_path))
        if (d / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(d / "tokenizer.json", extra)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return cls.from_files(d / "vocab.json", d / "merges.txt", extra)
        raise FileNotFoundError(f"{d} holds neither tokenizer.json nor vocab.json + merges.txt")

    @classmethod
    def learn(cls, texts, special: dict[str, int], vocab_size: int, first_id: int = 256) -> "QwenBPE":
        """A byte-level BPE learnt on `texts` (`learn_merges`): bytes keep ids 0-255 (as in `ByteTokenizer`), the
        special tokens keep their ids, and each merge takes the next free id from `first_id` on, as many as fit
        below `vocab_size`. The tiny models use it on the toy corpus, so that a word is one token, as "seven"
        is in Qwen's vocabulary."""
        taken = set(special.values())
        free = [i for i in range(max(first_id, 256), vocab_size) if i not in taken]
        merges = learn_merges(texts, len(free))
        vocab = {c: b for b, c in BYTE_TO_CHAR.items()}
        vocab.update({a + b: i for (a, b), i in zip(merges, free)})
        return cls(vocab, merges, [AddedToken(c, i) for c, i in special.items()], source="the learnt vocabulary")

    def files(self) -> dict[str, bytes]:
        """vocab.json, merges.txt and tokenizer_config.json (the special tokens), as `from_dir` reads them."""
        merges = sorted(self.ranks, key=self.ranks.get)
        added = {str(t.id): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                             "normalized": t.normalized} for t in sorted(self.added.values(), key=lambda t: t.id)}
        return {"vocab.json": json.dumps(self.vocab, ensure_ascii=False, indent=0).encode(),
                "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode(),
                "tokenizer_config.json": json.dumps({"added_tokens_decoder": added}, indent=1).encode()}

    # ---- encode ----------------------------------------------------------------------------------------------
    def _normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.nfc else text

    def _split_added(self, text: str, pattern, table, allow_special: bool):
        """Yield (piece, None) for plain text and (content, id) for each added token found."""
        start = 0
        for m in (pattern.finditer(text) if pattern else ()):
            tok = table[m.group()]
            if tok.special and not allow_special:
                continue  # stays plain text, as with the library's encode_special_tokens
            a, b = m.span()
            if tok.lstrip:
                while a > start and text[a - 1] in WHITESPACE:
                    a -= 1
            if tok.rstrip:
                while b < len(text) and text[b] in WHITESPACE:
                    b += 1
            if start < a:
                yield text[start:a], None
            yield text[a:b], tok.id
            start = b
        if start < len(text):
            yield text[start:], None

    def bpe(self, word: str) -> tuple[int, ...]:
        """Byte-level word -> ids. Merge the lowest-ranked adjacent pair (leftmost on ties) until none is left.
        A heap of (rank, position) finds that pair in O(log n); entries made stale by a merge are skipped.

        >>> tok = QwenBPE({**{c: i for i, c in enumerate(BYTE_TO_CHAR.values())}, "ab": 256, "abc": 257},
        ...               [("a", "b"), ("ab", "c")])
        >>> tok.bpe("abcab"), tok.bpe("ba")
        ((257, 256), (98, 97))
        """
        if word in self._cache:
            return self._cache[word]
        if self.ignore_merges and word in self.vocab:
            return (self.vocab[word],)
        sym = list(word)                      # symbol text; "" once merged into its left neighbour
        nxt = list(range(1, len(sym) + 1))    # index of the next live symbol (len(sym): none)
        prv = list(range(-1, len(sym) - 1))   # index of the previous live symbol (-1: none)
        heap = [(self.ranks[p], i) for i, p in enumerate(zip(sym, sym[1:])) if p in self.ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if not sym[i] or j >= len(sym) or self.ranks.get((sym[i], sym[j])) != rank:
                continue  # stale: one side was merged away since this entry was pushed
            sym[i], sym[j] = sym[i] + sym[j], ""
            nxt[i] = nxt[j]
            if nxt[i] < len(sym):
                prv[nxt[i]] = i
            for left in (prv[i], i):  # the two pairs the new symbol now takes part in
                right = nxt[left] if left >= 0 else len(sym)
                if left >= 0 and right < len(sym) and (sym[left], sym[right]) in self.ranks:
                    heapq.heappush(heap, (self.ranks[(sym[left], sym[right])], left))
        ids = tuple(self.vocab[s] for s in sym if s)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With allow_special False, special tokens' text is encoded as plain text (non-special
        added tokens, such as <tool_call>, are still matched, as in the `tokenizers` library)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for raw, tid in self._split_added(text, self._raw_match, self.added, allow_special):
            if tid is not None:
                ids.append(tid)
                continue
            for piece, nid in self._split_added(self._normalize(raw), self._norm_match, self._norm_added, allow_special):
                if nid is not None:
                    ids.append(nid)
                    continue
                for word in pretokenize(piece):
                    try:
                        data = word.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise ValueError(f"text holds a lone surrogate {word[e.start]!r}; it has no UTF-8 bytes") from None
                    ids.extend(self.bpe(data.decode("latin-1").translate(_LATIN1_TO_CHAR)))
        return ids

    # ---- decode ----------------------------------------------------------------------------------------------
    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for."""
        if i not in self._bytes:
            s = self.id_to_token[i]
            # A string made of byte symbols is those bytes; any other (an added token such as "<|音频|>") is its
            # own UTF-8, which is the rule of the library's ByteLevel decoder.
            self._bytes[i] = bytes(CHAR_TO_BYTE[c] for c in s) if all(c in CHAR_TO_BYTE for c in s) else s.encode()
        return self._bytes[i]

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids -> text; invalid UTF-8 decodes to U+FFFD. With skip_special, special tokens are left out."""
        special_ids = set(self.special.values())
        out = bytearray()
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            i = int(i)
            if i not in self.id_to_token:
                raise ValueError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
            if not (skip_special and i in special_ids):
                out += self.token_bytes(i)
        return out.decode("utf-8", errors="replace")

    def chat(self, messages: list[dict], **kw) -> list[int]:
        """ChatML ids for a conversation (see tokenizer.chat_template)."""
        return self.encode(chat_template(messages, **kw))

    def token_id(self, content: str) -> int:
        """The id of a token given its text, e.g. token_id("<|im_end|>")."""
        if content in self.added:
            return self.added[content].id
        if content in self.vocab:
            return self.vocab[content]
        raise KeyError(f"{content!r} is neither an added token nor in the vocabulary")


def learn_merges(texts, max_merges: int, min_count: int = 2) -> list[tuple[str, str]]:
    """BPE training, the plain way: split each text into words (`pretokenize`), write each word as byte symbols,
    then repeatedly merge the adjacent pair that occurs most often in the corpus (ties: the smallest pair, so
    the result is deterministic), until `max_merges` or no pair occurs `min_count` times.

    >>> learn_merges(["low lower lowest"], 4)       # Ġ is the byte symbol of a space
    [('l', 'o'), ('lo', 'w'), ('low', 'e'), ('Ġ', 'lowe')]
    """
    counts: dict[str, int] = {}
    for text in texts:
        for word in pretokenize(text):
            w = word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_CHAR)
            counts[w] = counts.get(w, 0) + 1
    words = [(list(w), n) for w, n in counts.items()]
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: dict[tuple[str, str], int] = {}
        for sym, n in words:
            for p in zip(sym, sym[1:]):
                pairs[p] = pairs.get(p, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < min_count:
            break
        merges.append(best)
        a, b = best
        for sym, _ in words:
            i = 0
            while i < len(sym) - 1:
                if sym[i] == a and sym[i + 1] == b:
                    sym[i: i + 2] = [a + b]
                i += 1
    return merges


def _matcher(contents: list[str]):
    """A regex finding the added tokens leftmost-longest (as the library's Aho-Corasick does): Python's
    alternation takes the first alternative that matches, so the longer tokens go first."""
    alts = sorted(set(contents), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alts))) if alts else None


# ---- file reading with errors that name the file and the key ---------------------------------------------------
def _read_json(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def _key(obj: dict, key: str, path, kind, prefix: str = ""):
    if key not in obj:
        raise ValueError(f"{path}: missing key '{prefix}{key}'")
    if not isinstance(obj[key], kind):
        raise ValueError(f"{path}: '{prefix}{key}' must be a {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _check_vocab(vocab, path, where: str) -> dict[str, int]:
    if not isinstance(vocab, dict):
        raise ValueError(f"{path}: {where} must be an object {{token: id}}, got {type(vocab).__name__}")
    for tok, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{path}: {where}[{tok!r}] must be a non-negative integer id, got {i!r}")
    return vocab


def _added_token(t, where: str, path) -> AddedToken:
    if isinstance(t, AddedToken):
        return t
    if not isinstance(t, dict):
        raise ValueError(f"{path}: {where} must be an object with 'id' and 'content', got {t!r}")
    for key, kind in (("id", int), ("content", str)):
        if key not in t:
            raise ValueError(f"{path}: missing key '{where}.{key}'")
        if not isinstance(t[key], kind) or isinstance(t[key], bool) or t[key] == "":
            raise ValueError(f"{path}: '{where}.{key}' must be a non-empty {kind.__name__}, got {t[key]!r}")
    if t.get("single_word"):
        raise ValueError(f"{path}: {where} ({t['content']!r}) sets single_word, which this reader does not support")
    special = bool(t.get("special", False))
    return AddedToken(t["content"], t["id"], special, bool(t.get("lstrip", False)), bool(t.get("rstrip", False)),
                      bool(t.get("normalized", not special)))


def _union(added: list[AddedToken], extra, path) -> list[AddedToken]:
    """tokenizer.json's added tokens plus tokenizer_config.json's; the same text must keep the same id."""
    by_content = {t.content: t for t in added}
    for t in extra:
        if t.content in by_content and by_content[t.content].id != t.id:
            raise ValueError(f"{path}: added token {t.content!r} has id {by_content[t.content].id} there but "
                             f"{t.id} in tokenizer_config.json")
        by_content.setdefault(t.content, t)
    return list(by_content.values())


def _check_pipeline(data: dict, path) -> None:
    """Refuse a tokenizer.json whose normalizer, pre-tokenizer or decoder is not Qwen2's."""
    norm = data.get("normalizer")
    if norm is not None and (norm.get("type") if isinstance(norm, dict) else norm) != "NFC":
        raise ValueError(f"{path}: normalizer {norm!r} is not supported (Qwen2 uses NFC or none)")
    pre = data.get("pre_tokenizer")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    ok = (isinstance(steps, list) and len(steps) == 2 and all(isinstance(st, dict) for st in steps)
          and steps[0].get("type") == "Split" and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_PRETOKENIZE_REGEX
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
          and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space") and not steps[1].get("use_regex"))
    if not ok:
        raise ValueError(f"{path}: 'pre_tokenizer' is not Qwen2's (Split on QWEN2_PRETOKENIZE_REGEX, Isolated, "
                         f"then ByteLevel without prefix space or regex)")
    dec = data.get("decoder")
    if dec is not None and (dec.get("type") if isinstance(dec, dict) else dec) != "ByteLevel":
        raise ValueError(f"{path}: decoder {dec!r} is not supported (Qwen2 uses ByteLevel)")
