"""EfficientQAT (Chen et al. 2024, "EfficientQAT: Efficient Quantization-Aware Training
for Large Language Models").

Weights are quantised uniform asymmetric, n bits, one step size ``s`` and zero point
``z`` per group of ``group_size`` (64 or 128 in the paper) consecutive input rows of each
output column: ``q = clamp(round(w / s) + round(z), 0, 2**n - 1)``, ``w ~= (q - round(z)) * s``.
``round`` has a straight-through gradient and ``clamp`` a zero one outside ``[0, 2**n - 1]``
(one inside, ends included), so
``s`` and ``z`` are learned as in the reference code.

1. **Block-AP** (block-wise training of all parameters): blocks are trained one at a
   time, in order. Each block, with fake-quantised weights, learns to reproduce the
   full-precision block's output on calibration data; its input is the previous
   quantised blocks' output. All of its parameters and the quantisation ``s``, ``z`` are
   trained (MSE loss, Adam). Then the integer weights are frozen.
2. **E2E-QP** (end-to-end training of quantisation parameters): with integer weights
   and zero points fixed, only the step sizes are trained on the model's own loss.

Works on any NNX block or model: every ``nnx.Param`` named ``kernel`` with two or more
dims is quantised; its input axes are the first ``len(module.in_shape)`` ones when the
owning module has ``in_shape`` (sciscale_jax's ``Dense``), else the first one
(``nnx.Linear``). Quantised weights are keyed by their path in the block or model,
written as one string (``"layers/0/mlp/wi/kernel"``) so the dicts are ordinary pytrees.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from sciscale_jax.quant.fake_quant import check_bits


def round_ste(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _to_groups(w, n_in: int, group_size: int):
    """w[in..., out...] -> [in / g, g, out] (in and out flattened)."""
    d_in, d_out = math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])
    if not isinstance(group_size, int) or group_size < 1 or d_in % group_size:
        raise ValueError(f"group_size={group_size!r} does not divide the input dimension {d_in} "
                         f"of a weight of shape {w.shape}")
    return w.reshape(d_in // group_size, group_size, d_out)


class GroupQuant(NamedTuple):
    """Learnable quantisation parameters of one weight: ``scale``, ``zero`` [in/g, 1, out]."""

    scale: jax.Array
    zero: jax.Array


def init_group_quant(w, bits: int, group_size: int, n_in: int = 1) -> GroupQuant:
    """Min/max initialisation: ``s = (max - min) / (2**n - 1)``, ``z = -min / s``."""
    check_bits(bits)
    wg = _to_groups(w, n_in, group_size).astype(jnp.float32)
    lo, hi = wg.min(axis=1, keepdims=True), wg.max(axis=1, keepdims=True)
    scale = jnp.maximum((hi - lo) / (2**bits - 1), 1e-8)
    return GroupQuant(scale, -lo / scale)


def fake_quant_group(w, qp: GroupQuant, bits: int, group_size: int, n_in: int = 1):
    """Dequantised ``w`` under learnable ``qp`` (gradients reach ``w``, ``scale``, ``zero``)."""
    wg = _to_groups(w, n_in, group_size).astype(jnp.float32)
    zr = round_ste(qp.zero)
    v = round_ste(wg / qp.scale) + zr
    # clamp with PyTorch's gradient: pass on [0, qmax] inclusive (jnp.clip halves it at
    # the ends, where rounded values land exactly), zero outside.
    inside = (v >= 0) & (v <= 2**bits - 1)
    q = jnp.where(inside, v, jax.lax.stop_gradient(jnp.clip(v, 0, 2**bits - 1)))
    return ((q - zr) * qp.scale).reshape(w.shape).astype(w.dtype)


class FrozenWeight(NamedTuple):
    """Integer weight after Block-AP: ``w ~= (w_int - zero) * scale``; only ``scale`` trains."""

    w_int: jax.Array  # uint8 [in/g, g, out]
    zero: jax.Array   # float32 integers [in/g, 1, out]
    scale: jax.Array  # float32 [in/g, 1, out]


def freeze(w, qp: GroupQuant, bits: int, group_size: int, n_in: int = 1) -> FrozenWeight:
    wg = _to_groups(w, n_in, group_size).astype(jnp.float32)
    zr = jnp.round(qp.zero)
    w_int = jnp.clip(jnp.round(wg / qp.scale) + zr, 0, 2**bits - 1).astype(jnp.uint8)
    return FrozenWeight(w_int, zr, qp.scale)


def dequantize(fw: FrozenWeight, shape, dtype=jnp.float32):
    return ((fw.w_int.astype(jnp.float32) - fw.zero) * fw.scale).reshape(shape).astype(dtype)


def _key(path) -> str:
    return "/".join(map(str, path))


def _flat_params(params: nnx.State) -> tuple[dict[str, Any], dict[str, tuple]]:
    """{"a/0/kernel": array}, and the key -> path map to rebuild the nested dict."""
    nested = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    return {_key(p): v for p, v in nested.items()}, {_key(p): p for p in nested}


def _set_params(params: nnx.State, flat: dict[str, Any], paths: dict[str, tuple]) -> nnx.State:
    state = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({paths[k]: v for k, v in flat.items()}))
    return state


def quantized_kernels(model: nnx.Module) -> dict[str, int]:
    """Path of every quantisable kernel in ``model`` -> its number of input axes."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "kernel", None), nnx.Param):
            kernel = node.kernel
            if kernel[...].ndim >= 2:
                out[_key(tuple(path) + ("kernel",))] = len(getattr(node, "in_shape", (None,)))
    return out


