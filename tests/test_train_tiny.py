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
from nano_omni.readout import PictureReadout, SpeechReadout, transcript_tokens

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
    for stage in ("1_encoders_vision", "1_encoders_audio", "1_encoders_proj", "1_encoders_enc", "2_multimodal",
                  "3_long", "4_talker", "5_dpo", "6_dit", "7_vocoder"):
        losses = _losses(quick_run, stage)
        assert losses and all(l == l and abs(l) < 1e4 for l in losses), stage         # finite numbers
        assert (quick_run / "logs" / f"{stage}.svg").read_text().startswith("<svg")
        assert json.loads((quick_run / "logs" / f"{stage}.json").read_text())["steps"] == len(losses)
    assert _losses(quick_run, "2_multimodal")[-1] < _losses(quick_run, "2_multimodal")[0]   # it learns
    # stage 2's batches hold one task each: the log names it, the summary and the plot follow each task
    with open(quick_run / "logs" / "2_multimodal.csv") as f:
        tasks = [r["task"] for r in csv.DictReader(f)]
    from nano_omni.data import TASKS
    assert tasks and set(tasks) <= set(TASKS) and len(set(tasks)) > 1
    summary = json.loads((quick_run / "logs" / "2_multimodal.json").read_text())
    assert sorted(summary["final_loss_by_task"]) == sorted(set(tasks))
    assert (quick_run / "logs" / "2_multimodal.svg").read_text().count("<polyline") == len(set(tasks))
    with open(quick_run / "logs" / "3_long.csv") as f:          # mixed conversations: no task
        assert {r["task"] for r in csv.DictReader(f)} == {""}
    model, tok = load_model(ck, dtype=torch.float32)
    assert sorted(model.voices) == sorted(train_tiny.SPEAKERS)
    # the run's tokenizer travels with its weights: the BPE learnt on the toy texts, one row per id
    assert type(tok).__name__ == "QwenBPE" and tok.vocab_size == model.cfg.thinker.vocab_size
    assert len(tok.encode(" seven")) == 1 and tok.decode(tok.encode("copy: red star")) == "copy: red star"
    assert not (ck / "state").exists() or not any((ck / "state").iterdir())          # no unfinished stage left


def test_resume_repeats_the_losses_of_an_uninterrupted_run(tmp_path):
    common = QUICK + ["--stage", "1", "--stage", "2", "--stage", "6", "--train.s2_steps=6", "--train.s6_steps=4",
                      "--train.ckpt_every=100", "--train.s1_proj_steps=1", "--train.s1_enc_steps=3"]
    a = tmp_path / "a"
    train_tiny.main(common + ["--out", str(a)])
    b = tmp_path / "b"
    with pytest.raises(SystemExit, match="stopped after 2 steps of stage 1"):   # in stage 1's second part: the
        train_tiny.main(common + ["--out", str(b), "--train.stop_after_steps=2"])    # first must not run again
    assert json.loads((b / "checkpoint" / "progress.json").read_text()) == {"done": [], "parts": ["encoders_proj"]}
    with pytest.raises(SystemExit, match="stopped after 3 steps of stage 2"):
        train_tiny.main(common + ["--out", str(b), "--train.stop_after_steps=3", "--resume"])
    assert len(_losses(b, "2_multimodal")) == 3
    with pytest.raises(SystemExit, match="stopped after 3 steps of stage 6"):     # killed again, in the DiT
        train_tiny.main(common + ["--out", str(b), "--train.stop_after_steps=3", "--resume"])
    import shutil

    c = tmp_path / "c"                                   # the same kill with its stage state damaged: named
    shutil.copytree(b, c)
    (c / "checkpoint" / "state" / "dit.json").write_text("{half a fi")
    with pytest.raises(SystemExit, match=r"cannot resume stage part 'dit' from .*dit\.json"):
        train_tiny.main(common + ["--out", str(c), "--resume"])
    train_tiny.main(common + ["--out", str(b), "--resume"])
    for stage in ("1_encoders_proj", "1_encoders_enc", "1_encoders_vision", "1_encoders_audio", "2_multimodal",
                  "6_dit"):
        torch.testing.assert_close(torch.tensor(_losses(b, stage)), torch.tensor(_losses(a, stage)), rtol=0, atol=1e-5)


def _one_and_two_processes(tmp_path, extra: list[str], stages=(2,)) -> tuple[Path, Path]:
    """The same short run of `stages` in one process and, under torchrun, in two (gloo on CPU). torchrun picks a
    free port (--standalone) and keeps each rank's own output in files; a failed run shows their last lines (an
    FSDP run lost a rank to SIGABRT in one CI run of seven, and torchrun's own summary could not say why)."""
    args = QUICK + [a for s in stages for a in ("--stage", str(s))] + ["--train.s2_steps=4", "--train.batch_size=6"]
    one, two, logs = tmp_path / "one", tmp_path / "two", tmp_path / "rank_logs"
    train_tiny.main(args + ["--out", str(one)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--log-dir={logs}",
           "--redirects=3", str(REPO / "train_tiny.py")] + args + extra + ["--out", str(two)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    ranks = "".join(f"\n--- {f.relative_to(logs)}\n{f.read_text(errors='replace')[-1500:]}"
                    for f in sorted(logs.rglob("std*.log")))
    assert res.returncode == 0, res.stderr[-1500:] + ranks
    return one, two


def test_two_ddp_processes_give_the_loss_of_one(tmp_path):
    one, two = _one_and_two_processes(tmp_path, [], stages=(1, 2))
    for log in ("1_encoders_vision", "1_encoders_audio", "1_encoders_proj", "2_multimodal"):
        torch.testing.assert_close(torch.tensor(_losses(two, log)), torch.tensor(_losses(one, log)), rtol=0, atol=1e-4,
                                   msg=log)


def test_fsdp_two_processes_give_the_loss_and_weights_of_one(tmp_path):
    """Sharded (FSDP2, gloo on CPU) training reproduces the unsharded run: same losses, same final weights."""
    one, two = _one_and_two_processes(tmp_path, ["--fsdp"])
    torch.testing.assert_close(torch.tensor(_losses(two, "2_multimodal")), torch.tensor(_losses(one, "2_multimodal")),
                               rtol=0, atol=1e-4)
    a, _ = load_model(one / "checkpoint", dtype=torch.float32)
    b, _ = load_model(two / "checkpoint", dtype=torch.float32)
    # AdamW divides each gradient by its own running RMS, so where a gradient is ~0 the runs' rounding decides the
    # update, up to ~lr per step: the largest difference seen is 1.1e-4 at stage 2's lr of 1e-3 (1.7e-5 at 2e-3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=0, atol=3e-4, msg=name)
    # the default stages under --fsdp: stage 1 trains only the encoders, which FSDP keeps whole, so it runs under
    # DDP (fully_shard applied to the Thinker once per part failed: a module can be sharded once); then stage 2
    # shards. The losses match; the
    # weights after stage 2 differ from one process's by up to ~1e-3 here, as DDP's do: stage 1's rounding,
    # magnified by AdamW where a gradient is near zero
    one, two = _one_and_two_processes(tmp_path / "s12", ["--fsdp"], stages=(1, 2))
    for log in ("1_encoders_proj", "1_encoders_enc", "1_encoders_vision", "1_encoders_audio", "2_multimodal"):
        torch.testing.assert_close(torch.tensor(_losses(two, log)), torch.tensor(_losses(one, log)), rtol=0, atol=1e-4,
                                   msg=log)


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
    with pytest.raises(SystemExit, match=r"--train.s5_samples \(1\) must be at least 2"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "y"), "--dpo", "--train.s5_samples=1"])
    with pytest.raises(SystemExit, match="--train.tokenizer must be 'bpe' or 'bytes', got 'words'"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "z"), "--train.tokenizer=words"])
    with pytest.raises(SystemExit, match=r"--train.s4_fresh \(5\) must lie between 0 and --train.s4_batch_size \(4\)"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "w"), "--train.s4_fresh=5"])
    with pytest.raises(SystemExit, match=r"--train.s4_words \(1.5\) must lie between 0 and 1"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "w"), "--train.s4_words=1.5"])
    assert not (tmp_path / "w").exists()                        # refused before anything is written


