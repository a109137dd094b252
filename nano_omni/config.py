"""Configuration: one dataclass per component, an `OmniConfig` that composes them, and named presets.

Paper: Qwen2.5-Omni (arXiv 2503.20215), section 2. Numbers: ../shared/reference/qwen2_5_omni.md, section 1.

Vocabulary used across the package (the same names in every file):
    d_model   width of the residual stream        n_layer   number of blocks
    n_head    query heads                         n_kv_head key/value heads (GQA)
    head_dim  width of one head                   d_ff      hidden width of the MLP

Rules:
* Every field is checked in `__post_init__`; a problem is a `ValueError` that says what is wrong in a sentence.
* Sizes that follow from other fields are `@property`, so an override can never leave a stale value behind.
* `to_dict`/`from_dict` round-trip through JSON; `OmniConfig.from_hf_config` reads an official `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _positive(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive integer, got {v!r}")


def _divides(obj, a: str, b: str) -> None:
    va, vb = getattr(obj, a), getattr(obj, b)
    _check(vb % va == 0, f"{a} ({va}) must divide {b} ({vb}) in {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Special tokens. The official ids (reference 1.7) are the defaults; the tiny preset uses a 256-byte vocabulary
# followed by the same special tokens, so only the numbers change, never the code.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SpecialTokens:
    pad: int = 151643            # <|endoftext|>
    im_start: int = 151644       # <|im_start|>
    im_end: int = 151645         # <|im_end|>  (thinker eos)
    audio_pad: int = 151646      # <|AUDIO|>
    audio_bos: int = 151647      # <|audio_bos|>
    audio_eos: int = 151648      # <|audio_eos|>
    vision_bos: int = 151652     # <|vision_bos|>
    vision_eos: int = 151653     # <|vision_eos|>
    vision_pad: int = 151654     # <|vision_pad|>
    image_pad: int = 151655      # <|IMAGE|>
    video_pad: int = 151656      # <|VIDEO|>
    tts_text_pad: int = 151859   # text track filler once the reply is used up
    tts_text_bos: int = 151860
    tts_text_eos: int = 151861

    def __post_init__(self):
        ids = dataclasses.asdict(self)
        for k, v in ids.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SpecialTokens.{k} must be a non-negative integer, got {v!r}")
        seen: dict[int, str] = {}
        for k, v in ids.items():
            _check(v not in seen, f"SpecialTokens.{k} and SpecialTokens.{seen.get(v)} share the id {v}")
            seen[v] = k

    @property
    def media_pads(self) -> tuple[int, int, int]:
        """The placeholder ids that stand for media rows: audio, image, video."""
        return self.audio_pad, self.image_pad, self.video_pad

    @property
    def max_id(self) -> int:
        return max(dataclasses.asdict(self).values())


# ----------------------------------------------------------------------------------------------------------------
# Thinker language model (Qwen2 decoder with M-RoPE), reference 1.1.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ThinkerConfig:
    vocab_size: int = 152064
    d_model: int = 3584
    n_layer: int = 28
    n_head: int = 28
    n_kv_head: int = 4
    d_ff: int = 18944
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    rms_eps: float = 1e-6
    max_seq_len: int = 32768
    tie_embeddings: bool = False

    def __post_init__(self):
        _positive(self, "vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "max_seq_len")
        _divides(self, "n_head", "d_model")
        _divides(self, "n_kv_head", "n_head")
        _check_mrope(self, self.head_dim)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def embed_dim(self) -> int:  # width of embed_tokens; the talker's differs from its d_model
        return self.d_model


def _check_mrope(cfg, head_dim: int) -> None:
    sec = cfg.mrope_section
    _check(isinstance(sec, (list, tuple)) and len(sec) == 3 and all(isinstance(s, int) and s > 0 for s in sec),
           f"mrope_section must be three positive integers (t, h, w), got {sec!r}")
    _check(sum(sec) * 2 == head_dim,
           f"mrope_section {list(sec)} must sum to head_dim / 2 = {head_dim // 2} (head_dim is {head_dim})")


# ----------------------------------------------------------------------------------------------------------------
# Audio encoder (Whisper-style, chunked attention), reference 1.2.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class AudioConfig:
    n_mels: int = 128
    d_model: int = 1280
    n_layer: int = 32
    n_head: int = 20
    d_ff: int = 5120
    n_window: int = 100             # a chunk is 2 * n_window mel frames = 2 s
    max_source_positions: int = 1500
    output_dim: int = 3584
    max_seconds: float = 300.0      # the Whisper front end pads/truncates to 300 s

    def __post_init__(self):
        _positive(self, "n_mels", "d_model", "n_layer", "n_head", "d_ff", "n_window",
                  "max_source_positions", "output_dim")
        _divides(self, "n_head", "d_model")
        _check(self.d_model % 2 == 0, f"AudioConfig.d_model ({self.d_model}) must be even for the sinusoid table")
        _check(self.max_seconds > 0, f"AudioConfig.max_seconds must be positive, got {self.max_seconds}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def chunk_frames(self) -> int:  # mel frames per attention chunk (100 frames/s)
        return 2 * self.n_window


# ----------------------------------------------------------------------------------------------------------------
# Vision encoder (Qwen2.5-VL ViT), reference 1.3.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    d_model: int = 1280
    n_layer: int = 32
    n_head: int = 16
    d_ff: int = 3420
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112          # pixels
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    out_dim: int = 3584
    rope_theta: float = 10000.0

    def __post_init__(self):
        _positive(self, "d_model", "n_layer", "n_head", "d_ff", "in_channels", "patch_size",
                  "temporal_patch_size", "spatial_merge_size", "window_size", "out_dim")
        _divides(self, "n_head", "d_model")
        _check(self.head_dim % 4 == 0, f"VisionConfig head_dim ({self.head_dim}) must be a multiple of 4 for 2-D rope")
        unit = self.patch_size * self.spatial_merge_size
        _check(self.window_size % unit == 0,
               f"VisionConfig.window_size ({self.window_size}) must be a multiple of patch_size * spatial_merge_size ({unit})")
        for i in self.fullatt_block_indexes:
            _check(0 <= i < self.n_layer, f"fullatt_block_indexes entry {i} is not a layer index below n_layer ({self.n_layer})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def patch_dim(self) -> int:  # length of one flattened patch: C * T * P * P
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:  # patches merged into one LLM token
        return self.spatial_merge_size ** 2

    @property
    def factor(self) -> int:  # pixels per LLM token side (28)
        return self.patch_size * self.spatial_merge_size


# ----------------------------------------------------------------------------------------------------------------
# Talker (dual-track codec LM), reference 1.4. head_dim is a field: the 7B talker has 12 heads of 128 on a
# width of 896, so it is not d_model / n_head.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TalkerConfig:
    vocab_size: int = 8448
    embed_dim: int = 3584           # codec embedding width = thinker width (the two tracks are added there)
    d_model: int = 896
    n_layer: int = 24
    n_head: int = 12
    n_kv_head: int = 4
    head_dim: int = 128
    d_ff: int = 18944
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    rms_eps: float = 1e-6
    max_seq_len: int = 32768
    codec_pad: int = 8292
    codec_bos: int = 8293
    codec_eos: int = 8294
    codec_mask: int = 8296

    def __post_init__(self):
        _positive(self, "vocab_size", "embed_dim", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim",
                  "d_ff", "max_seq_len")
        _divides(self, "n_kv_head", "n_head")
        _check_mrope(self, self.head_dim)
        for n in ("codec_pad", "codec_bos", "codec_eos", "codec_mask"):
            v = getattr(self, n)
            _check(0 <= v < self.vocab_size, f"TalkerConfig.{n} ({v}) must lie inside vocab_size ({self.vocab_size})")


# ----------------------------------------------------------------------------------------------------------------
# Token2Wav: flow-matching DiT with an ECAPA-TDNN speaker encoder (reference 1.5), and BigVGAN (reference 1.6).
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DiTConfig:
    d_model: int = 1024
    n_layer: int = 22
    n_head: int = 16
    head_dim: int = 64
    ff_mult: int = 2
    emb_dim: int = 512
    num_embeds: int = 8193          # the code table has num_embeds + 1 rows
    repeats: int = 2                # mel frames per code
    mel_dim: int = 80
    block_size: int = 24
    look_ahead_layers: list[int] = field(default_factory=lambda: [10])
    look_backward_layers: list[int] = field(default_factory=lambda: [0, 20])
    rope_theta: float = 10000.0
    max_mel_len: int = 32768
    dropout: float = 0.1
    enc_emb_dim: int = 192          # x-vector `cond` width
    enc_dim: int = 128              # ECAPA output width
    enc_channels: list[int] = field(default_factory=lambda: [256, 256, 256, 256, 768])
    enc_kernel_sizes: list[int] = field(default_factory=lambda: [5, 3, 3, 3, 1])
    enc_dilations: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 1])
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64
    # how Token2Wav samples by default (official: 3/8-rule RK4, 10 time points, guidance 0.5, sway -1)
    ode_solver: str = "rk4"
    ode_steps: int = 10
    guidance: float = 0.5
    sway: float = -1.0

    def __post_init__(self):
        _check(self.ode_solver in ("euler", "rk4"), f"DiTConfig.ode_solver must be 'euler' or 'rk4', got {self.ode_solver!r}")
        _check(isinstance(self.ode_steps, int) and self.ode_steps >= 2,
               f"DiTConfig.ode_steps must be an integer >= 2 (time points including 0 and 1), got {self.ode_steps!r}")
        _check(self.guidance >= 0, f"DiTConfig.guidance must be >= 0, got {self.guidance}")
        _positive(self, "d_model", "n_layer", "n_head", "head_dim", "ff_mult", "emb_dim", "num_embeds", "repeats",
                  "mel_dim", "block_size", "max_mel_len", "enc_emb_dim", "enc_dim", "enc_attention_channels",
                  "enc_res2net_scale", "enc_se_channels")
        _check(self.head_dim % 2 == 0, f"DiTConfig.head_dim ({self.head_dim}) must be even for rotary")
        _check(0.0 <= self.dropout < 1.0, f"DiTConfig.dropout must lie in [0, 1), got {self.dropout}")
        for name in ("look_ahead_layers", "look_backward_layers"):
            for i in getattr(self, name):
                _check(0 <= i < self.n_layer, f"DiTConfig.{name} entry {i} is not a layer index below n_layer ({self.n_layer})")
        n = len(self.enc_channels)
        _check(n >= 3 and len(self.enc_kernel_sizes) == n and len(self.enc_dilations) == n,
               f"enc_channels, enc_kernel_sizes and enc_dilations must have the same length (at least 3), "
               f"got {len(self.enc_channels)}, {len(self.enc_kernel_sizes)}, {len(self.enc_dilations)}")
        _check(self.enc_channels[1] % self.enc_res2net_scale == 0,
               f"enc_res2net_scale ({self.enc_res2net_scale}) must divide enc_channels[1] ({self.enc_channels[1]})")

    @property
    def layer_back_ahead(self) -> list[tuple[int, int]]:
        """(blocks back, blocks ahead) each layer may see, e.g. layer 0 of the official model: (1, 0)."""
        return [(int(i in self.look_backward_layers), int(i in self.look_ahead_layers)) for i in range(self.n_layer)]

    @property
    def receptive_blocks(self) -> tuple[int, int]:
        """Blocks of context the whole stack sees (back, ahead): (2, 1) for the official model."""
        ba = self.layer_back_ahead
        return sum(b for b, _ in ba), sum(a for _, a in ba)


@dataclass
class VocoderConfig:
    mel_dim: int = 80
    upsample_initial_channel: int = 1536
    upsample_rates: list[int] = field(default_factory=lambda: [5, 3, 2, 2, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [11, 7, 4, 4, 4, 4])
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    sample_rate: int = 24000

    def __post_init__(self):
        _positive(self, "mel_dim", "upsample_initial_channel", "sample_rate")
        _check(len(self.upsample_rates) == len(self.upsample_kernel_sizes) > 0,
               "upsample_rates and upsample_kernel_sizes must be non-empty and of the same length")
        _check(len(self.resblock_kernel_sizes) == len(self.resblock_dilation_sizes) > 0,
               "resblock_kernel_sizes and resblock_dilation_sizes must be non-empty and of the same length")
        _check(self.upsample_initial_channel % 2 ** len(self.upsample_rates) == 0,
               f"upsample_initial_channel ({self.upsample_initial_channel}) must be divisible by "
               f"2 ** {len(self.upsample_rates)} (it is halved at every upsampling stage)")

    @property
    def hop_length(self) -> int:  # waveform samples per mel frame (240 = 10 ms at 24 kHz)
        return math.prod(self.upsample_rates)


# ----------------------------------------------------------------------------------------------------------------
# The whole model.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class OmniConfig:
    thinker: ThinkerConfig = field(default_factory=ThinkerConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    talker: TalkerConfig = field(default_factory=TalkerConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    position_id_per_seconds: int = 25   # one temporal position = 40 ms
    seconds_per_chunk: int = 2          # audio-in-video interleaving chunk
    enable_audio_output: bool = True    # False: no talker and no token2wav are built
    name: str = "custom"

    def __post_init__(self):
        _positive(self, "position_id_per_seconds", "seconds_per_chunk")
        t = self.thinker
        _check(self.tokens.max_id < t.vocab_size,
               f"special token id {self.tokens.max_id} does not fit thinker.vocab_size ({t.vocab_size})")
        _check(self.audio.output_dim == t.d_model,
               f"audio.output_dim ({self.audio.output_dim}) must equal thinker.d_model ({t.d_model})")
        _check(self.vision.out_dim == t.d_model,
               f"vision.out_dim ({self.vision.out_dim}) must equal thinker.d_model ({t.d_model})")
        _check(self.talker.embed_dim == t.d_model,
               f"talker.embed_dim ({self.talker.embed_dim}) must equal thinker.d_model ({t.d_model})")
        _check(self.vocoder.mel_dim == self.dit.mel_dim,
               f"vocoder.mel_dim ({self.vocoder.mel_dim}) must equal dit.mel_dim ({self.dit.mel_dim})")

    # -- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "OmniConfig":
        if not isinstance(d, dict):
            raise TypeError(f"OmniConfig.from_dict expects a dict, got {type(d).__name__}")
        return _build(cls, d, "config")

    @classmethod
    def from_json(cls, text: str) -> "OmniConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides) -> "OmniConfig":
        """A copy with dotted overrides applied: cfg.replace(**{"thinker.n_layer": 4})."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_dotted(d, key, value, type(self))
        return type(self).from_dict(d)

    @classmethod
    def from_hf_config(cls, hf: dict, enable_audio_output: bool | None = None,
                       tokens: SpecialTokens | None = None) -> "OmniConfig":
        """Read an official Qwen2.5-Omni `config.json` (a dict). Special ids that config.json does not name come
        from `tokens` (the tokenizer's), else the official ones. See `_from_hf` below for the field mapping."""
        from .hf_config import omni_config_from_hf

        return omni_config_from_hf(hf, enable_audio_output, tokens)


