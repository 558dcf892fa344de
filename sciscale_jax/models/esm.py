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
import jax.numpy as jnp
import numpy as np

from sciscale_jax.models.transformer import attention_maps

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


def read_config(path) -> dict:
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
    config = read_config(path)
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


# --- the contact head ----------------------------------------------------------------------------------------


def contact_head(path, config) -> tuple[np.ndarray, float] | None:
    """ESM-2's contact regression of checkpoint ``path`` (``contact_head.regression``: one weight
    per layer and head, layer-major, and a bias) as (weight [layers, heads], bias), or None where
    the checkpoint holds none or one of another model's depth and heads."""
    w = _Weights(path)
    if not (w.has("contact_head.regression.weight") and w.has("contact_head.regression.bias")):
        return None
    weight = w.read("contact_head.regression.weight")
    if weight.size != config.num_layers * config.num_heads:
        return None
    return weight.reshape(config.num_layers, config.num_heads), float(w.read("contact_head.regression.bias")[0])


def contacts(model, tokens_bs, mask_bs, head, *, eos_id: int):
    """ESM-2's contact probabilities [batch, seq, seq] (Rao et al. 2021, as ``EsmForMaskedLM.predict_contacts``
    computes them): each layer's and head's attention map over the residues (the first token,
    ``eos_id`` and padding left out), symmetrised, average-product corrected, weighted by the
    contact regression ``head`` (``contact_head``) and passed through a sigmoid. Rows and columns
    of the positions left out are meaningless; a protein's map is ``[1:n + 1, 1:n + 1]``. Each
    layer's maps are reduced before the next layer's are formed."""
    weight, bias = head
    seq = tokens_bs.shape[1]
    keep_bs = mask_bs.astype(bool) & (jnp.arange(seq) > 0)[None] & (tokens_bs != eos_id)
    both_b1qk = (keep_bs[:, :, None] & keep_bs[:, None, :])[:, None].astype(jnp.float32)

    def each(layer, probs_bhqk):
        a = probs_bhqk * both_b1qk
        a = a + jnp.swapaxes(a, -1, -2)
        a = a - a.sum(-1, keepdims=True) * a.sum(-2, keepdims=True) / a.sum((-1, -2), keepdims=True)
        return jnp.einsum("bhqk,h->bqk", a, jnp.asarray(weight[layer], jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)

    return jax.nn.sigmoid(sum(attention_maps(model, tokens_bs, mask_bs=mask_bs, each=each)) + bias)


# --- writing Hugging Face's layout ---------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"   # PEFT's names for a LoRA adapter saved alone
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_HF_NAMES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "out": "attention.output.dense", "wi": "intermediate.dense", "wo": "output.dense"}
_PART = {"query": "attn", "key": "attn", "value": "attn", "out": "attn", "wi": "mlp", "wo": "mlp"}