def test_byte_tokenizer_run(tmp_path):
    """--train.tokenizer=bytes: one token per byte, the tiny preset's vocabulary, no tokenizer files; a resumed
    run keeps it."""
    out = tmp_path / "bytes"
    train_tiny.main(QUICK + ["--out", str(out), "--stage", "2", "--train.tokenizer=bytes"])
    model, tok = load_model(out / "checkpoint", dtype=torch.float32)
    assert type(tok).__name__ == "ByteTokenizer" and model.cfg.thinker.vocab_size == 320
    assert not (out / "checkpoint" / "vocab.json").exists() and len(tok.encode(" seven")) == 6
    train_tiny.main(QUICK + ["--out", str(out), "--stage", "3"])           # the default (bpe) does not replace it
    assert load_model(out / "checkpoint", dtype=torch.float32)[0].cfg.thinker.vocab_size == 320


def test_truncated_checkpoint_is_named(quick_run, tmp_path):
    import shutil

    from nano_omni.checkpoint import CheckpointError

    ck = tmp_path / "ck"
    shutil.copytree(quick_run / "checkpoint", ck)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ck)



def test_rerunning_one_stage_keeps_the_other_stages_files(quick_run, tmp_path):
    """A checkpoint copied into a new run directory (codec, voices, x-vectors only inside it), then one stage
    rerun there: the files that stage does not write are still in the new checkpoint, byte for byte."""
    import shutil

    run = tmp_path / "again"
    shutil.copytree(quick_run / "checkpoint", run / "checkpoint")
    kept = {n: (run / "checkpoint" / n).read_bytes()
            for n in ("codec.safetensors", "voices.safetensors", "xvectors.safetensors")}
    train_tiny.main(QUICK + ["--out", str(run), "--stage", "4"])
    for name, data in kept.items():
        assert (run / "checkpoint" / name).read_bytes() == data, name
    assert load_model(run / "checkpoint")[0].voices


def test_one_stage_rerun_from_its_initial_weights_repeats_the_whole_run(quick_run, tmp_path):
    """--stage 6 --stage 7 --reinit on a finished run: the DiT (with fresh x-vectors) and the vocoder start from a
    fresh run's initial weights and end equal, bit for bit, to what the whole run trained, voices included;
    nothing else changes. Without --stage it is refused."""
    import shutil

    run = tmp_path / "t2w"
    shutil.copytree(quick_run / "checkpoint", run / "checkpoint")
    train_tiny.main(QUICK + ["--out", str(run), "--stage", "6", "--stage", "7", "--reinit"])
    (ma, _), (mb, _) = load_model(quick_run / "checkpoint"), load_model(run / "checkpoint")
    a, b = ma.state_dict(), mb.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ma.voices.keys() == mb.voices.keys()
    for v in ma.voices:
        assert torch.equal(ma.voices[v].cond, mb.voices[v].cond)
        assert torch.equal(ma.voices[v].ref_mel, mb.voices[v].ref_mel)
    for stage in ("6_dit", "7_vocoder"):
        assert _losses(run, stage) == _losses(quick_run, stage)
    with pytest.raises(SystemExit, match="--reinit goes with --stage"):
        train_tiny.main(QUICK + ["--out", str(run), "--reinit"])


def test_code_rows_start_from_the_centroids_only_on_a_fresh_part(quick_run, tmp_path, monkeypatch):
    """--train.code_init sets the code rows of a part at its initial weights: with --reinit, but not when a finished
    stage is trained further (--stage 6 alone), where it would throw away what the rows learnt."""
    import shutil

    calls = []
    real = train_tiny.centroid_rows
    monkeypatch.setattr(train_tiny, "centroid_rows",
                        lambda codec, table: calls.append(tuple(table.shape)) or real(codec, table))
    run = tmp_path / "further"
    shutil.copytree(quick_run / "checkpoint", run / "checkpoint")
    before = load_model(run / "checkpoint")[0].token2wav.code2wav_dit_model.text_embed.codec_embed.weight.clone()
    train_tiny.main(QUICK + ["--out", str(run), "--stage", "6", "--train.s6_steps=1"])
    assert calls == []
    after = load_model(run / "checkpoint")[0].token2wav.code2wav_dit_model.text_embed.codec_embed.weight
    torch.testing.assert_close(after, before, rtol=0, atol=1e-2)   # one AdamW step (lr 3e-3) on, not a reset (~1)
    train_tiny.main(QUICK + ["--out", str(run), "--stage", "4", "--stage", "6", "--reinit"])
    cfg = train_tiny.model_config("tiny")
    assert sorted(calls) == sorted([(cfg.talker.vocab_size, cfg.talker.embed_dim),
                                    (cfg.dit.num_embeds + 1, cfg.dit.emb_dim)])


