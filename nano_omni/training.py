"""Training machinery shared by train_tiny.py's stages: devices, distributed runs, checkpoints that survive a kill,
resumable loops, logs and loss plots.

Resumability rests on one rule: everything random in step s is drawn from generators seeded by (seed, stage, s),
and the batch of step s is a pure function of (seed, s). A checkpoint then only needs the weights, the optimizer
state and the step; a resumed run repeats the losses of an uninterrupted one exactly.

Checkpoint directory (nothing in it is ever unpickled):
    model.safetensors + config.json       the whole model, loadable by pretrained.load_model
    state/<stage>.safetensors + .json     optimizer moments and the step of an unfinished stage
A checkpoint is written to a sibling temporary directory and swapped in with renames, so a kill at any moment
leaves either the old or the new checkpoint, never half of one.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import atomic_write_bytes, fsync_dir


# ----------------------------------------------------------------------------------------------------------------
# Devices and processes.
# ----------------------------------------------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    """"auto": CUDA, else Apple's MPS, else the CPU; or the device named ("cpu", "cuda", "cuda:1", "mps"), refused
    with a ValueError when torch cannot parse it or this machine lacks it."""
    have = {"cuda": torch.cuda.is_available(),
            "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if name != "auto":
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps") from None
        if not have.get(dev.type, True):
            raise ValueError(f"device {name!r}: this machine's torch has no {dev.type} device (try auto or cpu)")
        return dev
    if have["cuda"]:
        return torch.device("cuda")
    if have["mps"]:
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as the official model runs); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def close_distributed(wait: bool = True) -> None:
    """Leave the process group before the interpreter exits. Left to exit-time teardown, a gloo rank could abort
    ("terminate called without an active exception", about one two-process run in twenty here) after its work
    was done, and torchrun then failed the whole run. `wait`: meet the other ranks first."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist_info()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def token_mean_loss(loss_sum: torch.Tensor, n_local: int) -> tuple[torch.Tensor, float]:
    """Turn this rank's summed loss into the term whose gradient, averaged over ranks (as DDP does), equals the
    gradient of the global per-token mean; also return that global mean for the log."""
    rank, world = dist_info()
    n = float(all_sum(torch.tensor(float(n_local))).item())
    total = float(all_sum(loss_sum.detach().float()).item())
    return loss_sum * world / max(n, 1.0), total / max(n, 1.0)


def step_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of a step: epoch e's permutation (seeded by seed and e), sliced."""
    per_epoch = max(1, n_items // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
    return perm[k * batch_size: (k + 1) * batch_size].tolist()


def task_step_indices(groups: list[list[int]], batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of a step when every batch holds items of one group only (one task): steps come in rounds
    of len(groups), each group serving one batch per round in a seeded order; within a group, items come epoch by
    epoch from its own seeded permutation (as in step_indices). Tasks then share the steps equally, and a batch
    is padded only to the lengths of its own task (a video row no longer makes 31 text rows 200 tokens long)."""
    rnd, g = step // len(groups), step_group(len(groups), step, seed)
    return [groups[g][i] for i in step_indices(len(groups[g]), batch_size, rnd, seed * 31 + g)]


def step_group(n_groups: int, step: int, seed: int) -> int:
    """Which group serves the batch of `step` in task_step_indices."""
    rnd, k = divmod(step, n_groups)
    return int(torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed * 10_007 + rnd))[k])


def local_share(indices: list[int]) -> list[int]:
    rank, world = dist_info()
    return indices[rank::world]


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 131 + stage) * 1_000_003 + step) % (2 ** 63))


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------------------------
def _swap_in(new: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _copy_synced(src, dst) -> None:
    """shutil.copy2, then the copy and its folder entry on disk: the checkpoint it comes from is deleted once the
    new one is swapped in, so a copy still in the page cache would be all a crash leaves."""
    shutil.copy2(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(Path(dst).parent)


def checkpoint_dir(run: Path) -> Path:
    """The run's checkpoint, or the one a kill during a swap left behind."""
    ck, old = run / "checkpoint", run / "checkpoint.old"
    return ck if ck.is_dir() else old


def save_run_checkpoint(run: Path, model: torch.nn.Module, config: dict, extra_files: dict[str, bytes] | None = None,
                        stage_state: tuple[str, torch.optim.Optimizer, dict] | None = None) -> None:
    """Write model + config (+ extra files, + an unfinished stage's optimizer state) atomically as a whole. Files
    of the previous checkpoint that this save does not rewrite (another stage's codec, voices, x-vectors, states)
    carry over: rerunning one stage keeps what the others wrote."""
    from safetensors.torch import save

    # every process takes part in gathering sharded (FSDP) tensors; then only the first one writes
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
          for k, v in _unwrap(model).state_dict().items()}
    if dist_info()[0] != 0:
        return
    final = run / "checkpoint"
    tmp = run / "checkpoint.new"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    prev = checkpoint_dir(run)
    if prev.is_dir():
        for f in prev.iterdir():
            if f.name in ("model.safetensors", "config.json") or f.name in (extra_files or {}):
                continue
            if f.is_dir():
                shutil.copytree(f, tmp / f.name, copy_function=_copy_synced)
            else:
                _copy_synced(f, tmp / f.name)
    atomic_write_bytes(tmp / "model.safetensors", save(_dedupe(sd)))
    atomic_write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode())
    for name, data in (extra_files or {}).items():
        atomic_write_bytes(tmp / name, data)
    if stage_state is not None:
        name, opt, meta = stage_state
        (tmp / "state").mkdir(exist_ok=True)
        tensors, scalars = optimizer_tensors(opt)
        atomic_write_bytes(tmp / "state" / f"{name}.safetensors", save(tensors))
        atomic_write_bytes(tmp / "state" / f"{name}.json", json.dumps({**meta, "optimizer": scalars}).encode())
    _swap_in(tmp, final)


