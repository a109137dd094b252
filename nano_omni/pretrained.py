"""Loading a model directory: the official Qwen2.5-Omni layout (as on the Hub, or as transformers saves it), or a
checkpoint written by nano_omni's own training.

Official directory: config.json (model_type "qwen2_5_omni"), model.safetensors or model-0000k-of-0000n.safetensors
with model.safetensors.index.json, spk_dict.pt (voices), tokenizer.json or vocab.json + merges.txt.
nano_omni directory: config.json (an OmniConfig), model.safetensors, voices.safetensors, optionally tokenizer files.

The model is built on the meta device (no memory, no random init), then every shard is read in turn and each
tensor goes straight into place in its final dtype, so peak memory is about the model's size, not twice it.
Derived buffers (rotary tables, sinusoids, anti-aliasing filters) are rebuilt afterwards. By default the Thinker
and Talker are kept in bf16 and Token2Wav in fp32, as the official model runs. Missing, unexpected and mis-shaped
keys are reported by name, all at once.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import DERIVED, CheckpointError, canonical_key, put_weight, report_problems, stacked_keys
from .config import OmniConfig, SpecialTokens
from .omni import Omni, load_voices


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None


def read_config(directory: str | Path, enable_audio_output: bool | None = None,
                tokens: SpecialTokens | None = None) -> OmniConfig:
    """The OmniConfig of a model directory (official or nano_omni). `tokens`: special ids to use where an official
    config.json does not name them (by default: those of the directory's tokenizer files, else the official ids)."""
    directory = Path(directory)
    path = directory / "config.json"
    raw = _read_json(path, "the model's config")
    if tokens is None and "model_type" in raw:
        tokens = special_tokens_from_tokenizer(directory)
    try:
        if "model_type" in raw:
            return OmniConfig.from_hf_config(raw, enable_audio_output, tokens)
        if not isinstance(raw, dict) or "thinker" not in raw:
            raise ValueError("it is neither an official config (no model_type) nor a nano_omni one (no thinker "
                             "section)")
        cfg = OmniConfig.from_dict(raw)
        return cfg if enable_audio_output is None else cfg.replace(enable_audio_output=enable_audio_output)
    except KeyError as e:         # a field the official config always has
        raise CheckpointError(f"{path}: the field {e.args[0]!r} is missing (every qwen2_5_omni config.json names "
                              f"it)") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def special_tokens_from_tokenizer(directory: Path) -> SpecialTokens | None:
    """Special ids named in the directory's tokenizer files (tokenizer.json or tokenizer_config.json), or None."""
    from .tokenizer import SPECIAL_TEXT

    names = {}
    tj, tc = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if tj.is_file():
        for t in _read_json(tj, "the tokenizer").get("added_tokens", []):
            names[t.get("content")] = t.get("id")
    elif tc.is_file():
        for i, t in (_read_json(tc, "the tokenizer config").get("added_tokens_decoder") or {}).items():
            names[t.get("content")] = int(i)
    if not names:
        return None
    ids = {field: names[text] for field, text in SPECIAL_TEXT.items() if text in names}
    return SpecialTokens(**{**SpecialTokens().__dict__, **ids})


def _shards(directory: Path) -> dict[Path, set[str]]:
    """Shard file -> the keys the index says it holds (empty set: not known, a single-file checkpoint)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        shards: dict[Path, set[str]] = {}
        for key, fname in weight_map.items():
            shards.setdefault(directory / fname, set()).add(key)
        for path, keys in shards.items():
            if not path.is_file():
                raise CheckpointError(f"shard {path} is missing; {index.name} maps {len(keys)} key(s) to it, "
                                      f"e.g. {sorted(keys)[0]}")
        return shards
    single = directory / "model.safetensors"
    if single.is_file():
        return {single: set()}
    raise FileNotFoundError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json")


def materialize_derived_buffers(model: torch.nn.Module, device) -> None:
    """Recompute every derived (non-persistent) buffer, e.g. after building on the meta device."""
    with torch.device("cpu"):
        for m in model.modules():
            if hasattr(m, "derived_buffers"):
                for name, value in m.derived_buffers().items():
                    m._buffers[name] = value.to(device)


def load_model(directory: str | Path, *, enable_audio_output: bool | None = None, dtype: torch.dtype = torch.bfloat16,
               token2wav_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               tokens: SpecialTokens | None = None):
    """Build the model of `directory` and load its weights. Returns (Omni, tokenizer or None).

    enable_audio_output=False skips the speech half (no Talker, no Token2Wav: their keys are ignored).
    dtype: Thinker and Talker; token2wav_dtype: DiT and BigVGAN (fp32 is what the official model uses).
    tokens: special ids where an official config.json does not name them (default: from the tokenizer files).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    cfg = read_config(directory, enable_audio_output, tokens)
    with torch.device("meta"):
        model = Omni(cfg)
    own = model.state_dict()                 # checkpoint names (stacked weights listed part by part)
    stacks = stacked_keys(model)
    skip = () if cfg.enable_audio_output else ("talker.", "token2wav.")
    loaded, unexpected, shapes = set(), [], []
    for shard, listed in _shards(directory).items():
        try:
            from safetensors import safe_open

            with safe_open(str(shard), "pt") as f:
                for key in f.keys():
                    ck = canonical_key(key)
                    if ck.startswith(skip) or (DERIVED.search(ck) and ck not in own):
                        continue
                    if ck not in own:
                        unexpected.append(ck)
                        continue
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(own[ck].shape):
                        shapes.append(f"{ck}: checkpoint {tuple(t.shape)} vs model {tuple(own[ck].shape)}")
                        loaded.add(ck)                       # present, just wrong: reported once, as mis-shaped
                        continue
                    want = token2wav_dtype if ck.startswith("token2wav.") else dtype
                    put_weight(model, ck, t.to(device=device, dtype=want if t.is_floating_point() else t.dtype),
                               stacks, cast=False)
                    loaded.add(ck)
        except CheckpointError:
            raise
        except Exception as e:   # a bad header or a file cut short
            raise CheckpointError(f"cannot read shard {shard} (truncated or corrupt?): {e}") from None
    missing = sorted(set(own) - loaded)
    if cfg.thinker.tie_embeddings and "thinker.lm_head.weight" in missing:
        missing.remove("thinker.lm_head.weight")
        model.thinker.lm_head.weight = model.thinker.model.embed_tokens.weight
    report_problems(missing, sorted(unexpected), sorted(shapes), f"the weights in {directory}")
    materialize_derived_buffers(model, device)
    for name in ("spk_dict.pt", "voices.safetensors"):
        if (directory / name).is_file() and cfg.enable_audio_output:
            model.voices = load_voices(directory / name, cfg)
    return model.eval(), load_tokenizer(directory, cfg)


def load_tokenizer(directory: Path, cfg: OmniConfig):
    """The directory's tokenizer: Qwen's BPE files if present, else the byte tokenizer of the tiny models."""
    if any((directory / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        from .bpe import QwenBPE

        return QwenBPE.from_dir(directory)
    if cfg.thinker.vocab_size < 1024:
        from .tokenizer import ByteTokenizer

        return ByteTokenizer(cfg.tokens, cfg.thinker.vocab_size)
    return None


def from_pretrained(directory: str | Path, **kw):
    """An official Qwen2.5-Omni directory -> (Omni, tokenizer). Keywords as `load_model`."""
    return load_model(directory, **kw)


def weight_bytes(preset: str, dtype_bytes: int = 2, token2wav_bytes: int = 4) -> dict[str, int]:
    """Bytes of weights per part of a preset, as load_model keeps them (Thinker and Talker in bf16, Token2Wav fp32)."""
    from .config import get_config

    with torch.device("meta"):
        m = Omni(get_config(preset))
    count = lambda prefix: sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix))  # noqa: E731
    return {"thinker": count("thinker.") * dtype_bytes, "talker": count("talker.") * dtype_bytes,
            "token2wav": count("token2wav.") * token2wav_bytes}


if __name__ == "__main__":   # python -m nano_omni.pretrained: the memory the weights of each preset take
    for name in ("qwen2_5_omni_3b", "qwen2_5_omni_7b"):
        b = weight_bytes(name)
        print(f"{name}: weights {sum(b.values()) / 1e9:.1f} GB with speech "
              f"(Thinker {b['thinker'] / 1e9:.1f}, Talker {b['talker'] / 1e9:.1f}, Token2Wav {b['token2wav'] / 1e9:.1f}); "
              f"{b['thinker'] / 1e9:.1f} GB text only (enable_audio_output=False)")