def check_exportable(config, tokens) -> None:
    """ValueError in one line naming the first setting of ``config`` (a ``TransformerConfig``) that
    Hugging Face's ``EsmForMaskedLM`` cannot compute, for a tokenizer of ``tokens`` (by id)."""
    mask = tokens.index("<mask>") if "<mask>" in tokens else -1
    refusals = [
        (config.norm != "layer", f"norm={config.norm!r} (ESM-2: 'layer')"),
        (not config.bias, "bias=False (ESM-2's projections have biases)"),
        (config.mlp != "gelu_exact", f"mlp={config.mlp!r} (ESM-2: 'gelu_exact')"),
        (config.head != "esm", f"head={config.head!r} (ESM-2: 'esm')"),
        (config.causal, "causal=True (ESM-2 is a bidirectional encoder)"),
        (config.attention in ("linformer", "performer"), f"attention={config.attention!r} approximates ESM-2's "
         "exact attention (retrain or fine-tune with an exact one)"),
        (getattr(config, "quant", "none") != "none", f"quant={config.quant!r}: the model computes with "
         "quantised weights and activations that EsmForMaskedLM does not"),
        (config.token_dropout_id not in (-1, mask), f"token_dropout_id={config.token_dropout_id} is not the mask "
         f"token's id {mask}"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"not exportable as an ESM-2 checkpoint: {why}")
    missing = [t for t in tokens if t not in ESM2_ALPHABET]
    if missing:
        raise ValueError(f"not exportable as an ESM-2 checkpoint: tokens {missing} are not in ESM-2's alphabet")


def hf_config(config, template: dict | None = None, *, dtype: str = "float32",
              esm_tokens=ESM2_ALPHABET) -> dict:
    """``config.json`` of an ``EsmForMaskedLM`` computing ``config``: ``template`` (the ESM-2
    checkpoint the run started from) with the model's shape, or ESM-2's settings."""
    out = {k: v for k, v in (template or {}).items() if k != "transformers_version"}
    out.update({
        "architectures": ["EsmForMaskedLM"], "model_type": "esm", "vocab_size": len(esm_tokens),
        "hidden_size": config.embed_dim, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "intermediate_size": config.mlp_dim,
        "position_embedding_type": "rotary", "rope_theta": float(config.rope_base),
        "layer_norm_eps": 1e-5, "emb_layer_norm_before": False, "is_folding_model": False,
        "tie_word_embeddings": True, "token_dropout": config.token_dropout_id >= 0,
        "mask_token_id": esm_tokens.index("<mask>"), "pad_token_id": esm_tokens.index("<pad>"),
        "hidden_dropout_prob": out.get("hidden_dropout_prob", 0.0),
        "attention_probs_dropout_prob": out.get("attention_probs_dropout_prob", 0.0),
        "max_position_embeddings": max(int(out.get("max_position_embeddings", 1026)), config.max_len + 2),
        "dtype": dtype})
    out.pop("torch_dtype", None)  # the older name of "dtype"
    return out


def _layers(params, config) -> list[dict]:
    """Per-layer parameter dicts, from a list/dict of layers or stacked arrays."""
    layers = params["layers"]
    if config.scan_layers:
        return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], layers) for i in range(config.num_layers)]
    return [layers[i] if i in layers else layers[str(i)] for i in range(config.num_layers)]


def tensors(params, config, tokens, *, esm_tokens=ESM2_ALPHABET, extra=None) -> dict:
    """The inverse of :func:`params`: ``EsmForMaskedLM``'s tensors (names as its ``state_dict``,
    float32 numpy) of a model without LoRA adapters (``params`` as ``nnx.to_pure_dict`` gives
    them, per-layer or stacked). Vocabulary rows go back to ESM's order; ESM tokens the model has
    no row for get a zero embedding and an output bias of ``PAD_LOGIT``. ``extra``: tensors carried
    over unchanged (the contact head of the checkpoint the run started from)."""
    check_exportable(config, tuple(tokens))
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    order = rows(tuple(tokens), esm_tokens)
    have = {j: k for k, j in enumerate(order) if k < config.vocab_size}  # ESM row -> the model's row

    def vocab(array, fill):
        array = f32(array)
        out = np.full((len(esm_tokens),) + array.shape[1:], fill, np.float32)
        for j, k in have.items():
            out[j] = array[k]
        return out

    def linear(p, n_in):
        k = f32(p["kernel"])
        return {"weight": k.reshape(int(np.prod(k.shape[:n_in])), -1).T.copy(), "bias": f32(p["bias"]).reshape(-1)}

    def norm(p):
        return {"weight": f32(p["scale"]), "bias": f32(p["bias"])}

    out = {"esm.embeddings.word_embeddings.weight": vocab(params["embed"], 0.0)}
    for i, layer in enumerate(_layers(params, config)):
        at = f"esm.encoder.layer.{i}"
        named = {f"{at}.{_HF_NAMES[n]}": linear(layer[_PART[n]][n], 2 if n == "out" else 1) for n in _HF_NAMES}
        named[f"{at}.attention.LayerNorm"] = norm(layer["attn_norm"])
        named[f"{at}.LayerNorm"] = norm(layer["mlp_norm"])
        for module, pair in named.items():
            out.update({f"{module}.{k}": v for k, v in pair.items()})
        d = config.head_dim  # the rotary frequencies, a buffer published ESM-2 checkpoints hold per layer
        out[f"{at}.attention.self.rotary_embeddings.inv_freq"] = (
            1.0 / config.rope_base ** (np.arange(0, d, 2, dtype=np.float32) / d)).astype(np.float32)
    out.update({f"esm.encoder.emb_layer_norm_after.{k}": v for k, v in norm(params["final_norm"]).items()})
    head = params["esm_head"]
    out.update({f"lm_head.dense.{k}": v for k, v in linear(head["dense"], 1).items()})
    out.update({f"lm_head.layer_norm.{k}": v for k, v in norm(head["norm"]).items()})
    out["lm_head.bias"] = vocab(head["bias"], PAD_LOGIT)
    out.update(extra or {})
    return out


