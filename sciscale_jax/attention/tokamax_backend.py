"""tokamax's attention behind the front door: ``impl="tokamax"`` (optional, Python >= 3.12).

tokamax (a Pallas kernel library on PyPI: ``pip install tokamax``) has a Pallas Mosaic GPU
attention for Hopper that takes a bias with its gradient. It is offered as a peer back end:
``impl="tokamax"`` forces it, and ``impl="auto"`` picks it only where
``benchmarks/attention_gpu.py`` measured it fastest on that GPU kind (``measured.py``). tokamax
chooses its own kernel for the inputs (Mosaic GPU, Triton or XLA). Same layout and mask
convention as the front door (q [B,Q,H,D], k/v [B,K,Hkv,D], mask True = attend); causal needs
q_len == kv_len here (alignments differ when they differ).

tokamax's package imports ``xprof`` (a profiler with large native dependencies) for its
benchmarking helpers only; where xprof is absent, empty placeholder modules stand in for that
import (``benchmarks/attention_gpu.py`` imports tokamax through ``_tokamax`` too).
"""

from __future__ import annotations

import sys
import types


def _tokamax():
    """The tokamax module, or raise ImportError (the placeholders go again if tokamax fails)."""
    placed = []
    try:
        import xprof.cli.tools  # noqa: F401
    except ImportError:
        for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                placed.append(name)
        if not hasattr(sys.modules["xprof.cli.tools"], "get_kernel_stats_tool"):
            sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
    try:
        import tokamax
    except Exception:
        for name in placed:
            sys.modules.pop(name, None)
        raise
    return tokamax


def available() -> bool:
    """Whether tokamax imports here."""
    try:
        _tokamax()
    except Exception:  # noqa: BLE001 - absent, or too old a jax / Python for it
        return False
    return True


def check_tokamax(q, k, v, bias=None, mask=None, causal=False) -> None:
    """Raise a ValueError naming what is missing when tokamax cannot run these inputs."""
    try:
        _tokamax()
    except Exception as err:  # noqa: BLE001 - absent, or too old a jax / Python for it
        raise ValueError(f"impl='tokamax' needs the tokamax package (pip install tokamax; Python >= 3.12, "
                         f"jax >= 0.11.1): {type(err).__name__}: {err}") from None
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"impl='tokamax' with causal=True needs q_len == kv_len; got {q.shape[1]} and {k.shape[1]}")


def tokamax_attention(q_bqhd, k_bkhd, v_bkhd, *, bias=None, mask=None, causal=False, scale=None):
    """Front-door attention on tokamax. q [B,Q,H,D], k/v [B,K,Hkv,D]; bias/mask broadcast to [B,H,Q,K]."""
    check_tokamax(q_bqhd, k_bkhd, v_bkhd, bias, mask, causal)
    return _tokamax().dot_product_attention(q_bqhd, k_bkhd, v_bkhd, bias=bias, mask=mask, scale=scale,
                                            is_causal=bool(causal))


IMPL = (tokamax_attention, None)  # listed as impl="tokamax" in sciscale_jax.attention.core.IMPLS; checks itself
