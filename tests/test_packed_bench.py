"""The packed-row benchmarks run end to end on the CPU at toy sizes: benchmarks/packed_attention.py
(every implementation's gradients agree with xla's, a refused one is recorded with its reason, auto
is labelled with what it resolved to) and benchmarks/packing.py's equal-compute mode (one padded
and one packed run per seed, each with its held-out loss and the recipe's baselines)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import packed_attention  # noqa: E402
import packing  # noqa: E402


def test_packed_attention_benchmark_checks_every_implementation_against_xla(tmp_path):
    assert packed_attention.main(["--seq-lens", "256", "--tokens", "512", "--tiles", "64x64", "--reps", "1",
                                  "--impls", "flash,cudnn,auto", "--train-seq-lens", "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "packed_attention_cpu.json").read_text())["attention_alone"]
    assert set(result["ms"]) == {"xla (ids as mask)", "64x64 every tile", "64x64 skipped", "flash",
                                 "flash every tile", "auto (chunked)"}
    assert "cudnn" in result["refused"] and "float16 or bfloat16" in result["refused"]["cudnn"]
    assert set(result["grad_err"]) == set(result["ms"])
    assert all(err < 1e-5 for err in result["grad_err"].values()), result["grad_err"]
    assert 0 <= result["skipped"]["64x64"] <= result["skipped"]["64x64 one row"] <= 1
    assert "flash every tile" in (tmp_path / "packed_attention_cpu.md").read_text()


def test_packing_quality_mode_trains_padded_and_packed_runs(tmp_path):
    assert packing.main(["--quality-steps", "2", "--quality-seeds", "0", "--quality-seq-len", "128",
                         "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "packing_quality_cpu.json").read_text())["runs"]
    assert [r["packed"] for r in runs] == [False, True]
    padded, packed = runs
    assert packed["real_tokens_per_step"] > padded["real_tokens_per_step"]  # packing fills the rows
    for r in runs:
        assert 0 < r["val_loss"] < 10 and set(r["baselines"]) == {"unigram", "context_free"}
