"""Moving weights in and out: the checkpoint key map, a strict loader that reports every problem at once, and
atomic safetensors checkpoints (weights + config JSON; nothing is ever unpickled).

Our module tree uses the official (flat, Hub) checkpoint names, so the official files need no renaming:
    thinker.model.*            the language model          thinker.lm_head.weight
    thinker.audio_tower.*      audio encoder               thinker.visual.*   vision encoder
    talker.*                   codec LM                    token2wav.code2wav_dit_model.* / code2wav_bigvgan_model.*
Newer transformers versions nest some of these when they save; KEY_MAP turns any known layout into ours.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

# (pattern, replacement), applied in order to every incoming key.
KEY_MAP: list[tuple[str, str]] = [
    (r"^thinker\.model\.language_model\.", "thinker.model."),     # transformers >= 5 nesting
    (r"^thinker\.model\.audio_tower\.", "thinker.audio_tower."),
    (r"^thinker\.model\.visual\.", "thinker.visual."),
    (r"^talker\.model\.language_model\.", "talker.model."),
]
# Keys that some writers include but that we derive at load time (non-persistent buffers).
DERIVED = re.compile(r"(rotary_emb\.inv_freq|\.inv_freq|\.filter|positional_embedding\.positional_embedding)$")


def canonical_key(key: str) -> str:
    """Map a key from any known layout to ours.

    >>> canonical_key("thinker.model.language_model.layers.0.mlp.up_proj.weight")
    'thinker.model.layers.0.mlp.up_proj.weight'
    >>> canonical_key("thinker.model.audio_tower.conv1.weight")
    'thinker.audio_tower.conv1.weight'
    """
    for pat, rep in KEY_MAP:
        key = re.sub(pat, rep, key)
    return key


class CheckpointError(ValueError):
    pass


def load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], *, prefix: str = "",
                 skip_prefixes: tuple[str, ...] = (), source: str = "state dict") -> None:
    """Copy `state_dict` into `module`, whose own keys are `prefix` + its state_dict keys.

    Incoming keys are first mapped by KEY_MAP. Keys under `skip_prefixes` (parts we did not build) and derived
    buffers are ignored. Missing, unexpected and mis-shaped keys are reported by name, all at once.
    """
    own = {prefix + k: v for k, v in module.state_dict().items()}
    incoming = {}
    for k, v in state_dict.items():
        ck = canonical_key(k)
        if DERIVED.search(ck) and ck not in own:
            continue
        if any(ck.startswith(p) for p in skip_prefixes):
            continue
        incoming[ck] = v
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(incoming[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(incoming) if tuple(incoming[k].shape) != tuple(own[k].shape))
    report_problems(missing, unexpected, shapes, source)
    stacks = stacked_keys(module)
    for k, v in incoming.items():
        put_weight(module, k[len(prefix):], v, stacks)


def report_problems(missing: list[str], unexpected: list[str], shapes: list[str], source: str) -> None:
    """Raise one CheckpointError that lists every missing, unexpected and mis-shaped key (20 of each shown)."""
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            shown = items if len(items) <= 20 else items[:20] + [f"... and {len(items) - 20} more"]
            problems.append(f"{len(items)} {title} key(s):\n    " + "\n    ".join(shown))
    if problems:
        raise CheckpointError(f"cannot load {source}:\n  " + "\n  ".join(problems))


def stacked_keys(module: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Checkpoint keys that live in rows of a StackedLinear: {key: (tensor name, first row, end row)}.

    >>> from nano_omni.layers import SwiGLU
    >>> stacked_keys(SwiGLU(4, 3))["up_proj.weight"]
    ('gate_up_proj.weight', 3, 6)
    """
    from .layers import StackedLinear, sibling_prefix

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, StackedLinear):
            owner = sibling_prefix(name + ".")
            for part, (a, b) in m.part_rows().items():
                for attr in ("weight", "bias"):
                    if getattr(m, attr) is not None:
                        out[f"{owner}{part}.{attr}"] = (f"{name}.{attr}", a, b)
    return out


def put_weight(module: nn.Module, key: str, value: torch.Tensor, stacks: dict, cast: bool = True) -> None:
    """Write the checkpoint tensor `value` of our key `key` into `module` (stacks: `stacked_keys(module)`).

    A real tensor is copied into (cast to its dtype). A meta tensor (a model built on the meta device) is replaced
    by real storage: `value` itself, cast to the meta tensor's dtype when `cast`, else kept as it is; a stacked
    tensor is first allocated whole, on `value`'s device, and each part then fills its rows.
    """
    name, rows = (stacks[key][0], stacks[key][1:]) if key in stacks else (key, None)
    *path, leaf = name.split(".")
    owner = module
    for p in path:
        owner = getattr(owner, p)
    old = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
    if old.device.type == "meta":
        dtype = old.dtype if cast else value.dtype
        new = value.to(dtype) if rows is None else torch.empty(old.shape, dtype=dtype, device=value.device)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)   # shares new's storage
        else:
            owner._buffers[leaf] = new
        if rows is None:
            return
        old = new
    with torch.no_grad():
        (old if rows is None else old[rows[0]: rows[1]]).copy_(value.to(old.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Our own checkpoints: a directory with model.safetensors + config.json (+ anything else, e.g. a training log).
# ----------------------------------------------------------------------------------------------------------------
def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable: a rename lives in the folder's entries, which a crash can lose
    until the folder itself is synced. Skipped where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename it over the target: readers see the old
    file or the new one, never half of one, and after a crash the disk holds one of them too (the file is synced
    before the rename, the folder after it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)       # the mode open() would give; mkstemp's own is private (0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict,
                    extra_json: dict[str, dict] | None = None) -> None:
    """Write `directory/model.safetensors` and `directory/config.json` atomically (each file on its own)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    # tied weights share storage; safetensors wants each stored once
    seen, unique = {}, {}
    for k, v in tensors.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if v.numel() and key in seen:
            continue
        seen[key] = k
        unique[k] = v
    atomic_write_bytes(Path(directory) / "model.safetensors", save(unique))
    atomic_write_bytes(Path(directory) / "config.json", json.dumps(config, indent=2).encode())
    for name, obj in (extra_json or {}).items():
        atomic_write_bytes(Path(directory) / name, json.dumps(obj, indent=2).encode())


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a .safetensors file, turning a truncated or corrupt file into a clear error naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read (config dict, state dict) from a directory written by save_checkpoint."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it a nano_omni checkpoint directory?")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    return config, read_safetensors(directory / "model.safetensors")
