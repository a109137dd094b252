"""The benchmark scripts keep working (no timings asserted here: speed lives in bench/, never in tests)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module(name: str):
    if str(BENCH) not in sys.path:          # the scripts import their shared helpers (bench/common.py) by name
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_stall_seconds_counts_the_waits_of_a_player():
    stall = _module("streaming").stall_seconds
    rate = 100
    assert stall([(1.0, 50), (1.4, 50), (1.9, 100)], rate) == 0.0               # each chunk there before it is due
    assert stall([(1.0, 50), (1.7, 50)], rate) == pytest.approx(0.2)            # due at 1.5, there at 1.7
    assert stall([(1.0, 10), (2.0, 10), (3.0, 10)], rate) == pytest.approx(1.8)  # 0.9 + 0.9


def test_real_size_script_runs_the_whole_path_on_the_tiny_preset():
    """transformers writes the checkpoint, from_pretrained loads it, the model answers with streamed speech."""
    res = subprocess.run([sys.executable, str(BENCH / "real_size.py"), "--preset", "tiny", "--codes", "40"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["nano_omni_params"] == row["transformers_params"] > 0
    assert row["shards"] >= 1 and row["audio_s"] > 0 and row["first_pcm_ms"] > row["first_text_ms"] > 0