def test_one_stage_rerun_may_resize_its_part(quick_run, tmp_path):
    """--stage 4 --reinit --talker.n_layer=1 on a finished run: the Talker is rebuilt in its new size and trained
    to what a whole run in that configuration gives it (weights and losses equal); the Thinker, DiT and vocoder
    stay the checkpoint's; the saved config says the new size. Resizing a part the stage does not train is refused."""
    import shutil

    run = tmp_path / "small_talker"
    shutil.copytree(quick_run / "checkpoint", run / "checkpoint")
    train_tiny.main(QUICK + ["--out", str(run), "--stage", "4", "--reinit", "--talker.n_layer=1"])
    whole = tmp_path / "whole"
    train_tiny.main(QUICK + ["--out", str(whole), "--talker.n_layer=1"] + [f"--stage={s}" for s in (1, 2, 3, 4)])
    (m0, _), (m1, _), (m2, _) = (load_model(d / "checkpoint") for d in (quick_run, run, whole))
    assert m1.cfg.talker.n_layer == 1 and len(m1.talker.model.layers) == 1
    for part in ("thinker", "token2wav"):
        for k, v in getattr(m0, part).state_dict().items():
            assert torch.equal(v, getattr(m1, part).state_dict()[k]), k
    for k, v in m2.talker.state_dict().items():
        assert torch.equal(v, m1.talker.state_dict()[k]), k
    assert _losses(run, "4_talker") == _losses(whole, "4_talker")
    with pytest.raises(SystemExit, match="differs in: thinker"):
        train_tiny.main(QUICK + ["--out", str(run), "--stage", "4", "--reinit", "--talker.n_layer=1",
                         "--thinker.n_layer=1"])
    with pytest.raises(SystemExit, match="differs in: talker"):
        train_tiny.main(QUICK + ["--out", str(run), "--stage", "6", "--reinit", "--talker.n_layer=2"])


def test_evaluate_reports_every_task_voice_and_part_of_the_speech_chain(quick_run, tmp_path):
    """python -m nano_omni.evaluate on a trained run: an accuracy per held-out task, a word error rate per voice,
    the real recordings through BigVGAN, Griffin-Lim and codes -> DiT -> BigVGAN; the table lands between the
    README markers, and a file without them is refused untouched."""
    from nano_omni import evaluate
    from nano_omni.data import TASKS

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:begin -->\nold\n<!-- results:end -->\ntail\n")
    out = tmp_path / "res.json"
    evaluate.main(["--checkpoint", str(quick_run / "checkpoint"), "--per-task", "2", "--per-voice", "1",
                   "--threads", "1", "--seeds", "0,1", "--write-readme", str(readme), "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res["accuracy"]) == set(TASKS)
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    assert res["asked"] == {t: 2 for t in TASKS}       # --per-task 2: the table's "right / asked" and its interval
    for t, a in res["accuracy"].items():
        lo, hi = evaluate.wilson_interval(round(2 * a), 2)
        assert lo <= a <= hi and hi - lo > 0.5          # two questions say little: the interval is wide
    assert set(res["speech"]) == set(train_tiny.SPEAKERS)
    for s in res["speech"].values():     # every text spoken once per seed; the figure is the mean over the seeds
        assert sorted(s["wer_by_seed"]) == ["0", "1"] and s["wer"] == pytest.approx(sum(s["wer_by_seed"].values()) / 2)
    # each voice's own recordings heard by the same ear (--per-voice 1: the first 4 held-out recordings); the
    # figure over all of them is a mean of these per-voice figures, so it lies between them
    heard = [s["recordings_wer"] for s in res["speech"].values() if s["recordings_wer"] is not None]
    assert heard and min(heard) - 1e-9 <= res["vocoder"]["real_recordings_wer"] <= max(heard) + 1e-9
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(quick_run / "checkpoint"), "--seeds", "0,x"])
    for name in ("bigvgan", "griffin_lim", "codes_dit_bigvgan", "codes_centroids_griffin_lim"):
        assert res["vocoder"][name]["wer"] >= 0 and res["vocoder"][name]["mel_distance"] > 0, name
    doc = readme.read_text()
    assert "old" not in doc and doc.endswith("<!-- results:end -->\ntail\n")
    assert "their codec codes -> DiT -> BigVGAN" in doc and "| asr |" in doc and "| 95 % interval |" in doc
    assert "| its recordings, heard |" in doc
    with pytest.raises(ValueError, match="right=3, n=2"):
        evaluate.wilson_interval(3, 2)
    assert "word error rate of generated speech (mean; seeds 0 / 1)" in doc and "--seeds 0,1`" in doc
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        evaluate.write_readme(bare, "table")
    assert bare.read_text() == "no markers\n"


def test_evaluate_speech_heard_by_a_fixed_judge(quick_run, tmp_path, capsys):
    """--judge: another checkpoint's Thinker transcribes the speech. The real recordings' rows depend only on the
    ear, so a quick run judged by the shipped model gets the shipped model's own figures there, not its own (its
    barely trained Thinker hears next to nothing); a judge that does not exist is refused by name."""
    from nano_omni import evaluate

    shipped = REPO / "checkpoints" / "tiny"
    common = ["--tasks", "asr", "--per-task", "1", "--per-voice", "1", "--threads", "1"]
    res = {}
    for name, args in (("judged", ["--checkpoint", str(quick_run / "checkpoint"), "--judge", str(shipped)]),
                       ("shipped", ["--checkpoint", str(shipped)]),
                       ("own", ["--checkpoint", str(quick_run / "checkpoint")])):
        evaluate.main([*args, *common, "--json", str(tmp_path / f"{name}.json")])
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())
    judged, mine, own = res["judged"]["vocoder"], res["shipped"]["vocoder"], res["own"]["vocoder"]
    assert res["judged"]["judge"] == str(shipped) and "judge" not in res["own"]
    assert judged["real_recordings_wer"] == mine["real_recordings_wer"] != own["real_recordings_wer"]
    assert judged["griffin_lim"]["wer"] == mine["griffin_lim"]["wer"]
    assert res["judged"]["accuracy"] == res["own"]["accuracy"]          # the answers are still the model's own
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(quick_run / "checkpoint"), *common, "--judge", str(tmp_path / "nowhere")])
    assert "--judge" in capsys.readouterr().err


def test_evaluate_caps_a_talker_that_never_stops(quick_run, monkeypatch):
    """evaluate.speak stops the Talker after max_codes codes: a Talker that never writes its stop code is heard
    babbling for that long instead of filling its context (where generation would fail)."""
    from nano_omni import evaluate

    model, tok = load_model(quick_run / "checkpoint", dtype=torch.float32)
    tc = model.cfg.talker
    real_head = model.talker.codec_head.forward

    def never_stop(x):                     # the stop and pad codes never win
        logits = real_head(x)
        logits[..., [tc.codec_eos, tc.codec_pad]] = -1e9
        return logits
    monkeypatch.setattr(model.talker.codec_head, "forward", never_stop)
    per_code = model.cfg.vocoder.sample_rate // 50                       # 50 codes a second
    for cap in (4, 9):
        wav = evaluate.speak(model, tok, "seven", "slt", max_codes=cap)
        assert wav.numel() == cap * per_code, cap


