"""ESM-2 checkpoints (Lin et al. 2023, "Evolutionary-scale prediction of atomic-level protein
structure with a language model") as parameters of the sciscale_jax Transformer.

Reads Hugging Face's layout of an ``EsmForMaskedLM`` (``config.json``, ``model.safetensors`` or
sharded ``model-*.safetensors`` with their index, ``vocab.txt``), as ``facebook/esm2_t6_8M_UR50D``
up to ``esm2_t48_15B_UR50D`` are published:

- :func:`settings`: the ``TransformerConfig`` fields the checkpoint fixes (depth, widths, ESM-2's
  LayerNorm, biases, erf GELU, LM head and token dropout, the vocabulary rows);
- :func:`params`: the parameters laid out as ``nnx.state(Transformer(config), nnx.Param)``
  (per-layer or stacked under ``scan_layers``), each leaf a function that reads its array when
  called, so a run places one array at a time instead of holding the whole checkpoint.

The vocabulary is the caller's tokenizer (``tokens`` by id) followed by ESM's tokens it lacks,
so every ESM row keeps its trained embedding and output bias and the softmax runs over ESM's
whole alphabet; rows past those up to a multiple of 8 (so the vocabulary splits over tensor
parallel meshes) get a zero embedding and an output bias of ``PAD_LOGIT``: no probability.
Logits of a model read here are Hugging Face's, reordered (``tests/test_esm.py``).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

ESM2_ALPHABET = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>")
PAD_LOGIT = -1e4     # the output bias of vocabulary rows past ESM's: exp() of it is 0 in float32
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_NORM = {"scale": ("weight", "gamma"), "bias": ("bias", "beta")}  # current and older Hugging Face names


def is_checkpoint(path) -> bool:
    """True when ``path`` is a folder with Hugging Face's ``config.json`` or a ``.safetensors`` file."""
    p = pathlib.Path(path).expanduser()
    return (p.is_dir() and (p / CONFIG).is_file()) or (p.is_file() and p.suffix == ".safetensors")


def _folder(path) -> pathlib.Path:
    p = pathlib.Path(path).expanduser()
    return p.parent if p.is_file() else p