def _build(cls, d: dict, where: str):
    """Recursively build dataclass `cls` from dict `d`, rejecting unknown keys and checking types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        kwargs[k] = _coerce(hints[k], v, f"{where}.{k}")
    return cls(**kwargs)


def _coerce(tp, v, where: str):
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise TypeError(f"{where} must be a mapping, got {type(v).__name__}")
        return _build(tp, v, where)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {v!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, x, f"{where}[{i}]") for i, x in enumerate(v)]
    if tp is bool:
        if not isinstance(v, bool):
            raise TypeError(f"{where} must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise TypeError(f"{where} must be an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{where} must be a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise TypeError(f"{where} must be a string, got {v!r}")
        return v
    return v


def set_dotted(d: dict, key: str, value, root_cls=OmniConfig) -> None:
    """Set d["a"]["b"] = value for key "a.b", after checking that "a.b" names a field of the config."""
    parts = key.split(".")
    node, cls = d, root_cls
    for i, p in enumerate(parts):
        if not (dataclasses.is_dataclass(cls) and p in {f.name for f in dataclasses.fields(cls)}):
            path = ".".join(parts[: i + 1])
            raise ValueError(f"unknown config key '{path}' in override '{key}'")
        tp = typing.get_type_hints(cls)[p]
        if i == len(parts) - 1:
            node[p] = value
        else:
            node, cls = node[p], tp


def parse_override(arg: str, root_cls=OmniConfig) -> tuple[str, object]:
    """Parse '--thinker.n_layer=4' (or 'thinker.n_layer=4') into ('thinker.n_layer', 4), typed by the field."""
    s = arg[2:] if arg.startswith("--") else arg
    if "=" not in s:
        raise ValueError(f"override '{arg}' must look like --section.field=value")
    key, raw = s.split("=", 1)
    cls, parts = root_cls, key.split(".")
    tp = None
    for i, p in enumerate(parts):
        if not (dataclasses.is_dataclass(cls) and p in {f.name for f in dataclasses.fields(cls)}):
            raise ValueError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{arg}'")
        tp = typing.get_type_hints(cls)[p]
        cls = tp
    if dataclasses.is_dataclass(tp):
        raise ValueError(f"override '{arg}' names a whole section; name one field, e.g. --{key}.n_layer=2")
    try:
        value = json.loads(raw) if typing.get_origin(tp) is list or tp in (bool, int, float) else raw
    except json.JSONDecodeError:
        raise ValueError(f"override '{arg}': cannot read {raw!r} as {getattr(tp, '__name__', tp)}") from None
    return key, _coerce(tp, value, key)


# ----------------------------------------------------------------------------------------------------------------
# Presets.
# ----------------------------------------------------------------------------------------------------------------
def tiny_tokens() -> SpecialTokens:
    """Special ids for the byte-level tokenizer of the tiny models: bytes are 0..255, specials follow."""
    names = [f.name for f in dataclasses.fields(SpecialTokens)]
    return SpecialTokens(**{n: 256 + i for i, n in enumerate(names)})


def _tiny() -> OmniConfig:
    d = 64
    n_codes = 256  # size of the tiny speech codebook (codec.py)
    return OmniConfig(
        thinker=ThinkerConfig(vocab_size=320, d_model=d, n_layer=2, n_head=4, n_kv_head=2, d_ff=128,
                              mrope_section=[2, 3, 3], max_seq_len=4096),
        audio=AudioConfig(d_model=d, n_layer=2, n_head=4, d_ff=128, output_dim=d),
        vision=VisionConfig(d_model=d, n_layer=2, n_head=4, d_ff=128, fullatt_block_indexes=[1], out_dim=d),
        talker=TalkerConfig(vocab_size=n_codes + 8, embed_dim=d, d_model=d, n_layer=2, n_head=4, n_kv_head=2,
                            head_dim=16, d_ff=128, mrope_section=[2, 3, 3], max_seq_len=4096,
                            codec_pad=n_codes, codec_bos=n_codes + 1, codec_eos=n_codes + 2, codec_mask=n_codes + 4),
        # the DiT is wider than the rest: with d_model below mel_dim (80) flow matching cannot learn the codes
        dit=DiTConfig(d_model=128, n_layer=4, n_head=8, head_dim=16, emb_dim=32, num_embeds=n_codes + 1,
                      look_ahead_layers=[2], look_backward_layers=[0, 3], max_mel_len=8192, dropout=0.0,
                      enc_emb_dim=32, enc_dim=32, enc_channels=[32, 32, 32, 32, 96],
                      enc_attention_channels=16, enc_se_channels=16, ode_solver="euler", ode_steps=6),
        # one AMP kernel (3 dilations) per stage: ~3x cheaper than the official three kernels (3, 7, 11),
        # which is what lets the tiny model stream in real time on a laptop CPU (bench/streaming.py)
        vocoder=VocoderConfig(upsample_initial_channel=128, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]]),
        tokens=tiny_tokens(),
        name="tiny",
    )


def _qwen2_5_omni_7b() -> OmniConfig:
    return OmniConfig(name="qwen2_5_omni_7b")  # the dataclass defaults are the official 7B numbers


def _qwen2_5_omni_3b() -> OmniConfig:
    # Reference 1.1-1.4. The 3B talker numbers are second-hand (14/2 heads of 64, mrope [8,12,12]).
    return OmniConfig(
        thinker=ThinkerConfig(vocab_size=151936, d_model=2048, n_layer=36, n_head=16, n_kv_head=2, d_ff=11008),
        audio=AudioConfig(output_dim=2048),
        vision=VisionConfig(out_dim=2048),
        talker=TalkerConfig(embed_dim=2048, d_model=896, n_layer=24, n_head=14, n_kv_head=2, head_dim=64,
                            d_ff=4864, mrope_section=[8, 12, 12]),
        name="qwen2_5_omni_3b",
    )


PRESETS = {"tiny": _tiny, "qwen2_5_omni_3b": _qwen2_5_omni_3b, "qwen2_5_omni_7b": _qwen2_5_omni_7b}


def get_config(name: str, **overrides) -> OmniConfig:
    """A preset by name, with optional dotted overrides: get_config("tiny", **{"thinker.n_layer": 3})."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