def test_dpo_pairs_prefer_the_best_heard_sample():
    """Stage 5's pairs: per text, the sample heard with the fewest errors against the one heard with the most; a
    text whose samples are all heard alike gives no pair unless lengths break the tie (--train.s5_length_ties)."""
    items = [{"text": "one two", "codes": torch.zeros(10)}, {"text": "red star", "codes": torch.zeros(6)},
             {"text": "nine", "codes": torch.zeros(4)}]
    c = {n: torch.arange(n) for n in (3, 5, 6, 8, 12)}
    samples = [(0, c[8]), (0, c[12]), (0, c[5]), (1, c[6]), (1, c[8]), (2, c[3])]
    heard = ["one", "one two", "one one one", "red star", "red star", "nine"]
    pairs = train_tiny.preference_pairs(items, samples, heard, length_ties=False)
    assert len(pairs) == 1                                  # text 1 heard alike twice, text 2 sampled once
    it, win, lose = pairs[0]
    assert it is items[0] and win is c[12] and lose is c[5]     # heard at WER 0 preferred over WER 1
    pairs = train_tiny.preference_pairs(items, samples, heard, length_ties=True)
    assert [(p[0]["text"], len(p[1]), len(p[2])) for p in pairs] == [("one two", 12, 5), ("red star", 6, 8)]


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
    # a spoken answer, streamed: by the shipped model (a few steps of training may answer with <|im_end|> alone)
    out2 = tmp_path / "answer.wav"
    res = _sample("--audio", str(REPO / "tiny_data/speech/slt-0001.flac"), "--stream", "--max-new-tokens", "6",
                  "--out", str(out2))
    assert "first audio after" in res.stdout and out2.is_file() and not out2.with_name("answer.wav.part").exists()


def test_sample_bad_input(quick_run, tmp_path):
    ck = str(quick_run / "checkpoint")
    assert "--text is empty" in _sample("--checkpoint", ck, "--text", "", check=False).stderr
    assert "unknown voice 'bob'" in _sample("--checkpoint", ck, "--text", "hi", "--voice", "bob", check=False).stderr
    res = _sample("--checkpoint", ck, "--text", "hi", "--out", str(tmp_path / "nope" / "x.wav"), check=False)
    assert res.returncode != 0 and "does not exist" in res.stderr
    assert "no model at" in _sample("--checkpoint", str(tmp_path / "missing"), "--text", "hi", check=False).stderr


SHIPPED = REPO / "checkpoints" / "tiny"


@pytest.mark.parametrize("args, message", [
    (["--threads", "0", "--text", "hi"], "--threads must be at least 1, got 0"),
    (["--max-new-tokens", "-3", "--prompt", "hi"], "--max-new-tokens must be at least 1, got -3"),
    (["--fps", "0", "--video", "tiny_data/video/test-0000.npz"], "--fps must be a positive number"),
    (["--video", "missing.npz", "--prompt", "hi"], "--video missing.npz: no such file"),
    (["--audio", "missing.flac"], "--audio missing.flac: no such file"),
    (["--image", "tiny_data/images", "--prompt", "hi"], "--image tiny_data/images is a folder"),
    (["--device", "nope", "--text", "hi"], "--device: device 'nope' is not one of auto, cpu, cuda, cuda:N, mps"),
    (["--video", "tiny_data/speech/slt-0001.flac", "--prompt", "hi"], "holds no video stream"),
    (["--image", "tiny_data/speech/slt-0001.flac", "--prompt", "hi"], "cannot read image file"),
    (["--checkpoint", "tiny_data", "--text", "hi"], "config.json does not exist"),
])
def test_sample_names_each_bad_argument(args, message, capsys, monkeypatch):
    """sample.py: a bad flag, a missing or wrong kind of input, a folder that holds no model: one line that names
    it, no traceback (argparse's error, or SystemExit with the message)."""
    import sample

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    said = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
    assert message in said and "Traceback" not in said


def test_sample_keeps_an_existing_file_when_no_speech_comes(tmp_path, monkeypatch, capsys):
    """--speak on a question whose answer the Talker never voices: out.wav is left as it was (no empty file
    replaces it, no .part stays behind)."""
    import sample
    from nano_omni.omni import Omni

    def text_only(self, x, voice, **kw):        # the Thinker answers, the Talker says nothing
        yield "text", torch.tensor([5])
    monkeypatch.setattr(Omni, "stream", text_only)
    out = tmp_path / "out.wav"
    out.write_bytes(b"an earlier answer")
    sample.main(["--checkpoint", str(SHIPPED), "--prompt", "what is two plus three?", "--speak", "--out", str(out)])
    assert out.read_bytes() == b"an earlier answer" and list(tmp_path.iterdir()) == [out]
    assert "no speech was produced" in capsys.readouterr().out


def test_an_interrupted_stream_leaves_the_old_file(tmp_path, monkeypatch):
    """--stream killed after its first chunk (Ctrl-C): out.wav keeps its old bytes and no .part file stays."""
    import sample
    from nano_omni.omni import Omni

    def one_chunk_then_ctrl_c(self, *args, **kw):
        yield torch.zeros(2400)
        raise KeyboardInterrupt
    monkeypatch.setattr(Omni, "say_stream", one_chunk_then_ctrl_c)
    out = tmp_path / "out.wav"
    out.write_bytes(b"an earlier answer")
    with pytest.raises(KeyboardInterrupt):
        sample.main(["--checkpoint", str(SHIPPED), "--text", "three", "--stream", "--out", str(out)])
    assert out.read_bytes() == b"an earlier answer" and list(tmp_path.iterdir()) == [out]


def test_sample_says_which_words_the_tiny_model_does_not_know(tmp_path, capsys):
    """--text with a word outside the toy vocabulary still speaks, with a note naming the word."""
    import sample

    out = tmp_path / "out.wav"
    sample.main(["--checkpoint", str(SHIPPED), "--text", "three banana", "--out", str(out)])
    err = capsys.readouterr().err
    assert out.stat().st_size > 44 and "'banana' is not a word" in err and "three" not in err


def test_evaluate_asks_the_training_items_with_split_train(monkeypatch, capsys):
    """--split train: the understanding tasks are asked their training items, in file order, and the table says
    so (a task answered far better there than held out was memorised); the default stays the held-out items."""
    from nano_omni import evaluate
    from nano_omni.data import load_examples

    asked = []
    real = evaluate.ThinkerData
    monkeypatch.setattr(evaluate, "ThinkerData", lambda items, *a, **kw: (asked.append(
        [e["question"] for e in items]), real(items, *a, **kw))[1])
    for split in ("train", "test"):
        asked.clear()
        evaluate.main(["--checkpoint", str(SHIPPED), "--tasks", "text_copy", "--per-task", "3", "--no-speech",
                       *(["--split", split] if split == "train" else [])])
        out = capsys.readouterr().out
        want = [e["question"] for e in load_examples(split, tasks={"text_copy"})[:3]]
        assert asked == [want], split
        res = json.loads(out.strip().splitlines()[-1])
        assert res["split"] == split and res["asked"] == {"text_copy": 3}
        assert ("| training task |" in out) == (split == "train")
    train_q = {e["question"] for e in load_examples("train", tasks={"text_copy"})}
    assert not train_q & {e["question"] for e in load_examples("test", tasks={"text_copy"})}   # truly other items


