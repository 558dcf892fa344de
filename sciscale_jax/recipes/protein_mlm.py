"""protein-mlm: an ESM-style masked language model on real bacterial proteins, or on yours.

Data: the 2,100 proteins of one genome shipped in pyhmmer (``sciscale_jax.data.protein``), or
the proteins of your FASTA files (``--data``: comma-separated files and folders, plain or
gzip-compressed; symbols outside the residue alphabet read as X), split by sequence hash into
train and validation (``--val-fraction``; identical sequences never straddle the split). Your
files are packed once into one byte per residue in a cache folder (``sciscale_jax.data.packed``)
and each protein a batch draws is read from there, so a corpus larger than memory (UniRef50)
trains in flat host memory; at most ``--val-sequences`` held-out proteins are scored. A run
records the SHA-256 of every file it read, so resuming or evaluating it on changed files is
refused. Training counts every chosen position (BERT's objective); evaluation scores the
positions replaced by the mask token, where the residue is hidden and only context can beat
the residue frequencies, and reports kept and randomised positions apart (there the visible
token gives most of the answer away).

Baselines, on the same positions: the unigram of the training split's residues, and the
context-free table P(target | input token) counted on training batches. A model below the
context-free baseline on masked positions has learned context. Validation uses at least
``EVAL_MIN_MASKED`` mask-replaced targets over several fixed corruptions of the held-out
proteins. Defaults finish on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sciscale_jax import attention
from sciscale_jax.data import ProteinTokenizer, files, packed, pyhmmer_protein_file
from sciscale_jax.data.protein import read_fasta
from sciscale_jax.data.mlm import (CORRUPTIONS, MLMBatches, context_free_log_probs, residue_log_probs, table_accuracy,
                                   table_nll)
from sciscale_jax.losses import mlm_loss
from sciscale_jax.models import Transformer, TransformerConfig, esm, hidden_states
from sciscale_jax.models.transformer import per_sequence
from sciscale_jax.models.stack import merge_lora
from sciscale_jax.recipes.base import Data, Recipe
from sciscale_jax.recipes.transformer_stages import MLM

EVAL_MIN_MASKED = 20_000     # mask-replaced validation targets, over as many corruption passes as needed
TABLE_MIN_CHOSEN = 100_000   # chosen training positions counted into the context-free table
TABLE_MAX_BATCHES = 2_000    # ... unless that takes more training batches (tiny test runs)
EVAL_MIN_TOKENS = 2048       # tokens per evaluation batch (rows are a multiple of batch_size)
FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fasta.gz", ".fa.gz", ".faa.gz", ".fas.gz")


@dataclasses.dataclass(frozen=True)
class ProteinMLMConfig(TransformerConfig):
    """The Transformer plus where this recipe's proteins come from."""

    data: str = dataclasses.field(default="", metadata={
        "group": "data", "help": "FASTA files or folders of them, comma-separated (.gz read too); "
        "'': the 2,100 proteins shipped in pyhmmer"})
    val_fraction: float = dataclasses.field(default=0.1, metadata={
        "group": "data", "help": "share of distinct sequences held out (by hash)"})
    val_sequences: int = dataclasses.field(default=10_000, metadata={
        "group": "data", "help": "held-out proteins scored at most (evenly spaced through the held-out split)"})
    pack: bool = dataclasses.field(default=False, metadata={
        "group": "data", "help": "pack training rows: whole proteins follow one another in a row, each "
        "attending only to itself with its own positions, instead of one cropped protein and padding "
        "(validation stays one protein per row)"})

    def __post_init__(self):
        if not isinstance(self.data, str):
            raise ValueError(f"data={self.data!r} must be a string of comma-separated paths")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction < 1.0):
            raise ValueError(f"val_fraction={self.val_fraction!r} must lie in (0, 1)")
        if not isinstance(self.val_sequences, int) or isinstance(self.val_sequences, bool) or self.val_sequences < 1:
            raise ValueError(f"val_sequences={self.val_sequences!r} must be a positive integer")
        if not isinstance(self.pack, bool):
            raise ValueError(f"pack={self.pack!r} must be a bool")
        if self.pack and self.attention in attention.MODULE_IMPLS:
            raise ValueError(f"pack=True keeps each packed protein to itself, which attention={self.attention!r} "
                             f"(it mixes every position of a row) cannot; use exact attention or no --pack")
        super().__post_init__()


