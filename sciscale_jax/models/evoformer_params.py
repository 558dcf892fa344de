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
``E/prev_pos_linear//<p>``, ``E/prev_msa_first_row_norm//<p>``,  the same names (``recycle_first_pass`` or
``E/prev_pair_norm//<p>``                                     ``num_recycle``: the recycling embedder)
``E/evoformer_iteration/<module path>//<p>`` [n, ...]        ``evoformer_stack.blocks[i].<module path>.<p>``
``E/extra_msa_stack/<module path>//<p>`` [n, ...]            ``extra_msa_stack.blocks[i].<module path>.<p>``
``alphafold/alphafold_iteration/masked_msa_head/logits//<p>``  ``masked_msa_head.logits.<p>``
``alphafold/alphafold_iteration/distogram_head/half_logits//<p>``  ``distogram_head.half_logits.<p>``
==========================================================  ====================================================

LoRA adapters (``<weight>_lora``) are not AlphaFold's: loading leaves them as they are and
export refuses a model that has them. Loading takes the names the model needs and ignores the
rest of the file (templates, the recycling embedder without ``recycle_first_pass`` or ``num_recycle``, the
structure module, the other heads; the extra-MSA stack when the config has no extra blocks). It refuses, naming the first offender in sorted order, a file
that lacks a needed name, holds a tensor of another shape (e.g. 48 stacked blocks for a
config with a different ``num_blocks``) or holds a name inside a loaded layer stack that
the model does not have (e.g. the fused triangle-multiplication weights of AlphaFold-Multimer
v2.3). Export writes the same names and shapes.
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sciscale_jax.models.evoformer import Evoformer, EvoformerConfig
from sciscale_jax.models.stack import is_lora

ROOT = "alphafold/alphafold_iteration"
EVOFORMER = ROOT + "/evoformer"
STACKS = {"evoformer_stack": EVOFORMER + "/evoformer_iteration", "extra_msa_stack": EVOFORMER + "/extra_msa_stack"}
TOP_LEVEL = ("extra_msa_activations", "prev_pos_linear", "prev_msa_first_row_norm", "prev_pair_norm")


def _af_name(path: tuple) -> tuple[str, int | None]:
    """AlphaFold name of the parameter at NNX ``path``, and its block index in a layer stack."""
    names = [str(p) for p in path]
    if names[0] in STACKS:   # ("evoformer_stack", "blocks", i, module..., param)
        return f"{STACKS[names[0]]}/{'/'.join(names[3:-1])}//{names[-1]}", int(path[2])
    if names[0] == "embedder":
        scope = EVOFORMER + "/" + "/".join(names[1:-1])
    elif names[0] in TOP_LEVEL:
        scope = EVOFORMER + "/" + names[0]
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


# --- an AlphaFold parameter file as the start of a run (``--init-from params_model_1.npz``) -------------------

class NpzArrays:
    """The arrays of an ``.npz`` file by name, read one at a time: shapes from the headers alone, and
    the members ``np.savez`` stores uncompressed (AlphaFold's files) memory-mapped, so one block of a
    stacked array reads only that block. ValueError in one line for a file that is not an npz."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.shapes, self._where = {}, {}
        try:
            with zipfile.ZipFile(self.path) as z, open(self.path, "rb") as raw:
                for info in z.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    with z.open(info) as f:
                        version = np.lib.format.read_magic(f)
                        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)
                        shape, fortran, dtype = read_header(f)
                        header = f.tell()
                    name = info.filename[:-4]
                    self.shapes[name] = tuple(shape)
                    if info.compress_type == zipfile.ZIP_STORED and not fortran and not dtype.hasobject:
                        raw.seek(info.header_offset + 26)  # the member's data follows its local header
                        name_len, extra_len = struct.unpack("<HH", raw.read(4))
                        self._where[name] = (info.header_offset + 30 + name_len + extra_len + header, dtype)
        except (OSError, zipfile.BadZipFile, ValueError, struct.error) as err:
            raise ValueError(f"{self.path}: not a readable .npz file ({err})") from None

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Array ``name`` (``[index]`` of it: one block of a stacked array) as float32."""
        if name in self._where:
            offset, dtype = self._where[name]
            array = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=self.shapes[name])
        else:
            with np.load(self.path) as npz:
                array = npz[name]
        return np.array(array if index is None else array[index], dtype=np.float32)


def alphafold_file(path) -> NpzArrays | None:
    """The arrays of ``path`` when it is an ``.npz`` file holding AlphaFold 2's Evoformer (its MSA
    embedding weight), else None."""
    if not (os.path.isfile(path) and str(path).endswith(".npz")):
        return None
    try:
        arrays = NpzArrays(path)
    except ValueError:
        return None
    return arrays if EVOFORMER + "/preprocess_msa//weights" in arrays.shapes else None