def test_evaluate_refuses_bad_arguments_before_measuring(tmp_path, capsys):
    """python -m nano_omni.evaluate: unknown tasks, a device or a folder that does not exist, and outputs that
    cannot be written are refused by name before any model is loaded or measured."""
    from nano_omni import evaluate

    ck = str(SHIPPED)
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# no markers\n")
    for args, message in ((["--tasks", "asr,nope"], "unknown task(s) ['nope']"),
                          (["--checkpoint", str(tmp_path / "nowhere")], "--checkpoint"),
                          (["--checkpoint", ck, "--device", "nope"], "--device: device 'nope'"),
                          (["--checkpoint", ck, "--threads", "-1"], "--threads must be 0"),
                          (["--checkpoint", ck, "--write-readme", str(tmp_path / "missing.md")], "markers"),
                          (["--checkpoint", ck, "--write-readme", str(no_markers)], "markers"),
                          (["--checkpoint", ck, "--json", str(tmp_path / "no" / "r.json")], "cannot be written"),
                          (["--checkpoint", ck, "--split", "train"], "--split train"),
                          (["--checkpoint", ck, "--split", "train", "--no-speech", "--write-readme", str(no_markers)],
                           "--split train"),
                          (["--checkpoint", ck, "--split", "nope"], "invalid choice")):
        with pytest.raises(SystemExit):
            evaluate.main(args)
        assert message in capsys.readouterr().err, args
    assert no_markers.read_text() == "# no markers\n" and not (tmp_path / "no").exists()


def test_a_damaged_run_directory_is_named(quick_run, tmp_path):
    """train_tiny.py on a run whose config.json is not JSON, or whose progress.json is gone: the file is named,
    nothing is written."""
    import shutil

    for damage, message in (("config.json", "config.json is not valid JSON"), ("progress.json", "progress.json")):
        run = tmp_path / damage
        shutil.copytree(quick_run / "checkpoint", run / "checkpoint")
        if damage == "config.json":
            (run / "checkpoint" / damage).write_text("{not json")
        else:
            (run / "checkpoint" / damage).unlink()
        before = sorted(p.name for p in (run / "checkpoint").iterdir())
        with pytest.raises(SystemExit, match=message):
            train_tiny.main(QUICK + ["--out", str(run), "--resume"])
        assert sorted(p.name for p in (run / "checkpoint").iterdir()) == before


def test_task_batches_take_turns():
    """--train.task_batches: every batch is one task's, each round serves every task once, and each task's items
    come epoch by epoch (none repeats before all have been used)."""
    from nano_omni.training import step_group, task_step_indices

    groups = [list(range(0, 10)), list(range(10, 13)), list(range(13, 40))]
    seen = {g: [] for g in range(3)}
    for rnd in range(6):
        served = set()
        for k in range(3):
            b = task_step_indices(groups, 3, rnd * 3 + k, seed=5)
            assert b == task_step_indices(groups, 3, rnd * 3 + k, seed=5) and len(b) == 3
            g = [i for i, grp in enumerate(groups) if b[0] in grp][0]
            assert all(i in groups[g] for i in b) and g not in served
            assert step_group(3, rnd * 3 + k, seed=5) == g                 # what the log names as the step's task
            served.add(g)
            seen[g] += b
    assert sorted(seen[0][:9]) == sorted(set(seen[0][:9]))               # 3 batches of 3 from 10 items: no repeats
    assert sorted(seen[1][:3]) == groups[1]                              # a 3-item task: one batch per epoch


@pytest.mark.parametrize("spec", ["asr=0", "asr", "speech=2", "asr=two"])
def test_bad_task_turns_are_named(spec):
    with pytest.raises(SystemExit, match="task_turns"):
        train_tiny.task_turns(spec)
    assert train_tiny.task_turns("asr=2,text_add=3") == {"asr": 2, "text_add": 3}


def test_talker_learns_to_speak_spliced_utterances():
    """Stage 4's extra texts: recordings of one voice joined at the codec's rate, none a held-out transcript; the
    waveform is the first piece's recording, then silence, then the next."""
    import numpy as np

    from nano_omni.data import load_examples, load_speech

    utts = load_speech("train", speakers={"kal16"})
    by_id = {u["id"]: u for u in utts}
    held_out = frozenset(e["answer"] for e in load_examples("test", tasks={"asr"}))
    out = train_tiny.spliced_utterances(utts, 40, seed=3, avoid=held_out, rate=24000)
    assert len(out) == 40 and len({u["transcript"] for u in out}) > 10
    again = train_tiny.spliced_utterances(utts, 40, seed=3, avoid=held_out, rate=24000)
    assert all(a["transcript"] == b["transcript"] and torch.equal(a["wav"], b["wav"]) for a, b in zip(out, again))
    for u in out:
        assert u["speaker"] == "kal16" and u["transcript"] not in held_out and u["wav"].dtype == torch.float32
    # the pieces are the recordings themselves, at 24 kHz: the first one starts the waveform sample for sample
    u = out[0]
    starts = [v for v in by_id.values() if np.array_equal(u["wav"][: len(v["wav"])].numpy(), v["wav"].numpy())]
    assert starts and u["transcript"].startswith(starts[0]["transcript"])
    assert train_tiny.spliced_utterances(utts, 5, seed=3, avoid=frozenset(u["transcript"] for u in out),
                                         rate=24000)[0]["transcript"] not in {u["transcript"] for u in out}