def clear_stage_state(run: Path, name: str) -> None:
    for ext in ("safetensors", "json"):
        p = checkpoint_dir(run) / "state" / f"{name}.{ext}"
        if p.exists() and dist_info()[0] == 0:
            p.unlink()


def has_stage_state(run: Path, name: str) -> bool:
    """Whether the run holds an unfinished stage `name` (its optimizer and step) to resume."""
    return (checkpoint_dir(run) / "state" / f"{name}.json").is_file()


def load_stage_state(run: Path, name: str, opt: torch.optim.Optimizer) -> dict | None:
    """Restore an unfinished stage's optimizer; returns its meta (with 'step'), or None if there is none."""
    from safetensors.torch import load_file

    d = checkpoint_dir(run) / "state"
    if not has_stage_state(run, name):
        return None
    try:
        meta = json.loads((d / f"{name}.json").read_text())
        load_optimizer_tensors(opt, load_file(str(d / f"{name}.safetensors")), meta.pop("optimizer"))
    except Exception as e:      # a half-copied or hand-edited state: say which files, and how to go on without them
        raise SystemExit(f"cannot resume stage part {name!r} from {d}/{name}.json and .safetensors "
                         f"({type(e).__name__}: {e}); delete both and resume again to run that part from its first "
                         f"step") from None
    return meta


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "scalar_state": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars["scalar_state"][f"{pid}.{k}"] = v
    return tensors, scalars


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict, scalars: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in scalars["scalar_state"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def _unwrap(model):
    return getattr(model, "module", model)


def _dedupe(sd: dict) -> dict:
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Logs and plots.
# ----------------------------------------------------------------------------------------------------------------
class StageLog:
    """Per-stage CSV of (step, loss, lr, seconds, task) and, at the end, an SVG plot and a JSON summary.

    task: the task of the step's batch where every batch holds one task (stages 1-2), else empty. With tasks, the
    plot draws each task's own curve and the summary gives each task's final loss: the mix's single curve hides
    a task that has not started to learn (a picture task can sit on its plateau for hundreds of steps while the
    others fall)."""

    def __init__(self, run: Path, name: str, resume_step: int = 0):
        self.dir = run / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.csv"
        self.name, self.t0 = name, time.time()
        self.rows: list[list] = []
        if resume_step and self.path.is_file():   # keep the rows written before the kill, drop any beyond
            with open(self.path) as f:
                self.rows = [[int(r[0]), float(r[1]), float(r[2]), float(r[3]), r[4] if len(r) > 4 else ""]
                             for r in list(csv.reader(f))[1:] if int(r[0]) < resume_step]
        self._write()

    def add(self, step: int, loss: float, lr: float, task: str = "") -> None:
        self.rows.append([step, loss, lr, round(time.time() - self.t0, 3), task])
        if len(self.rows) % 20 == 0:
            self._write()

    def _write(self) -> None:
        if dist_info()[0] != 0:
            return
        lines = ["step,loss,lr,seconds,task"] + [f"{s},{l:.6f},{lr:.3g},{t},{k}" for s, l, lr, t, k in self.rows]
        atomic_write_bytes(self.path, ("\n".join(lines) + "\n").encode())

    def by_task(self) -> dict[str, list[tuple[int, float]]]:
        """{task: [(step, loss), ...]} in step order; empty when the steps carry no task."""
        out: dict[str, list[tuple[int, float]]] = {}
        for step, loss, _, _, task in self.rows:
            if task:
                out.setdefault(task, []).append((step, loss))
        return out

    def finish(self, extra: dict | None = None) -> dict:
        self._write()
        losses = [r[1] for r in self.rows]
        tasks = self.by_task()
        summary = {"stage": self.name, "steps": len(self.rows), "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None,
                   "final_loss_mean_of_last_20": sum(losses[-20:]) / max(1, len(losses[-20:])),
                   "seconds": round(time.time() - self.t0, 1), **(extra or {})}
        if tasks:   # each task's own last 20 steps
            summary["final_loss_by_task"] = {k: sum(loss for _, loss in v[-20:]) / len(v[-20:])
                                             for k, v in sorted(tasks.items())}
        if dist_info()[0] == 0:
            atomic_write_bytes(self.dir / f"{self.name}.json", json.dumps(summary, indent=2).encode())
            svg = task_loss_svg(tasks, self.name) if tasks else loss_svg(losses, self.name)
            atomic_write_bytes(self.dir / f"{self.name}.svg", svg.encode())
        return summary


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def loss_svg(losses: list[float], title: str, w: int = 480, h: int = 240) -> str:
    """A small line plot of the loss (log scale when it spans more than a decade) as SVG text."""
    return plot_svg({"": (list(range(len(losses))), losses)}, f"{title} loss", w, h)


def task_loss_svg(tasks: dict[str, list[tuple[int, float]]], title: str, smooth: int = 25, w: int = 640,
                  h: int = 320) -> str:
    """One curve per task: the mean of the task's last `smooth` steps (a batch's loss is noisy), against the step."""
    series = {}
    for task, pts in sorted(tasks.items()):
        steps, losses = [p[0] for p in pts], [p[1] for p in pts]
        means = [sum(losses[max(0, i - smooth + 1): i + 1]) / len(losses[max(0, i - smooth + 1): i + 1])
                 for i in range(len(losses))]
        series[task] = (steps, means)
    return plot_svg(series, f"{title} loss by task (mean of its last {smooth} steps)", w, h)


def plot_svg(series: dict[str, tuple[list[int], list[float]]], title: str, w: int, h: int) -> str:
    """Lines {label: (xs, ys)} on shared axes as SVG text; y on a log scale when it spans more than a decade; a
    legend when there is more than one line."""
    pad = 36
    ys_all = [y for _, ys in series.values() for y in ys]
    if not ys_all:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><text x="10" y="20">{title}: no steps</text></svg>'
    log = min(ys_all) > 0 and max(ys_all) / min(ys_all) > 10
    tr = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = min(map(tr, ys_all)), max(map(tr, ys_all))
    hi = hi if hi > lo else lo + 1
    x_hi = max(max(xs) for xs, _ in series.values() if xs) or 1
    fmt = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3g}")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{pad}" y="16" font-size="13">{title}{" (log scale)" if log else ""}</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>',
           f'<text x="2" y="{pad + 4}">{fmt(hi)}</text><text x="2" y="{h - pad}">{fmt(lo)}</text>',
           f'<text x="{w - pad - 40}" y="{h - pad + 16}">step {x_hi}</text>']
    for n, (label, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        pts = " ".join(f"{pad + (w - 2 * pad) * x / x_hi:.1f},{h - pad - (h - 2 * pad) * (tr(y) - lo) / (hi - lo):.1f}"
                       for x, y in zip(xs, ys))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>')
        if len(series) > 1:
            out.append(f'<text x="{w - pad - 110}" y="{pad + 12 * n}" fill="{colour}">{label}</text>')
    return "".join(out) + "</svg>"
