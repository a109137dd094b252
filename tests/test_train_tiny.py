"""train_tiny.py: every stage runs and leaves its artifacts; a killed run resumes to the same losses; two DDP
processes reproduce one process; bad runs get clear messages. Also sample.py on the trained run."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_tiny
from nano_omni.pretrained import load_model

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--threads", "1"]


def _losses(run: Path, name: str) -> list[float]:
    with open(run / "logs" / f"{name}.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_tiny.main(QUICK + ["--out", str(out), "--dpo"])
    return out


def test_quick_run_makes_every_artifact(quick_run):
    ck = quick_run / "checkpoint"
    for name in ("model.safetensors", "config.json", "codec.safetensors", "voices.safetensors", "progress.json"):
        assert (ck / name).is_file(), name
    assert json.loads((ck / "progress.json").read_text())["done"] == [1, 2, 3, 4, 5, 6, 7]
    for stage in ("1_encoders_proj", "1_encoders_enc", "2_multimodal", "3_long", "4_talker", "5_dpo", "6_dit", "7_vocoder"):
        losses = _losses(quick_run, stage)
        assert losses and all(l == l and abs(l) < 1e4 for l in losses), stage         # finite numbers
        assert (quick_run / "logs" / f"{stage}.svg").read_text().startswith("<svg")
        assert json.loads((quick_run / "logs" / f"{stage}.json").read_text())["steps"] == len(losses)
    assert _losses(quick_run, "2_multimodal")[-1] < _losses(quick_run, "2_multimodal")[0]   # it learns
    model, tok = load_model(ck, dtype=torch.float32)
    assert sorted(model.voices) == sorted(train_tiny.SPEAKERS)
    assert not (ck / "state").exists() or not any((ck / "state").iterdir())          # no unfinished stage left


def test_resume_repeats_the_losses_of_an_uninterrupted_run(tmp_path):
    common = QUICK + ["--stage", "1", "--stage", "2", "--stage", "6", "--train.s2_steps=6", "--train.s6_steps=4",
                      "--train.ckpt_every=100"]
    a = tmp_path / "a"
    train_tiny.main(common + ["--out", str(a)])
    b = tmp_path / "b"
    with pytest.raises(SystemExit, match="stopped after 3 steps of stage 2"):
        train_tiny.main(common + ["--out", str(b), "--train.stop_after_steps=3"])
    assert len(_losses(b, "2_multimodal")) == 3
    with pytest.raises(SystemExit, match="stopped after 3 steps of stage 6"):     # killed again, in the DiT
        train_tiny.main(common + ["--out", str(b), "--train.stop_after_steps=3", "--resume"])
    train_tiny.main(common + ["--out", str(b), "--resume"])
    for stage in ("2_multimodal", "6_dit"):
        torch.testing.assert_close(torch.tensor(_losses(b, stage)), torch.tensor(_losses(a, stage)), rtol=0, atol=1e-5)


def _one_and_two_processes(tmp_path, extra: list[str], port: int) -> tuple[Path, Path]:
    """The same short stage-2 run in one process and, under torchrun, in two (gloo on CPU)."""
    args = QUICK + ["--stage", "2", "--train.s2_steps=4", "--train.batch_size=6"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_tiny.main(args + ["--out", str(one)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(REPO / "train_tiny.py")] + args + extra + ["--out", str(two)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return one, two


def test_two_ddp_processes_give_the_loss_of_one(tmp_path):
    one, two = _one_and_two_processes(tmp_path, [], 29613)
    torch.testing.assert_close(torch.tensor(_losses(two, "2_multimodal")), torch.tensor(_losses(one, "2_multimodal")),
                               rtol=0, atol=1e-4)


def test_fsdp_two_processes_give_the_loss_and_weights_of_one(tmp_path):
    """Sharded (FSDP2, gloo on CPU) training reproduces the unsharded run: same losses, same final weights."""
    one, two = _one_and_two_processes(tmp_path, ["--fsdp"], 29614)
    torch.testing.assert_close(torch.tensor(_losses(two, "2_multimodal")), torch.tensor(_losses(one, "2_multimodal")),
                               rtol=0, atol=1e-4)
    a, _ = load_model(one / "checkpoint", dtype=torch.float32)
    b, _ = load_model(two / "checkpoint", dtype=torch.float32)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-4, msg=name)


def test_bad_runs_are_refused_with_a_reason(quick_run, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'thinker.n_layers'"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "x"), "--thinker.n_layers=3"])
    with pytest.raises(ValueError, match="unknown config key 's2_stepz'"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "x"), "--train.s2_stepz=3"])
    with pytest.raises(ValueError, match="cannot read 'many' as int"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "x"), "--train.s2_steps=many"])
    with pytest.raises(SystemExit, match="already holds a run"):
        train_tiny.main(QUICK + ["--out", str(quick_run)])
    with pytest.raises(SystemExit, match="another configuration"):
        train_tiny.main(QUICK + ["--out", str(quick_run), "--resume", "--thinker.n_layer=2"])
    with pytest.raises(SystemExit, match="run stages 6 and 7 first"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "y"), "--stage", "5"])


def test_truncated_checkpoint_is_named(quick_run, tmp_path):
    import shutil

    from nano_omni.checkpoint import CheckpointError

    ck = tmp_path / "ck"
    shutil.copytree(quick_run / "checkpoint", ck)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ck)


# -- sample.py ---------------------------------------------------------------------------------------------------
def _sample(*args, check=True):
    res = subprocess.run([sys.executable, str(REPO / "sample.py"), *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    if check:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_sample_speaks_text_and_answers(quick_run, tmp_path):
    import soundfile as sf

    ck = str(quick_run / "checkpoint")
    out = tmp_path / "three.wav"
    res = _sample("--checkpoint", ck, "--text", "three seven one", "--voice", "slt", "--out", str(out))
    assert "slt says 'three seven one'" in res.stdout
    wav, sr = sf.read(out)
    assert sr == 24000 and len(wav) > 0
    # --stream: the same codes through the streaming Token2Wav, written chunk by chunk
    out3 = tmp_path / "three_stream.wav"
    res = _sample("--checkpoint", ck, "--text", "three seven one", "--voice", "slt", "--stream", "--out", str(out3))
    assert "first audio after" in res.stdout and not out3.with_name("three_stream.wav.part").exists()
    streamed, _ = sf.read(out3)
    assert len(streamed) == len(wav)                                  # same codes: same length
    assert abs(streamed - wav).max() < 0.05                           # only the DiT's seam error differs
    out2 = tmp_path / "answer.wav"
    res = _sample("--checkpoint", ck, "--audio", str(REPO / "tiny_data/speech/slt-0001.flac"), "--stream",
                  "--max-new-tokens", "6", "--out", str(out2))
    assert "first audio after" in res.stdout and out2.is_file() and not out2.with_name("answer.wav.part").exists()


def test_sample_bad_input(quick_run, tmp_path):
    ck = str(quick_run / "checkpoint")
    assert "--text is empty" in _sample("--checkpoint", ck, "--text", "", check=False).stderr
    assert "unknown voice 'bob'" in _sample("--checkpoint", ck, "--text", "hi", "--voice", "bob", check=False).stderr
    res = _sample("--checkpoint", ck, "--text", "hi", "--out", str(tmp_path / "nope" / "x.wav"), check=False)
    assert res.returncode != 0 and "does not exist" in res.stderr
    assert "no model at" in _sample("--checkpoint", str(tmp_path / "missing"), "--text", "hi", check=False).stderr


def test_task_batches_take_turns():
    """--train.task_batches: every batch is one task's, each round serves every task once, and each task's items
    come epoch by epoch (none repeats before all have been used)."""
    from nano_omni.training import task_step_indices

    groups = [list(range(0, 10)), list(range(10, 13)), list(range(13, 40))]
    seen = {g: [] for g in range(3)}
    for rnd in range(6):
        served = set()
        for k in range(3):
            b = task_step_indices(groups, 3, rnd * 3 + k, seed=5)
            assert b == task_step_indices(groups, 3, rnd * 3 + k, seed=5) and len(b) == 3
            g = [i for i, grp in enumerate(groups) if b[0] in grp][0]
            assert all(i in groups[g] for i in b) and g not in served
            served.add(g)
            seen[g] += b
    assert sorted(seen[0][:9]) == sorted(set(seen[0][:9]))               # 3 batches of 3 from 10 items: no repeats
    assert sorted(seen[1][:3]) == groups[1]                              # a 3-item task: one batch per epoch


@pytest.mark.parametrize("spec", ["asr=0", "asr", "speech=2", "asr=two"])
def test_bad_task_turns_are_named(spec):
    with pytest.raises(SystemExit, match="task_turns"):
        train_tiny.task_turns(spec)
    assert train_tiny.task_turns("asr=2,text_add=3") == {"asr": 2, "text_add": 3}