@pytest.mark.parametrize("words,pauses", [(0.0, False), (0.5, False), (0.5, True), (1.0, False)])
def test_talker_fresh_texts_join_the_pieces_codes(quick_run, words, pauses):
    """--train.s4_fresh: a fresh item says what SpeechPieces draws (never a held-out transcript), its codes the
    pieces' own codes joined as recorded (--train.s4_gaps: with silence codes for each drawn pause, 50 per
    second); the same generator gives the same items; the Thinker's rows read in a padded batch equal those read one
    conversation at a time. --train.s4_words: that share of the texts is drawn word by word, 2-4 digits each from a
    recording of that one digit."""
    from types import SimpleNamespace

    import numpy as np

    from nano_omni.codec import SpeechCodec
    from nano_omni.data import DIGIT_WORDS, SpeechPieces, load_speech

    ck = quick_run / "checkpoint"
    model, tok = load_model(ck, dtype=torch.float32)
    run = SimpleNamespace(model=model.eval(), tok=tok, cfg=model.cfg, device=torch.device("cpu"),
                          codec=SpeechCodec.load(ck / "codec.safetensors"),
                          t=SimpleNamespace(s4_words=words, s4_gaps=pauses))
    utts = load_speech("train", speakers={"kal16"})
    codes = [run.codec.encode(u["wav"]) for u in utts]
    splicer = train_tiny.CodeSplicer(run, utts, codes, off="--train.s4_fresh=0")
    items = splicer.items(8, np.random.default_rng(5))
    assert len(items) == 8 and len({tuple(it["reply_ids"]) for it in items}) > 4
    by_audio = {u["audio"]: c for u, c in zip(utts, codes)}
    silence = int(run.codec.encode(torch.zeros(4800))[0])
    rng, texts, word_by_word = np.random.default_rng(5), [], 0
    for it in items:
        if words and rng.random() < words:
            spk, chosen, gaps = splicer.pieces.draw_words(rng, splicer.avoid)
            assert 2 <= len(chosen) <= 4 and all(SpeechPieces.text(ex) in DIGIT_WORDS for ex in chosen)
            word_by_word += 1
        else:
            spk, chosen, gaps = splicer.pieces.draw(rng, splicer.avoid)
        texts.append(" ".join(SpeechPieces.text(ex) for ex in chosen))
        assert texts[-1] not in train_tiny.held_out_transcripts() and it["reply_ids"] == tok.encode(texts[-1])
        expect = [by_audio[chosen[0]["audio"]]]
        for ex, gap in zip(chosen[1:], gaps):
            assert 2 <= round(gap * 50) <= 8                                  # 40-160 ms of silence codes
            expect += [torch.full((round(gap * 50),), silence)] * pauses + [by_audio[ex["audio"]]]
        assert torch.equal(it["codes"], torch.cat(expect))
        assert spk == "kal16" and it["spk"] == train_tiny.speaker_ids(run.cfg)["kal16"]
    assert word_by_word in {0.0: {0}, 0.5: set(range(1, 8)), 1.0: {8}}[words]       # none, some, all of the 8
    for it, text in zip(items, texts):                 # the padded batch's rows are each conversation's own
        alone = train_tiny.text_track_items(run, [text], ["kal16"], [it["codes"]])[0]
        assert alone["prompt_ids"] == it["prompt_ids"]
        assert torch.allclose(alone["prompt"], it["prompt"], atol=1e-5)
        assert torch.allclose(alone["reply"], it["reply"], atol=1e-5)
    again = splicer.items(8, np.random.default_rng(5))
    assert all(torch.equal(a["codes"], b["codes"]) and torch.equal(a["reply"], b["reply"])
               for a, b in zip(items, again))


def test_fresh_talker_texts_need_digits_to_splice(tmp_path, monkeypatch):
    """--train.s4_fresh on training speech with no digit recordings to splice: a clear refusal, not a crash."""
    from nano_omni.data import DIGIT_WORDS

    real = train_tiny.load_speech
    monkeypatch.setattr(train_tiny, "load_speech", lambda *a, **k: [
        u for u in real(*a, **k) if not set(u["transcript"].split()) <= set(DIGIT_WORDS)])
    with pytest.raises(SystemExit, match="has none to splice: pass --train.s4_fresh=0"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "r"), "--stage", "4", "--train.subset=60"])


def test_fresh_dpo_texts_need_digits_to_splice(quick_run, tmp_path, monkeypatch):
    """Stage 5's fresh texts (--train.s5_fresh) are refused as stage 4's are, naming stage 5's own flag."""
    import shutil

    from nano_omni.data import DIGIT_WORDS

    shutil.copytree(quick_run / "checkpoint", tmp_path / "r" / "checkpoint")
    real = train_tiny.load_speech
    monkeypatch.setattr(train_tiny, "load_speech", lambda *a, **k: [
        u for u in real(*a, **k) if not set(u["transcript"].split()) <= set(DIGIT_WORDS)])
    with pytest.raises(SystemExit, match="has none to splice: pass --train.s5_fresh=false"):
        train_tiny.main(QUICK + ["--out", str(tmp_path / "r"), "--stage", "5"])


def test_code_rows_start_at_the_centroids_principal_coordinates():
    """--train.code_init: rows 0..K-1 of a code table take the centroids' coordinates along their principal
    directions, at the table's RMS; codes that sound alike start alike; the rows after K (specials) are kept."""
    from nano_omni.codec import SpeechCodec

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 160, generator=g) * 5                      # four families of 8 nearby centroids
    cents = (centres[:, None] + 0.1 * torch.randn(4, 8, 160, generator=g)).reshape(32, 160)
    table = torch.randn(36, 16, generator=g)
    before = table.clone()
    train_tiny.centroid_rows(SpeechCodec(cents), table)
    assert torch.equal(table[32:], before[32:])
    torch.testing.assert_close(table[:32].pow(2).mean(), before[:32].pow(2).mean())
    d = torch.cdist(table[:32], table[:32])
    family = torch.arange(32) // 8
    same = family[:, None] == family[None]
    assert d[same].max() < d[~same].min()                                # nearby centroids, nearby rows
    # the rows keep the centroids' geometry: their Gram matrix is the centred centroids' one, up to a scale (the
    # four families span 3 directions after centring; the 16 kept coordinates hold all but the small noise)
    c = cents - cents.mean(0)
    gram, want = table[:32] @ table[:32].T, c @ c.T
    scale = gram.diagonal().sum() / want.diagonal().sum()
    assert float((gram - scale * want).abs().max()) < 0.02 * float((scale * want).abs().max())


def test_stage_one_reads_pictures_out_through_the_frozen_output_layer(quick_run):
    """Stage 1's third part: a picture's merged vision tokens, averaged, through the LLM's final norm and output
    layer, scored on each picture question's answer words; only the vision encoder learns from it."""
    from types import SimpleNamespace

    import numpy as np

    from nano_omni.data import IMAGE_PIXELS
    from nano_omni.toy import PICTURE_ANSWERS, draw_picture
    from nano_omni.vision_io import preprocess_images

    model, tok = load_model(quick_run / "checkpoint", dtype=torch.float32)
    th = model.thinker
    readout = PictureReadout(th, tok)
    run = SimpleNamespace(t=train_tiny.TrainConfig(), cfg=model.cfg, device=torch.device("cpu"))
    loss_fn = train_tiny.picture_readout_loss(run, 4)
    th.requires_grad_(False)
    th.visual.requires_grad_(True)
    before = {k: v.clone() for k, v in th.state_dict().items()}
    term, value = loss_fn(0, readout)
    assert term.shape == () and 0 < value < 20
    term.backward()
    torch.optim.SGD(th.visual.parameters(), lr=0.1).step()
    after = th.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    # the logits are the LLM's own logits of the answer words (each a single token of the learnt BPE)
    ims = [draw_picture(np.random.default_rng(s))[0] for s in range(3)]
    pv, grid = preprocess_images(ims, model.cfg.vision, *IMAGE_PIXELS)
    with torch.no_grad():
        got = readout(pv, grid)
        y = th.visual(pv, grid).view(3, -1, model.cfg.thinker.d_model).mean(1)
        full = th.lm_head(th.model.norm(y))
    for task, words in PICTURE_ANSWERS.items():
        ids = [tok.encode(w) for w in words]
        assert all(len(i) == 1 for i in ids)
        torch.testing.assert_close(got[task], full[:, [i[0] for i in ids]])