def alphafold_settings(shapes: Mapping[str, tuple]) -> dict:
    """The ``EvoformerConfig`` sizes an AlphaFold parameter file fixes, read off its tensors' shapes
    (``NpzArrays.shapes``); ValueError in one line for a file without AlphaFold 2's monomer Evoformer."""
    def shape(name):
        if name not in shapes:
            raise ValueError(f"AlphaFold parameters lack {name!r} (AlphaFold 2's monomer Evoformer)")
        return shapes[name]

    block = STACKS["evoformer_stack"]
    q = shape(f"{block}/msa_row_attention_with_pair_bias/attention//query_w")   # [n, c_m, heads, head_dim]
    tri = shape(f"{block}/triangle_attention_starting_node/attention//query_w")  # [n, c_z, heads, head_dim]
    out = dict(target_feat_dim=shape(EVOFORMER + "/preprocess_1d//weights")[0],
               msa_feat_dim=shape(EVOFORMER + "/preprocess_msa//weights")[0],
               c_m=q[1], c_z=tri[1], num_blocks=q[0], msa_heads=q[2], msa_head_dim=q[3], pair_heads=tri[2],
               pair_head_dim=tri[3],
               transition_factor=shape(f"{block}/msa_transition/transition1//weights")[2] // q[1],
               opm_channels=shape(f"{block}/outer_product_mean/left_projection//weights")[2],
               tri_mul_channels=shape(f"{block}/triangle_multiplication_outgoing/left_projection//weights")[2],
               max_relative_feature=(shape(EVOFORMER + "/pair_activiations//weights")[0] - 1) // 2,
               msa_classes=shape(ROOT + "/masked_msa_head/logits//weights")[1],
               distogram_bins=shape(ROOT + "/distogram_head/half_logits//weights")[1], num_extra_blocks=0,
               recycle_first_pass=EVOFORMER + "/prev_pair_norm//offset" in shapes)
    extra = STACKS["extra_msa_stack"]
    if f"{extra}/msa_row_attention_with_pair_bias/attention//query_w" in shapes:
        eq = shapes[f"{extra}/msa_row_attention_with_pair_bias/attention//query_w"]
        out.update(num_extra_blocks=eq[0], c_e=eq[1], extra_msa_heads=eq[2], extra_msa_head_dim=eq[3],
                   extra_msa_feat_dim=shape(EVOFORMER + "/extra_msa_activations//weights")[0])
    return {k: v if isinstance(v, bool) else int(v) for k, v in out.items()}


def _pure_af_name(path: tuple) -> tuple[str, int | None]:
    """AlphaFold name of the parameter at pure-dict ``path`` of an ``Evoformer`` (per-block or
    scanned layout) and its block index (None: the whole array, or a scanned stack)."""
    names = [str(p) for p in path]
    if names[0] in STACKS and len(path) > 2 and not isinstance(path[2], int):  # scanned: [n, ...]
        return f"{STACKS[names[0]]}/{'/'.join(names[2:-1])}//{names[-1]}", None
    return _af_name(path)


def alphafold_readers(path, wanted: Mapping) -> dict:
    """The Evoformer parameters ``wanted`` (a pure dict of ``nnx.state(evoformer, nnx.Param)``, leaves
    with a ``shape``; LoRA adapters left out) as zero-argument functions reading AlphaFold parameter
    file ``path`` (one block of a stacked array at a time). ValueError in one line, before anything
    is read, for a missing name, a shape that does not fit, or a name inside a loaded layer stack
    that the model does not have (another AlphaFold version)."""
    arrays = NpzArrays(path)
    flat = traverse_util.flatten_dict(wanted)
    stacks = set()
    readers: dict = {}
    for p, leaf in sorted(flat.items(), key=lambda kv: tuple(map(str, kv[0]))):
        name, index = _pure_af_name(p)
        if name not in arrays.shapes:
            raise ValueError(f"{path}: AlphaFold parameters lack {name!r}, which the model needs")
        got = arrays.shapes[name] if index is None else arrays.shapes[name][1:]
        if tuple(got) != tuple(leaf.shape):
            raise ValueError(f"{path}: AlphaFold parameter {name!r} has shape {arrays.shapes[name]}; the model "
                             f"needs {tuple(leaf.shape)}" + ("" if index is None else f" per block ({index})"))
        if str(p[0]) in STACKS:
            stacks.add(STACKS[str(p[0])])
        readers[p] = lambda n=name, i=index: arrays.read(n, i)
    needed = {_pure_af_name(p)[0] for p in flat}
    for name in sorted(arrays.shapes):
        if name.split("//")[0].startswith(tuple(s + "/" for s in stacks)) and name not in needed:
            raise ValueError(f"{path}: AlphaFold parameter {name!r} has no place in this model "
                             "(a different AlphaFold version or configuration?)")
    return traverse_util.unflatten_dict(readers)


def alphafold_arrays(params: Mapping) -> dict[str, np.ndarray]:
    """An ``Evoformer``'s parameters (a pure dict, per-block or scanned, no LoRA adapters) under
    AlphaFold's names and shapes (layer stacks stacked on axis 0), as ``export_alphafold_evoformer``."""
    blocks, out = {}, {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        if is_lora(path):
            raise ValueError(f"{'.'.join(map(str, path))}: fold the LoRA adapters in first (models.stack.merge_lora)")
        name, index = _pure_af_name(path)
        if index is None:
            out[name] = value
        else:
            blocks.setdefault(name, {})[index] = value
    for name, by_index in blocks.items():
        out[name] = np.stack([by_index[i] for i in range(len(by_index))])
    return out