def read_pack(model_cfg=None) -> tuple[packed.Pack, dict[str, str]]:
    """The packed proteins a run trains and validates on, and ``{path: sha256}`` of the user's files
    (empty for the shipped corpus, packed in memory). ``model_cfg`` may be any config (a plain
    ``TransformerConfig`` or None: the shipped corpus)."""
    tok = ProteinTokenizer(unknown="x")
    spec = getattr(model_cfg, "data", "")
    if not spec:
        return packed.pack_fasta([pyhmmer_protein_file()], tok), {}
    return packed.packed_proteins(files.expand(spec, FASTA_SUFFIXES, "--data"), tok)


def _token_nll_and_hits(model, batch):
    """Per-position float32 cross-entropy and top-1 hits, no dropout."""
    logits_bsv = model(batch["inputs"], mask_bs=batch["mask"], dropout_key=None).astype(jnp.float32)
    nll_bs = optax.softmax_cross_entropy_with_integer_labels(logits_bsv, batch["targets"])
    hit_bs = (jnp.argmax(logits_bsv, axis=-1) == batch["targets"]).astype(jnp.float32)
    return nll_bs, hit_bs


def mlm_eval_metrics(model, batch) -> dict:
    """name -> (sum, count) for one batch; the loop sums each over batches and reports sum / count.

    ``loss`` and ``accuracy`` score mask-replaced positions; ``*_kept`` and ``*_random`` the
    positions left unchanged or randomised; ``loss_selected`` all chosen positions (the
    training objective).
    """
    nll_bs, hit_bs = _token_nll_and_hits(model, batch)
    out = {}
    for kind, code in CORRUPTIONS.items():
        w_bs = (batch["corruption"] == code).astype(jnp.float32)
        suffix = "" if kind == "masked" else f"_{kind}"
        n = jnp.sum(w_bs)
        out[f"loss{suffix}"] = (jnp.sum(nll_bs * w_bs), n)
        out[f"accuracy{suffix}"] = (jnp.sum(hit_bs * w_bs), n)
    w_bs = batch["weights"].astype(jnp.float32)
    out["loss_selected"] = (jnp.sum(nll_bs * w_bs), jnp.sum(w_bs))
    return out


def summarize(means: dict) -> dict:
    """Derived figures from the metric means: perplexities exp(loss)."""
    return {name.replace("loss", "ppl", 1): math.exp(v) for name, v in means.items()
            if name.startswith("loss") and math.isfinite(v)}


def evaluate_metrics(graphdef, params, rest, batches, eval_fn=mlm_eval_metrics) -> dict:
    """Means over ``batches`` of ``eval_fn``'s (sum, count) pairs, plus ``summarize``'s figures."""
    step = jax.jit(lambda p, r, b: eval_fn(nnx.merge(graphdef, p, r), b))
    sums: dict = {}
    for batch in batches:
        for name, (s, n) in jax.device_get(step(params, rest, batch)).items():
            old = sums.get(name, (0.0, 0.0))
            sums[name] = (old[0] + float(s), old[1] + float(n))
    means = {name: s / n if n else float("nan") for name, (s, n) in sums.items()}
    return {**means, **summarize(means)}


def baselines(train: MLMBatches, evals: list, train_counts, tok) -> dict:
    """Unigram (of ``train_counts``, the training split's [V] token counts) and context-free figures
    on the metrics' position sets, named as the metrics are."""
    per_batch = max(1.0, train.mask_prob * train.batch_size * (train.seq_len - 2))
    n_batches = min(math.ceil(TABLE_MIN_CHOSEN / per_batch), TABLE_MAX_BATCHES)
    # Steps far past any run's end: counted on training proteins, never on a batch the model trains on.
    table = context_free_log_probs((train.batch(10**9 + i) for i in range(n_batches)), tok)
    unigram = residue_log_probs(train_counts, tok)
    out = {}
    for name, lp in (("unigram", unigram), ("context_free", table)):
        for positions in ("masked", "kept", "random"):
            suffix = "" if positions == "masked" else f"_{positions}"
            total, count = table_nll(lp, evals, positions)
            out[f"{name}_loss{suffix}"] = total / max(count, 1.0)
            out[f"{name}_accuracy{suffix}"] = table_accuracy(lp, evals, positions)
        out[f"{name}_ppl"] = math.exp(out[f"{name}_loss"])
    for name in ("unigram_accuracy_kept", "unigram_accuracy_random"):
        del out[name]
    return out