def test_stage_one_paper_parts_run_at_their_lr_and_the_readouts_plain(tmp_path, monkeypatch):
    """Stage 1's paper parts (projections, encoders) at --train.s1_lr under warm-up + cosine with clipping; the two
    readouts after them at their own constant lr after the warm-up, unclipped (--train.s1_readout_plain)."""
    real, clipped = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, *a, **k: clipped.append(1) or real(p, *a, **k))
    steps = {"proj": 3, "enc": 4, "vis": 12, "audio": 11}
    out = tmp_path / "r"
    train_tiny.main(QUICK + ["--out", str(out), "--stage", "1", "--train.warmup=1", "--train.s1_lr=3e-4",
                             "--train.s1_vis_lr=7e-4", "--train.s1_audio_lr=5e-4"]
                    + [f"--train.s1_{k}_steps={v}" for k, v in steps.items()])
    lrs = {}
    for part, name in zip(steps, ("proj", "enc", "vision", "audio")):
        with open(out / "logs" / f"1_encoders_{name}.csv") as f:
            lrs[part] = [float(r["lr"]) for r in csv.DictReader(f)]
        assert len(lrs[part]) == steps[part], part
    assert lrs["vis"] == [7e-4] * 12 and lrs["audio"] == [5e-4] * 11
    for part in ("proj", "enc"):
        assert lrs[part][0] == pytest.approx(3e-4) and lrs[part][-1] < 3e-4, lrs[part]     # cosine from s1_lr
    assert len(clipped) == steps["proj"] + steps["enc"]
    clipped.clear()
    train_tiny.main(QUICK + ["--out", str(tmp_path / "c"), "--stage", "1", "--train.s1_readout_plain=false"]
                    + [f"--train.s1_{k}_steps={v}" for k, v in steps.items()])
    assert len(clipped) == sum(steps.values())


def test_stage_one_spells_transcripts_through_the_frozen_output_layer(quick_run):
    """Stage 1's audio part: every audio token through the LLM's final norm and output layer, scored on a blank
    and the transcripts' tokens; CTC against the transcript; only the audio encoder learns from it."""
    from types import SimpleNamespace

    from nano_omni.data import IMAGE_PIXELS, VIDEO_PIXELS, ThinkerData, load_examples
    from nano_omni.processor import Processor

    model, tok = load_model(quick_run / "checkpoint", dtype=torch.float32)
    th = model.thinker
    asr = load_examples("train", tasks={"asr"})[:12]
    ids = transcript_tokens(tok, asr)
    for e in asr:        # every transcript can be spelled, and so can its words in another order (a splice)
        assert set(tok.encode(e["answer"])) | set(tok.encode(" ".join(e["answer"].split()[::-1]))) <= set(ids)
    assert model.cfg.tokens.pad not in ids
    rows = [model.cfg.tokens.pad, *ids]
    readout = SpeechReadout(th, ids, model.cfg.tokens.pad)
    data = ThinkerData(asr, Processor(model.cfg, tok, image_pixels=IMAGE_PIXELS, video_pixels=VIDEO_PIXELS), tok)
    x, _ = data.batch([0, 1])
    with torch.no_grad():
        logits = readout(x.audio_features, x.audio_lengths)
        full = th.lm_head(th.model.norm(th.audio_tower(x.audio_features, x.audio_lengths)))
    torch.testing.assert_close(logits, full[:, rows])
    run = SimpleNamespace(t=train_tiny.TrainConfig(), device=torch.device("cpu"))
    th.requires_grad_(False)
    th.audio_tower.requires_grad_(True)
    before = {k: v.clone() for k, v in th.state_dict().items()}
    term, value = train_tiny.speech_readout_loss(run, data, 4, rows)(0, readout)
    assert term.shape == () and 0 < value < 100
    term.backward()
    torch.optim.SGD(th.audio_tower.parameters(), lr=0.1).step()
    changed = {k for k, v in th.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("audio_tower.") for k in changed)


def test_ctc_best_path_merges_repeats_then_drops_blanks():
    from nano_omni.readout import ctc_greedy

    best = [0, 3, 3, 0, 3, 2, 2, 0, 0, 1]
    assert ctc_greedy(torch.nn.functional.one_hot(torch.tensor(best), 4).float()) == [3, 3, 2, 1]
    assert ctc_greedy(torch.zeros(5, 4)) == []                           # all blank (argmax of ties: column 0)


