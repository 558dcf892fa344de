"""AlphaFold 2 parameter files (``params_model_*.npz``) onto the NNX ``Evoformer`` and back.

AlphaFold names every tensor by its Haiku path, module scope and parameter joined by ``//``
(``alphafold/alphafold_iteration/evoformer/evoformer_iteration/msa_row_attention_with_pair_bias/attention//query_w``),
and stacks the blocks of a layer stack on a leading axis (48 for ``evoformer_iteration``, 4
for ``extra_msa_stack``). The NNX modules carry AlphaFold's module and parameter names and
shapes (attention weights [c_in, heads, head_dim], gates [c_in, heads, head_dim] and
[heads, head_dim], outputs [heads, head_dim, c_out], ``Linear`` weights [in, out] and bias
[out], LayerNorm ``scale`` and ``offset``), so the mapping is by name:

==========================================================  ====================================================
AlphaFold name (E = ``alphafold/alphafold_iteration/evoformer``)  NNX path
==========================================================  ====================================================
``E/<embedder module>//<p>``                                 ``embedder.<embedder module>.<p>`` (preprocess_1d,
                                                              preprocess_msa, left_single, right_single,
                                                              pair_activiations: AlphaFold's spelling)
``E/extra_msa_activations//<p>``                             ``extra_msa_activations.<p>``
``E/evoformer_iteration/<module path>//<p>`` [n, ...]        ``evoformer_stack.blocks[i].<module path>.<p>``
``E/extra_msa_stack/<module path>//<p>`` [n, ...]            ``extra_msa_stack.blocks[i].<module path>.<p>``
``alphafold/alphafold_iteration/masked_msa_head/logits//<p>``  ``masked_msa_head.logits.<p>``
``alphafold/alphafold_iteration/distogram_head/half_logits//<p>``  ``distogram_head.half_logits.<p>``
==========================================================  ====================================================

LoRA adapters (``<weight>_lora``) are not AlphaFold's: loading leaves them as they are and
export refuses a model that has them. Loading takes the names the model needs and ignores the rest of the file (templates,
recycling embedders, the structure module, the other heads; the extra-MSA stack when the
config has no extra blocks). It refuses, naming the first offender in sorted order, a file
that lacks a needed name, holds a tensor of another shape (e.g. 48 stacked blocks for a
config with a different ``num_blocks``) or holds a name inside a loaded layer stack that
the model does not have (e.g. the fused triangle-multiplication weights of AlphaFold-Multimer
v2.3). Export writes the same names and shapes.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sciscale_jax.models.evoformer import Evoformer, EvoformerConfig
from sciscale_jax.models.stack import is_lora

ROOT = "alphafold/alphafold_iteration"
EVOFORMER = ROOT + "/evoformer"
STACKS = {"evoformer_stack": EVOFORMER + "/evoformer_iteration", "extra_msa_stack": EVOFORMER + "/extra_msa_stack"}


def _af_name(path: tuple) -> tuple[str, int | None]:
    """AlphaFold name of the parameter at NNX ``path``, and its block index in a layer stack."""
    names = [str(p) for p in path]
    if names[0] in STACKS:   # ("evoformer_stack", "blocks", i, module..., param)
        return f"{STACKS[names[0]]}/{'/'.join(names[3:-1])}//{names[-1]}", int(path[2])
    if names[0] == "embedder":
        scope = EVOFORMER + "/" + "/".join(names[1:-1])
    elif names[0] == "extra_msa_activations":
        scope = EVOFORMER + "/extra_msa_activations"
    else:                    # heads
        scope = ROOT + "/" + "/".join(names[:-1])
    return f"{scope}//{names[-1]}", None


def alphafold_param_map(model: Evoformer) -> dict[str, list[tuple[int | None, nnx.Param]]]:
    """AlphaFold name -> the model's parameters it fills, as (block index or None, parameter)."""
    mapping: dict[str, list] = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if is_lora(path):  # LoRA adapters are not AlphaFold's
            continue
        name, index = _af_name(path)
        mapping.setdefault(name, []).append((index, variable))
    for entries in mapping.values():
        entries.sort(key=lambda e: -1 if e[0] is None else e[0])
    return mapping


def _expected_shape(entries) -> tuple:
    shape = tuple(entries[0][1][...].shape)
    return shape if entries[0][0] is None else (len(entries),) + shape


def _read(params) -> dict[str, np.ndarray]:
    if isinstance(params, (str, os.PathLike)):
        with np.load(params) as npz:
            return {k: npz[k] for k in npz.files}
    if not isinstance(params, Mapping):
        raise ValueError(f"expected a path to an AlphaFold .npz file or a mapping of names to arrays, "
                         f"got {type(params).__name__}")
    return dict(params)


def _check_unscanned(model) -> None:
    if model.config.scan_layers:
        raise ValueError("AlphaFold parameters map onto per-block modules: build the Evoformer with "
                         "scan_layers=False to load or export them (then train with either)")


def load_alphafold_evoformer(params, config: EvoformerConfig | None = None, *, model: Evoformer | None = None,
                             rngs: nnx.Rngs | None = None) -> Evoformer:
    """Fill an ``Evoformer`` (``model``, or a new one built from ``config``) from AlphaFold's
    parameters: a path to ``params_model_*.npz`` or a mapping of AlphaFold names to arrays.

    Raises a ValueError naming the first needed name that is missing, the first tensor whose
    shape does not fit, or the first unknown name inside a layer stack the model loads.
    """
    if model is None:
        if config is None:
            raise ValueError("load_alphafold_evoformer needs a config or a model")
        model = Evoformer(config, rngs=rngs if rngs is not None else nnx.Rngs(0))
    _check_unscanned(model)
    flat = _read(params)
    mapping = alphafold_param_map(model)
    for name in sorted(mapping):
        if name not in flat:
            raise ValueError(f"AlphaFold parameters lack {name!r}, which the model needs "
                             f"(config: num_blocks={model.config.num_blocks}, "
                             f"num_extra_blocks={model.config.num_extra_blocks})")
        want, got = _expected_shape(mapping[name]), tuple(np.shape(flat[name]))
        if want != got:
            raise ValueError(f"AlphaFold parameter {name!r} has shape {got}; the model needs {want}")
    stacks = sorted({name.split("//")[0].split("/")[3] for name in mapping if name.startswith(tuple(
        s + "/" for s in STACKS.values()))})
    for name in sorted(flat):
        parts = name.split("/")
        if name.startswith(EVOFORMER + "/") and len(parts) > 4 and parts[3] in stacks and name not in mapping:
            raise ValueError(f"AlphaFold parameter {name!r} has no place in this model's {parts[3]} "
                             f"(a different AlphaFold version or configuration?)")
    for name, entries in mapping.items():
        value = np.asarray(flat[name])
        for index, variable in entries:
            v = value if index is None else value[index]
            variable[...] = jnp.asarray(v, dtype=variable[...].dtype)
    return model


def export_alphafold_evoformer(model: Evoformer) -> dict[str, np.ndarray]:
    """The model's parameters under AlphaFold's names and shapes (layer stacks stacked on axis 0).
    A model with LoRA adapters is refused: fold them in first (``models.stack.without_lora``)."""
    _check_unscanned(model)
    if model.config.lora_rank:
        raise ValueError("the model has LoRA adapters, which AlphaFold's parameters cannot hold: export "
                         "models.stack.without_lora(model), the adapters folded into the weights")
    out = {}
    for name, entries in alphafold_param_map(model).items():
        values = [np.asarray(variable[...]) for _, variable in entries]
        out[name] = values[0] if entries[0][0] is None else np.stack(values)
    return out