def carried(path, config) -> dict:
    """Tensors of the ESM-2 checkpoint ``path`` that the model does not hold but an export keeps:
    the contact head (:func:`contact_head`), where it has one that fits the model."""
    head = contact_head(path, config)
    if head is None:
        return {}
    weight, bias = head
    return {"esm.contact_head.regression.weight": weight.reshape(1, -1),
            "esm.contact_head.regression.bias": np.asarray([bias], np.float32)}


def adapter_tensors(params, config) -> dict:
    """PEFT's tensors of the model's LoRA adapters (``lora_A.weight`` [r, in], ``lora_B.weight``
    [out, r] under ``base_model.model.<module>``), float32 numpy; PEFT's default scaling
    ``lora_alpha / r`` is the model's ``lora_scale``."""
    out = {}
    for i, layer in enumerate(_layers(params, config)):
        for n, hf in _HF_NAMES.items():
            p = layer[_PART[n]][n]
            if "lora_a" not in p:
                continue
            a, b = np.asarray(p["lora_a"], np.float32), np.asarray(p["lora_b"], np.float32)
            at = f"{_PEFT_PREFIX}esm.encoder.layer.{i}.{hf}"
            out[f"{at}.lora_A.weight"] = a.reshape(-1, a.shape[-1]).T.copy()
            out[f"{at}.lora_B.weight"] = b.reshape(b.shape[0], -1).T.copy()
    return out


def adapter_config(config, base: str) -> dict:
    """PEFT's ``adapter_config.json`` of the model's adapters on the ESM-2 checkpoint ``base``."""
    names = [_HF_NAMES[n] for n in ("query", "key", "value", "out")]
    if config.lora_targets == "all":
        names += [_HF_NAMES["wi"], _HF_NAMES["wo"]]
    pattern = r".*encoder\.layer\.\d+\.(" + "|".join(n.replace(".", r"\.") for n in names) + ")"
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base), "r": config.lora_rank,
            "lora_alpha": float(config.lora_alpha), "lora_dropout": 0.0, "target_modules": pattern,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
            "inference_mode": True, "init_lora_weights": True}


def save(folder, tensors_: dict, config: dict, *, weights: str = WEIGHTS, config_name: str = CONFIG,
         vocab=None, dtype: str = "float32") -> list[str]:
    """``tensors_`` as ``folder/weights`` (safetensors, cast to ``dtype``) with ``config`` as JSON (and
    ``vocab.txt`` if given), written into ``folder.partial`` and renamed, so a kill leaves no half
    folder; ``folder`` must not exist. Returns the names written."""
    import ml_dtypes
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder).expanduser()
    if folder.exists():
        raise ValueError(f"{folder} exists; remove it or name another folder")
    cast = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():  # a killed earlier export's
        import shutil
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v.astype(cast)) for k, v in tensors_.items()}, str(partial / weights),
              metadata={"format": "pt"})
    (partial / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    names = [config_name, weights]
    if vocab is not None:
        (partial / "vocab.txt").write_text("\n".join(vocab) + "\n")
        names.append("vocab.txt")
    partial.rename(folder)
    return names