def test_readout_accuracy_counts_what_the_readouts_say(quick_run, monkeypatch, capsys):
    """evaluate --readouts: each readout's exact match, on a rigged readout whose answers are known: the picture
    readout right on every shape and count but never on the colour; the speech readout spelling every held-out
    transcript (each token twice, blanks between) except the first, for which it says nothing."""
    import numpy as np

    from nano_omni import evaluate, readout
    from nano_omni.data import load_examples
    from nano_omni.toy import PICTURE_ANSWERS, draw_picture, picture_answer

    model, tok = load_model(quick_run / "checkpoint", dtype=torch.float32)
    pics = [m for _, m in (draw_picture(np.random.default_rng([99, i])) for i in range(300))]

    def pictures(self, pixel_values, grid_thw):
        assert len(grid_thw) == len(pics)
        right = {t: torch.tensor([ws.index(picture_answer(t, m)) for m in pics]) for t, ws in PICTURE_ANSWERS.items()}
        right["image_colour"] = (right["image_colour"] + 1) % len(PICTURE_ANSWERS["image_colour"])
        return {t: torch.nn.functional.one_hot(right[t], len(ws)).float() for t, ws in PICTURE_ANSWERS.items()}

    test = load_examples("test", tasks={"asr"})
    ids = readout.transcript_tokens(tok, load_examples("train", tasks={"asr"}))
    seen = []

    def speech(self, features, lengths):
        out = []
        for n in lengths.tolist():
            k = len(seen)
            seen.append(k)
            cols = [] if k == 0 else [c for t in tok.encode(test[k]["answer"]) for c in (ids.index(t) + 1,) * 2 + (0,)]
            t_len = readout.AudioEncoder.token_count(int(n))
            assert len(cols) <= t_len
            out.append(torch.nn.functional.one_hot(torch.tensor(cols + [0] * (t_len - len(cols))), len(ids) + 1))
        return torch.cat(out).float()

    monkeypatch.setattr(readout.PictureReadout, "forward", pictures)
    monkeypatch.setattr(readout.SpeechReadout, "forward", speech)
    evaluate.main(["--checkpoint", str(quick_run / "checkpoint"), "--readouts"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["readouts"]
    assert len(seen) == len(test)
    assert got == {"image_shape": 100.0, "image_count": 100.0, "image_colour": 0.0,
                   "asr": round(100 * (len(test) - 1) / len(test), 1)}


def test_stage_two_adds_the_speech_readouts_ctc_on_asr_batches(quick_run):
    """--train.s2_ctc: an asr batch of stage 2 backpropagates the Thinker's loss plus s2_ctc times the speech
    readout's CTC per target token, on the audio tokens of the same encoder pass; other batches, and the logged
    value, are the Thinker's loss alone; s2_ctc=0 leaves the asr batch's term the Thinker's loss too."""
    from types import SimpleNamespace

    from nano_omni.audio_enc import AudioEncoder
    from nano_omni.data import IMAGE_PIXELS, VIDEO_PIXELS, ThinkerData, load_examples
    from nano_omni.processor import Processor
    from nano_omni.training import task_step_indices

    model, tok = load_model(quick_run / "checkpoint", dtype=torch.float32)
    th = model.thinker
    ex = load_examples("train", tasks={"asr"})[:8] + load_examples("train", tasks={"text_add"})[:8]
    data = ThinkerData(ex, Processor(model.cfg, tok, image_pixels=IMAGE_PIXELS, video_pixels=VIDEO_PIXELS), tok)
    rows = [model.cfg.tokens.pad, *transcript_tokens(tok, ex[:8])]

    def run_with(ctc):
        return SimpleNamespace(t=train_tiny.TrainConfig(s2_ctc=ctc), device=torch.device("cpu"), model=model)
    on = train_tiny.thinker_loss(run_with(0.3), data, 4, False, by_task=True, ctc_rows=rows)
    off = train_tiny.thinker_loss(run_with(0.0), data, 4, False, by_task=True, ctc_rows=rows)
    names = ["asr"] * 8 + ["text_add"] * 2                     # the default task_turns: asr=8, text_add=2, sorted
    groups = [list(range(8)) if n == "asr" else list(range(8, 16)) for n in names]
    seen = set()
    with torch.no_grad():
        for step in range(10):
            task = on.task_of(step)
            seen.add(task)
            (t_on, v_on), (t_off, v_off) = on(step, th), off(step, th)
            assert v_on == v_off and float(t_off) == pytest.approx(v_off, rel=1e-6)
            if task != "asr":
                assert float(t_on) == float(t_off)
                continue
            x, labels = data.batch(task_step_indices(groups, 4, step, 0))
            n_tok = [AudioEncoder.token_count(int(n)) for n in x.audio_lengths]
            scores = SpeechReadout(th, rows[1:], rows[0])(x.audio_features, x.audio_lengths)
            ctc, n = train_tiny.ctc_loss_sum(scores, n_tok, labels[:, 1:], {t: k for k, t in enumerate(rows)})
            assert n == sum(len(tok.encode(ex[i]["answer"])) for i in task_step_indices(groups, 4, step, 0))
            assert 0 < float(ctc) / n < 100
            assert float(t_on - t_off) == pytest.approx(0.3 * float(ctc) / n, rel=1e-4)
    assert seen == {"asr", "text_add"}


def test_stages_two_and_three_keep_the_vision_encoder_stage_one_taught(tmp_path, monkeypatch):
    """--train.frozen_vision (default): after stage 1, stages 2 and 3 leave the vision encoder as it is and train
    the rest; with the switch off, or on a run whose stage 1 never ran (stage 2 alone), it trains too."""
    import shutil

    def thinker(run):
        return {k: v for k, v in load_model(run / "checkpoint")[0].thinker.state_dict().items()}

    run = tmp_path / "r"
    train_tiny.main(QUICK + ["--out", str(run), "--stage", "1"])
    shutil.copytree(run, tmp_path / "thawed")
    after1 = thinker(run)
    train_tiny.main(QUICK + ["--out", str(run), "--stage", "2", "--stage", "3"])
    after3 = thinker(run)
    moved = {k for k in after1 if not torch.equal(after1[k], after3[k])}
    assert moved and not any(k.startswith("visual.") for k in moved)
    train_tiny.main(QUICK + ["--out", str(tmp_path / "thawed"), "--stage", "2", "--train.frozen_vision=false",
                             "--train.tasks=image_shape"])            # (4 steps of 25-step rounds: pictures for sure)
    thawed = thinker(tmp_path / "thawed")
    assert any(not torch.equal(after1[k], thawed[k]) for k in after1 if k.startswith("visual."))
    first = []
    real = train_tiny.fresh_model

    def spy(*args, **kw):
        model = real(*args, **kw)
        first.append({k: v.clone() for k, v in model.thinker.state_dict().items() if k.startswith("visual.")})
        return model
    monkeypatch.setattr(train_tiny, "fresh_model", spy)
    train_tiny.main(QUICK + ["--out", str(tmp_path / "alone"), "--stage", "2"])
    alone = thinker(tmp_path / "alone")
    assert any(not torch.equal(first[0][k], alone[k]) for k in first[0])


def test_the_audio_encoder_can_learn_at_its_own_rate_in_stage_2(tmp_path):
    """--train.s2_audio_lr gives the audio encoder its own rate in stage 2: at a rate of ~0 it keeps its initial
    weights while the rest of the Thinker learns at lr; unset (0), it learns at lr as before."""
    def thinker(name, *extra):
        train_tiny.main(QUICK + ["--stage", "2", "--train.s2_steps=3", "--out", str(tmp_path / name), *extra])
        sd = load_model(tmp_path / name / "checkpoint", dtype=torch.float32)[0].thinker.state_dict()
        return ({k: v for k, v in sd.items() if k.startswith("audio_tower.")},
                {k: v for k, v in sd.items() if not k.startswith(("audio_tower.", "visual."))})

    still_audio, still_rest = thinker("still", "--train.lr=1e-12", "--train.s2_audio_lr=1e-12")
    slow_audio, slow_rest = thinker("slow_audio", "--train.s2_audio_lr=1e-12")
    plain_audio, _ = thinker("plain")
    assert slow_audio and slow_audio.keys() == still_audio.keys()
    for k in still_audio:                                     # the initial weights, all but untouched
        torch.testing.assert_close(slow_audio[k], still_audio[k], rtol=0, atol=1e-6, msg=k)
    assert any((slow_rest[k] - still_rest[k]).abs().max() > 1e-4 for k in still_rest)     # the LLM learnt
    assert any((plain_audio[k] - still_audio[k]).abs().max() > 1e-4 for k in still_audio)  # and by default so


def test_weight_decay_is_an_override(tmp_path, monkeypatch):
    """--train.weight_decay reaches AdamW in every stage that runs (0.01 unless given)."""
    seen = []

    class Spy(torch.optim.AdamW):
        def __init__(self, *args, **kw):
            seen.append(kw["weight_decay"])
            super().__init__(*args, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    train_tiny.main(QUICK + ["--stage", "2", "--stage", "3", "--out", str(tmp_path / "wd"), "--train.weight_decay=0.3"])
    train_tiny.main(QUICK + ["--stage", "3", "--out", str(tmp_path / "plain")])
    assert seen == [0.3, 0.3, 0.01]