def _read_config(path) -> dict:
    file = _folder(path) / CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no {CONFIG} beside the weights (Hugging Face's ESM-2 layout)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not readable JSON ({err})") from None
    if not isinstance(config, dict) or config.get("model_type") != "esm":
        raise ValueError(f"{file}: model_type {config.get('model_type') if isinstance(config, dict) else None!r}, "
                         "not an ESM model ('esm')")
    refusals = [
        (config.get("is_folding_model", False), "an ESMFold model, not an ESM-2 language model"),
        (config.get("position_embedding_type", "absolute") != "rotary",
         f"position_embedding_type={config.get('position_embedding_type', 'absolute')!r}: ESM-1b/ESM-1v "
         "(learned positions); only ESM-2 (rotary) is read"),
        (config.get("emb_layer_norm_before", False), "a LayerNorm before the layers (emb_layer_norm_before): "
         "ESM-1b's, not ESM-2's"),
        (config.get("layer_norm_eps", 1e-5) != 1e-5, f"layer_norm_eps={config.get('layer_norm_eps')} "
         "(the Transformer's LayerNorm uses ESM-2's 1e-5)"),
        (config.get("hidden_act", "gelu") != "gelu", f"hidden_act={config.get('hidden_act')!r} (ESM-2: 'gelu')"),
        (not config.get("tie_word_embeddings", True), "an output layer untied from the embedding"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"{file}: {why}")
    return config


def vocabulary(path) -> tuple[str, ...]:
    """The checkpoint's tokens by id: its ``vocab.txt``, else ESM-2's alphabet."""
    file = _folder(path) / "vocab.txt"
    if not file.is_file():
        return ESM2_ALPHABET
    return tuple(line.strip() for line in file.read_text().splitlines() if line.strip())


def rows(tokens, esm_tokens) -> list[int]:
    """ESM row of each vocabulary row: ``tokens`` (the caller's, by id), then ESM's others; ValueError
    naming a token of the caller's that ESM lacks."""
    missing = [t for t in tokens if t not in esm_tokens]
    if missing:
        raise ValueError(f"the checkpoint's vocabulary lacks {missing}")
    index = {t: i for i, t in enumerate(esm_tokens)}
    return [index[t] for t in tokens] + [i for i, t in enumerate(esm_tokens) if t not in set(tokens)]


def settings(path, tokens) -> dict:
    """The ``TransformerConfig`` fields an ESM-2 checkpoint fixes, for a tokenizer of ``tokens``
    (by id; its mask token ``<mask>`` gets ESM-2's token dropout)."""
    config = _read_config(path)
    try:
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        embed, mlp = int(config["hidden_size"]), int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{_folder(path) / CONFIG}: no usable {err} setting") from None
    esm_tokens = vocabulary(path)
    if len(esm_tokens) != vocab:
        raise ValueError(f"{_folder(path)}: vocab.txt lists {len(esm_tokens)} tokens, config.json's vocab_size "
                         f"is {vocab}")
    tokens = tuple(tokens)
    needed = len(rows(tokens, esm_tokens))
    out = dict(num_layers=layers, num_heads=heads, embed_dim=embed, mlp_dim=mlp, vocab_size=-(-needed // 8) * 8,
               norm="layer", bias=True, mlp="gelu_exact", head="esm",
               token_dropout_id=tokens.index("<mask>") if config.get("token_dropout", False) else -1)
    if "rope_theta" in config:
        out["rope_base"] = float(config["rope_theta"])
    return out


class _Weights:
    """The checkpoint's tensors by name (prefix ``esm.`` optional), read one at a time."""

    def __init__(self, path):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ValueError("reading ESM-2 weights needs the safetensors package: pip install safetensors "
                             "(part of sciscale_jax[science])") from None
        self._open = safe_open
        p = pathlib.Path(path).expanduser()
        folder = _folder(p)
        if p.is_file():
            files = {p}
        elif (folder / WEIGHTS).is_file():
            files = {folder / WEIGHTS}
        elif (folder / INDEX).is_file():
            try:
                files = {folder / name for name in json.loads((folder / INDEX).read_text())["weight_map"].values()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{folder / INDEX}: not a readable safetensors index ({err})") from None
        else:
            torch_files = sorted(q.name for q in folder.glob("*.bin")) + sorted(q.name for q in folder.glob("*.pt"))
            hint = (f" (it holds {', '.join(torch_files)}: PyTorch pickles, which sciscale_jax does not unpickle; "
                    "save them as safetensors with transformers: EsmForMaskedLM.from_pretrained(folder)"
                    ".save_pretrained(folder))") if torch_files else ""
            raise ValueError(f"{folder}: no {WEIGHTS} or {INDEX}{hint}")
        self.where, self.shapes = {}, {}
        for file in sorted(files):
            try:
                with safe_open(str(file), "numpy") as f:
                    for name in f.keys():
                        key = name.removeprefix("esm.")
                        self.where[key] = (file, name)
                        self.shapes[key] = tuple(f.get_slice(name).get_shape())
            except FileNotFoundError:
                raise ValueError(f"{file}: no such file (named by {folder / INDEX})") from None
            except Exception as err:  # safetensors raises its own error types on damaged headers
                raise ValueError(f"{file}: not a readable safetensors file ({err})") from None

    def has(self, name) -> bool:
        return name in self.where

    def shape(self, name) -> tuple:
        if name not in self.where:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return self.shapes[name]

    def read(self, name) -> np.ndarray:
        file, stored = self.where[name]
        try:
            with self._open(str(file), "numpy") as f:
                array = f.get_tensor(stored)
        except Exception as err:
            raise ValueError(f"{file}: tensor {stored!r} is not readable ({err})") from None
        if not jax.numpy.issubdtype(array.dtype, jax.numpy.floating):  # float16/32/64, bfloat16 (ml_dtypes)
            raise ValueError(f"{file}: tensor {stored!r} is {array.dtype}, not floating point")
        return array.astype(np.float32)

    def norm_name(self, prefix: str, ours: str) -> str:
        names = [f"{prefix}.{n}" for n in _NORM[ours]]
        return next((n for n in names if n in self.where), names[0])


def params(path, config, tokens) -> dict:
    """The parameters of ``Transformer(config)`` from ESM-2 checkpoint ``path``, as a nested dict
    shaped like ``nnx.state(model, nnx.Param).to_pure_dict()`` whose leaves are zero-argument
    functions returning float32 numpy arrays (read when called). ``config`` must hold
    :func:`settings`' values (ValueError naming the first that differs); ``tokens`` as there."""
    expected = settings(path, tokens)
    for name, value in expected.items():
        if getattr(config, name) != value:
            raise ValueError(f"the ESM-2 checkpoint {path} has {name}={value!r}; the model has "
                             f"{name}={getattr(config, name)!r}")
    w, esm_tokens = _Weights(path), vocabulary(path)
    order = rows(tuple(tokens), esm_tokens)
    e, h, d, m = config.embed_dim, config.num_heads, config.head_dim, config.mlp_dim
    shapes = {"embeddings.word_embeddings.weight": (len(esm_tokens), e), "lm_head.bias": (len(esm_tokens),),
              "lm_head.dense.weight": (e, e), "lm_head.dense.bias": (e,)}
    for name, shape in shapes.items():
        if w.shape(name) != shape:
            raise ValueError(f"{path}: tensor {name} has shape {w.shape(name)}, config.json implies {shape}")
    if w.has("lm_head.decoder.weight") and not np.array_equal(w.read("lm_head.decoder.weight"),
                                                              w.read("embeddings.word_embeddings.weight")):
        raise ValueError(f"{path}: lm_head.decoder.weight differs from the token embedding (an untied head)")

    def vocab_rows(name, fill):
        def read():
            array = w.read(name)[order]
            pad = np.full((config.vocab_size - len(order),) + array.shape[1:], fill, np.float32)
            return np.concatenate([array, pad])
        return read

    def linear(name, to_shape, transpose=True):
        """A torch Linear's weight [out, in] (transposed) or bias, reshaped to ``to_shape``."""
        def read():
            array = w.read(name)
            array = array.T if transpose else array
            if array.size != int(np.prod(to_shape)):
                raise ValueError(f"{path}: tensor {name} has shape {array.shape}, the model needs {to_shape}")
            return array.reshape(to_shape)
        w.shape(name)  # a missing tensor is refused before anything is read
        return read

    def norm(prefix):
        return {ours: linear(w.norm_name(prefix, ours), (e,), transpose=False) for ours in _NORM}

    def layer(i):
        at = f"encoder.layer.{i}"
        proj = {n: {"kernel": linear(f"{at}.attention.self.{n}.weight", (e, h, d)),
                    "bias": linear(f"{at}.attention.self.{n}.bias", (h, d), transpose=False)}
                for n in ("query", "key", "value")}
        proj["out"] = {"kernel": linear(f"{at}.attention.output.dense.weight", (h, d, e)),
                       "bias": linear(f"{at}.attention.output.dense.bias", (e,), transpose=False)}
        return {"attn": proj, "attn_norm": norm(f"{at}.attention.LayerNorm"), "mlp_norm": norm(f"{at}.LayerNorm"),
                "mlp": {"wi": {"kernel": linear(f"{at}.intermediate.dense.weight", (e, m)),
                               "bias": linear(f"{at}.intermediate.dense.bias", (m,), transpose=False)},
                        "wo": {"kernel": linear(f"{at}.output.dense.weight", (m, e)),
                               "bias": linear(f"{at}.output.dense.bias", (e,), transpose=False)}}}

    per_layer = [layer(i) for i in range(config.num_layers)]
    if w.has(f"encoder.layer.{config.num_layers}.output.dense.weight"):
        raise ValueError(f"{path}: holds more layers than config.json's num_hidden_layers={config.num_layers}")
    if config.scan_layers:  # one array per role, layers stacked on a leading axis
        treedef = jax.tree.structure(per_layer[0], is_leaf=callable)
        columns = zip(*(jax.tree.leaves(t, is_leaf=callable) for t in per_layer))
        stacked = [lambda fns=fns: np.stack([fn() for fn in fns]) for fns in columns]
        layers = jax.tree.unflatten(treedef, stacked)
    else:
        layers = dict(enumerate(per_layer))
    return {"embed": vocab_rows("embeddings.word_embeddings.weight", 0.0),
            "layers": layers,
            "final_norm": norm("encoder.emb_layer_norm_after"),
            "esm_head": {"dense": {"kernel": linear("lm_head.dense.weight", (e, e)),
                                   "bias": linear("lm_head.dense.bias", (e,), transpose=False)},
                         "norm": norm("lm_head.layer_norm"),
                         "bias": vocab_rows("lm_head.bias", PAD_LOGIT)}}
