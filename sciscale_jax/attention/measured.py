"""Measured attention speed per GPU kind: what the front door's ``impl="auto"`` ranks by.

``measured_attention.json`` (next to this file) holds, for each device kind, the forward+backward
TFLOP/s that ``benchmarks/attention_gpu.py`` measured for the front-door implementations at
(head_dim, seq, causal, bias) points, bfloat16, q_len == kv_len. It is written from the
benchmark's JSON, never by hand:

    python benchmarks/attention_gpu.py --table-from benchmarks/results/attention_gpu.json

Points are keyed by bias kind: "none", "pair" (an additive bias, with or without a mask: the
benchmarks' "pair" and "pair+mask" records) and "mask" (a boolean mask alone, as the Evoformer's
MSA column attention calls it: ``benchmarks/attention_evoformer_gpu.py``). Records of one file at
the same point (the Evoformer's MSA row and triangle attention are both head_dim 32, 256 keys,
with a pair bias and a mask) count with their mean; a later file replaces an earlier one's.

``ranking(kind, head_dim, seq, causal, bias)`` orders the implementations measured at the
nearest point (same causal flag and bias kind, a mask alone falling back to the bias points
where no mask-only point is near; then nearest head_dim, then nearest sequence
length on a log scale), fastest first (a lead under ``TIE`` goes to the more established one);
None where the device kind or that bias kind was never measured, or the nearest point is more
than ``MAX_HEAD_DIM_RATIO`` away in head_dim or ``MAX_SEQ_RATIO`` in sequence length (the
Evoformer's head_dim 32, seq 256 is not ranked by head_dim 128, seq 4096 points), and the front
door falls back to its rules.
"""

from __future__ import annotations

import functools
import json
import math
import os

TABLE_PATH = os.path.join(os.path.dirname(__file__), "measured_attention.json")
FRONT_DOOR = ("sm90", "cudnn", "flash", "tokamax", "chunked", "xla")  # benchmark names that are front-door impls
PREFERENCE = ("cudnn", "tokamax", "sm90", "flash", "chunked", "xla")  # ties go to the more established
TIE = 0.05  # a lead under 5% is a tie (the same sm90 point measured 363 and 470 TFLOP/s forward in two runs)
# How far a measured ranking is carried: kernels' standings change with tile fill (head_dim) and with
# launch and pipeline-fill overheads (short sequences), so past these the front door's rules decide.
MAX_HEAD_DIM_RATIO = 2
MAX_SEQ_RATIO = 4


@functools.lru_cache(maxsize=None)
def load(path: str = TABLE_PATH) -> dict:
    """The table: {"devices": {kind: [{"head_dim", "seq", "causal", "bias", "tflops": {impl: x}}]}}."""
    with open(path) as f:
        return json.load(f)


BIAS_KINDS = {"none": "none", "pair": "pair", "pair+mask": "pair", "mask": "mask"}  # record's -> table's


def table_from_records(record_lists) -> dict:
    """The table from benchmark record lists (later lists win where they measure the same point;
    within one list, the mean): forward+backward rows of front-door implementations."""
    points: dict = {}
    for records in record_lists:
        in_list: dict = {}
        for r in records:
            pass_name = r.get("pass", r.get("pass_"))  # attention_evoformer_gpu writes "pass_"
            if pass_name != "fwd+bwd" or r.get("impl") not in FRONT_DOOR or not r.get("tflops"):
                continue
            bias = BIAS_KINDS.get(r.get("bias") or "none")  # records from before the pair-bias runs have no field
            if bias is None:
                continue
            key = (r["device"], r["head_dim"], r["seq"], bool(r["causal"]), bias)
            in_list.setdefault(key, {}).setdefault(r["impl"], []).append(float(r["tflops"]))
        for key, impls in in_list.items():
            points.setdefault(key, {}).update({impl: round(sum(x) / len(x), 1) for impl, x in impls.items()})
    devices: dict = {}
    for (device, head_dim, seq, causal, bias), tflops in sorted(points.items()):
        devices.setdefault(device, []).append(
            {"head_dim": head_dim, "seq": seq, "causal": causal, "bias": bias, "tflops": dict(sorted(tflops.items()))})
    return {"pass": "fwd+bwd", "dtype": "bfloat16", "devices": devices}


def ranking(kind: str, head_dim: int, seq: int, causal: bool, bias, table: dict | None = None):
    """Implementation names fastest first at the nearest measured point, or None. ``bias``: "none",
    "pair" (an additive bias, masked or not) or "mask" (a mask alone; ranked by the bias points
    where no mask-only point is near); True / False mean "pair" / "none"."""
    bias = {True: "pair", False: "none"}[bias] if isinstance(bias, bool) else bias
    if bias not in ("none", "pair", "mask"):
        raise ValueError(f"bias={bias!r} must be 'none', 'pair' or 'mask'")
    rows = (table or load())["devices"].get(kind, [])
    order = _nearest(rows, head_dim, seq, causal, bias)
    if order is None and bias == "mask":  # a mask costs the kernels less than a bias does
        order = _nearest(rows, head_dim, seq, causal, "pair")
    return order


def _nearest(rows, head_dim, seq, causal, bias):
    rows = [r for r in rows if r["causal"] == bool(causal) and r["bias"] == bias]
    if not rows:
        return None
    nearest = min(rows, key=lambda r: (abs(math.log2(r["head_dim"] / head_dim)),
                                       abs(math.log2(r["seq"] / max(seq, 1)))))
    if (abs(math.log2(nearest["head_dim"] / head_dim)) > math.log2(MAX_HEAD_DIM_RATIO)
            or abs(math.log2(nearest["seq"] / max(seq, 1))) > math.log2(MAX_SEQ_RATIO)):
        return None  # too far from anything measured to carry its ranking over
    return _order(nearest["tflops"])


def _order(tflops: dict) -> tuple:
    """Fastest first, except that within ``TIE`` of the fastest left the more established
    implementation (``PREFERENCE``) goes first: run-to-run spread on one GPU is several percent,
    so a smaller lead is not a reason to switch kernels."""
    left, order = dict(tflops), []
    while left:
        best = max(left.values())
        close = [name for name, x in left.items() if x >= best * (1 - TIE)]
        pick = min(close, key=lambda name: (PREFERENCE.index(name) if name in PREFERENCE else len(PREFERENCE),
                                            -left[name]))
        order.append(pick)
        del left[pick]
    return tuple(order)