def _with_kernels(graphdef, params, rest, paths, flat_params: dict, kernels: dict):
    """A model merged from flat parameters with the kernels in ``kernels`` replaced."""
    return nnx.merge(graphdef, _set_params(params, {**flat_params, **kernels}, paths), rest)


def block_ap(block: nnx.Module, inputs, targets, *, bits: int = 4, group_size: int = 128,
             steps: int = 100, learning_rate: float = 1e-4, qparam_learning_rate: float = 1e-3,
             apply: Callable[[nnx.Module, Any], Any] = lambda b, x: b(x)) -> dict[str, FrozenWeight]:
    """Block-AP on one block: train all its parameters and the quantisation parameters so
    ``apply(quantised block, inputs)`` matches ``targets``; write the trained parameters
    (full-precision latent weights) back into ``block``; return the frozen integer weights."""
    check_bits(bits)
    kernels = quantized_kernels(block)
    if not kernels:
        raise ValueError("block_ap: the block has no kernel parameters to quantise")
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    flat, paths = _flat_params(params)
    qps = {p: init_group_quant(flat[p], bits, group_size, n) for p, n in kernels.items()}

    def loss_fn(trainable):
        flat_p, qps = trainable
        fq = {p: fake_quant_group(flat_p[p], qps[p], bits, group_size, n) for p, n in kernels.items()}
        model = _with_kernels(graphdef, params, rest, paths, flat_p, fq)
        return jnp.mean((apply(model, inputs).astype(jnp.float32) - targets.astype(jnp.float32)) ** 2)

    tx = optax.multi_transform({"w": optax.adam(learning_rate), "q": optax.adam(qparam_learning_rate)},
                               ({p: "w" for p in flat}, {p: GroupQuant("q", "q") for p in qps}))
    trainable = ({p: v for p, v in flat.items()}, qps)
    opt_state = tx.init(trainable)

    @jax.jit
    def run(trainable, opt_state):
        def step(carry, _):
            trainable, opt_state = carry
            grads = jax.grad(loss_fn)(trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), None
        return jax.lax.scan(step, (trainable, opt_state), None, length=steps)[0]

    (flat, qps), _ = run(trainable, opt_state)
    nnx.update(block, _set_params(params, flat, paths))
    return {p: freeze(flat[p], qps[p], bits, group_size, n) for p, n in kernels.items()}


def block_ap_sequential(blocks: Iterable[nnx.Module], calib_inputs, *, apply=lambda b, x: b(x),
                        **kwargs) -> list[dict[str, FrozenWeight]]:
    """Block-AP over blocks in order: block i's target is the full-precision output on the
    full-precision stream; its input is the stream through the already quantised blocks."""
    fp_x, q_x, frozen = calib_inputs, calib_inputs, []
    for block in blocks:
        target = apply(block, fp_x)
        frozen.append(block_ap(block, q_x, target, apply=apply, **kwargs))
        load_frozen(block, frozen[-1])
        fp_x, q_x = target, apply(block, q_x)
    return frozen


def load_frozen(model: nnx.Module, frozen: dict[str, FrozenWeight]) -> None:
    """Write the dequantised frozen weights into ``model``'s kernels."""
    params = nnx.state(model, nnx.Param)
    flat, paths = _flat_params(params)
    for key, fw in frozen.items():
        flat[key] = dequantize(fw, flat[key].shape, flat[key].dtype)
    nnx.update(model, _set_params(params, flat, paths))


def e2e_qp(model: nnx.Module, frozen: dict[str, FrozenWeight], loss_fn: Callable[[nnx.Module, Any], Any],
           batches: Iterable, *, learning_rate: float = 2e-5) -> dict[str, FrozenWeight]:
    """E2E-QP: train only the step sizes of ``frozen`` (paths into ``model``) on
    ``loss_fn(model, batch)`` over ``batches``; every other parameter, the integer weights
    and the zero points stay fixed. Loads the result into ``model`` and returns it."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat, paths = _flat_params(params)
    missing = [p for p in frozen if p not in flat]
    if missing:
        raise ValueError(f"e2e_qp: frozen weights at {missing} are not kernels of the model")

    def loss_of_scales(scales, batch):
        kernels = {p: dequantize(fw._replace(scale=scales[p]), flat[p].shape, flat[p].dtype)
                   for p, fw in frozen.items()}
        return loss_fn(_with_kernels(graphdef, params, rest, paths, flat, kernels), batch)

    tx = optax.adam(learning_rate)
    scales = {p: fw.scale for p, fw in frozen.items()}
    opt_state = tx.init(scales)

    @jax.jit
    def step(scales, opt_state, batch):
        grads = jax.grad(loss_of_scales)(scales, batch)
        updates, opt_state = tx.update(grads, opt_state, scales)
        return optax.apply_updates(scales, updates), opt_state

    for batch in batches:
        scales, opt_state = step(scales, opt_state, batch)
    result = {p: fw._replace(scale=scales[p]) for p, fw in frozen.items()}
    load_frozen(model, result)
    return result