def build_data(train_cfg, model_cfg=None) -> Data:
    tok = ProteinTokenizer(unknown="x")
    pack, sources = read_pack(model_cfg)
    val_fraction = getattr(model_cfg, "val_fraction", 0.1)
    train_ids, val_ids = pack.split(val_fraction)
    if not len(train_ids) or not len(val_ids):
        raise ValueError(f"{len(pack)} protein(s) split into {len(train_ids)} for training and "
                         f"{len(val_ids)} for validation: give more sequences or another --val-fraction")
    held_out, cap = len(val_ids), getattr(model_cfg, "val_sequences", 10_000)
    if held_out > cap:  # evenly spaced through the held-out split, the same every run
        val_ids = packed.Proteins(pack, val_ids.index[np.linspace(0, held_out - 1, cap).round().astype(np.int64)])
    kw = dict(batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len, seed=train_cfg.seed)
    train = MLMBatches(train_ids, tok, pack=getattr(model_cfg, "pack", False), **kw)
    rows = train_cfg.batch_size * max(1, EVAL_MIN_TOKENS // (train_cfg.batch_size * train_cfg.seq_len))
    evals = MLMBatches(val_ids, tok, **kw).eval_batches(min_masked=EVAL_MIN_MASKED, rows=rows)
    summary = ""
    if sources:
        summary = (f"data: {len(pack)} proteins from {len(sources)} file(s) of --data: {len(train_ids)} for "
                   f"training, {held_out} held out" + (f" ({cap} of them scored)" if held_out > cap else "")
                   + f"; packed in {pack.folder}")
    return Data(train=train, eval=evals, vocab_size=tok.vocab_size, train_only=("segments",) if train.pack else (),
                baselines=baselines(train, evals, pack.token_counts(val_fraction), tok), sources=sources,
                summary=summary)


def check(model_cfg, train_cfg, data) -> None:  # seq_len vs max_len: train.validate.check_run
    if model_cfg.vocab_size < data.vocab_size:
        raise ValueError(f"model vocab_size={model_cfg.vocab_size} is smaller than the data's {data.vocab_size}")


def embed(model_cfg, model, path, batch_size: int = 16, *, contacts: bool = False, base: str | None = None) -> dict:
    """Per-residue and mean embeddings of the proteins in FASTA file ``path``, as ESM's are used:
    the final hidden states (``Transformer.hidden``) of ``cls`` + residues + ``eos``, with the two
    special tokens dropped. Returns ``names`` [N], ``mean`` [N, embed] (over each protein's
    residues), ``per_residue`` [sum of lengths, embed] and ``offsets`` [N + 1] (protein i's rows
    are ``per_residue[offsets[i]:offsets[i + 1]]``). With ``contacts``, also ESM-2's contact
    probabilities of each protein (``models.esm.contacts``, with the contact head of ESM-2
    checkpoint ``base``, the one the run started from): ``contacts`` [sum of squared lengths],
    protein i's n x n map ``contacts[contact_offsets[i]:contact_offsets[i + 1]].reshape(n, n)``.
    One-line ValueError for an empty file, an unknown residue or a protein longer than the model
    takes, naming the record, and for ``contacts`` without a contact head."""
    head = None
    if contacts:
        head = esm.contact_head(base, model_cfg) if base else None
        if head is None:
            where = (f"the ESM-2 checkpoint {base} holds none for {model_cfg.num_layers} layers x "
                     f"{model_cfg.num_heads} heads" if base else "the run did not start from an ESM-2 checkpoint")
            raise ValueError(f"--contacts needs ESM-2's contact head (a regression on every layer's attention "
                             f"maps), and {where}")
    records = [(name, seq.upper()) for name, seq in read_fasta(path) if seq]
    if not records:
        raise ValueError(f"{path} holds no protein sequences (empty, or FASTA headers without sequences)")
    tok, ids = ProteinTokenizer(), []
    for name, seq in records:
        try:
            ids.append(tok.encode(seq, add_special=True))
        except ValueError as err:
            raise ValueError(f"{path}, record {name!r}: {err}") from None
        if len(ids[-1]) > model_cfg.max_len:
            raise ValueError(f"{path}, record {name!r}: {len(seq)} residues + cls/eos exceed the model's "
                             f"max_len={model_cfg.max_len}")
    residues = [h[1:-1] for h in hidden_states(model, ids, batch_size=batch_size, pad_id=tok.pad_id)]
    out = {"names": np.asarray([name for name, _ in records]),
           "mean": np.stack([r.mean(axis=0) for r in residues]),
           "per_residue": np.concatenate(residues),
           "offsets": np.cumsum([0] + [len(r) for r in residues])}
    if head is not None:
        maps = per_sequence(model, ids, lambda m, t, k: esm.contacts(m, t, k, head, eos_id=tok.eos_id),
                            lambda c, n: c[1:n - 1, 1:n - 1].ravel(), batch_size=batch_size, pad_id=tok.pad_id)
        out["contacts"] = np.concatenate(maps)
        out["contact_offsets"] = np.cumsum([0] + [len(m) for m in maps])
    return out


def init_settings(path) -> dict | None:
    """The model fields an ESM-2 checkpoint (Hugging Face's layout) fixes; None for another path."""
    return esm.settings(path, ProteinTokenizer().tokens) if esm.is_checkpoint(path) else None


def init_params(model_cfg, path) -> dict:
    """ESM-2's parameters, vocabulary rows in this recipe's token order (``models.esm.params``)."""
    return esm.params(path, model_cfg, ProteinTokenizer().tokens)


def export(model_cfg, params, out, *, base: str | None = None, adapters: bool = False,
           dtype: str = "float32") -> list[str]:
    """The trained model as Hugging Face's ``EsmForMaskedLM`` in folder ``out`` (``config.json``,
    ``model.safetensors``, ``vocab.txt``; LoRA adapters folded into their kernels, 4-bit kernels
    dequantised: the weights the model computed with), or with ``adapters`` its LoRA adapters alone
    in PEFT's layout (``adapter_config.json``, ``adapter_model.safetensors``) on ESM-2 checkpoint
    ``base``. ``base`` (the ESM-2 checkpoint the run started from, or None) also gives the config
    and the contact head, which the model does not hold, carried over unchanged."""
    tokens = ProteinTokenizer().tokens
    if adapters:
        if not model_cfg.lora_rank:
            raise ValueError("--adapters: the run has no LoRA adapters (lora_rank=0); export the whole model")
        if model_cfg.lora_train:
            raise ValueError(f"--adapters: lora_train={model_cfg.lora_train!r} trained weights beside the adapters, "
                             "which PEFT's file of the adapters does not hold; export the whole model")
        if base is None:
            raise ValueError("--adapters: the run did not start from an ESM-2 checkpoint (--init-from), so there is "
                             "no base model for the adapters; export the whole model")
        esm.check_exportable(model_cfg, tokens)
        return esm.save(out, esm.adapter_tensors(params, model_cfg), esm.adapter_config(model_cfg, base),
                        weights=esm.ADAPTER_WEIGHTS, config_name=esm.ADAPTER_CONFIG, dtype=dtype)
    if model_cfg.lora_rank:
        params = merge_lora(params, model_cfg.lora_scale)
        model_cfg = dataclasses.replace(model_cfg, lora_rank=0, lora_quant="none", lora_train="")
    esm.check_exportable(model_cfg, tokens)
    template = esm.read_config(base) if base else None
    esm_tokens = esm.vocabulary(base) if base else esm.ESM2_ALPHABET
    extra = esm.carried(base, model_cfg) if base else {}
    return esm.save(out, esm.tensors(params, model_cfg, tokens, esm_tokens=esm_tokens, extra=extra),
                    esm.hf_config(model_cfg, template, dtype=dtype, esm_tokens=esm_tokens), vocab=esm_tokens,
                    dtype=dtype)


RECIPE = Recipe(
    name="protein-mlm",
    description="ESM-style masked LM on the 2,100 bacterial proteins shipped in pyhmmer, or your FASTA files",
    # 29 tokens padded to 32 rows, so the embedding splits over tensor-parallel meshes.
    model_defaults=dict(vocab_size=32, num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, max_len=1024, causal=False),
    train_defaults=dict(steps=300, batch_size=16, seq_len=128, learning_rate=2e-3, warmup_steps=30,
                        eval_every=100, save_every=100),
    config_class=ProteinMLMConfig,
    build_model=lambda config, rngs: Transformer(config, rngs=rngs),
    build_data=build_data,
    loss_fn=mlm_loss,
    eval_fn=mlm_eval_metrics,
    summarize=summarize,
    batch_axes={"*": ("batch", "seq")},
    pipeline=MLM,
    check=check,
    embed=embed,
    embed_options={"contacts": "also ESM-2's contact map of each protein (its contact head on every layer's attention "
                               "maps; the run must start from an ESM-2 checkpoint that has one)"},
    embed_reads_base=True,
    init_settings=init_settings,
    init_params=init_params,
    export=export,
)
