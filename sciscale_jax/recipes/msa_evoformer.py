"""msa-evoformer: AlphaFold 2's Evoformer trained with AlphaFold's masked-MSA objective on real alignments.

Data (``sciscale_jax.data.msa``): the alignments shipped in pyhmmer and pyfamsa, with whole
families held out for validation (the adenovirus fiber family by default), or your alignments
(``--alignments``: Stockholm, aligned FASTA or A3M files and folders of them, one family per
file, held out by ``--held-out`` or by a hash of the family names; a run records each file's
SHA-256). Your alignments are packed once into a cache folder and each one is read from there
when an example draws it, so collections larger than memory (OpenProteinSet) train. Each step
draws query-centred crops of ``seq_len`` residues and ``num_seq`` rows and corrupts 15% of the
MSA positions as AlphaFold does (70% mask token, 10% uniform, 10% profile, 10% kept); the loss
is the cross-entropy of AlphaFold's masked-MSA head on every selected position.

The model sees the corrupted MSA (one-hot, 23 classes) and, as ``target_feat``, the corrupted
query row (row 0 of the MSA, so the true query residue is never visible where it is masked).
Validation scores the positions replaced by the mask token (the others show their residue or
a decoy), next to the baseline: the column profile of the rows that are not masked. A model
below the profile's loss uses more than conservation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sciscale_jax.axes import BATCH, MSA_SEQ, RES
from sciscale_jax.data import files
from sciscale_jax.data import msa as msa_data
from sciscale_jax.models.evoformer import Evoformer, EvoformerConfig
from sciscale_jax.parallel import PipelineStages
from sciscale_jax.recipes.base import Data, Recipe

HELD_OUT = ("adeno_fiber",)


@dataclasses.dataclass(frozen=True)
class MsaEvoformerConfig(EvoformerConfig):
    """An Evoformer sized for the masked-MSA task; the MSA rows each step draws are ``num_seq``."""

    num_seq: int = dataclasses.field(default=16, metadata={"help": "MSA rows per example (row 0: the query)"})
    alignments: str = dataclasses.field(default="", metadata={
        "group": "data", "help": "your alignments: Stockholm, aligned FASTA or A3M files (.gz read too) or folders "
        "of them, comma-separated, one family per file, row 0 the query; '': the five shipped in pyhmmer/pyfamsa"})
    held_out: str = dataclasses.field(default="", metadata={
        "group": "data", "help": "families (file names up to the first '.') held out for validation, "
        "comma-separated; '': adeno_fiber for the shipped alignments, else about a tenth of the families by a "
        "hash of their names (at least one)"})

    def __post_init__(self):
        for name in ("alignments", "held_out"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a comma-separated string")
        super().__post_init__()


class MsaEvoformer(nnx.Module):
    """Corrupted MSA tokens [B, S, R] -> masked-MSA logits [B, S, R, 23]."""

    def __init__(self, config: MsaEvoformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.evoformer = Evoformer(config, rngs=rngs)

    def __call__(self, batch, key=None):
        cfg = self.config
        msa = batch["msa"]
        msa_feat = jax.nn.one_hot(msa, msa_data.NUM_CLASSES, dtype=cfg.dtype)
        target_feat = msa_feat[:, 0]
        out = self.evoformer(target_feat, msa_feat, batch["residue_index"], batch["msa_mask"], batch["seq_mask"],
                             key=key)
        return out["masked_msa_logits"]


def _token_nll(logits, target):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), target)


def loss_fn(model, batch, key):
    """AlphaFold's masked-MSA loss: cross-entropy on every selected position."""
    nll = _token_nll(model(batch, key), batch["target"])
    w = batch["bert_mask"] * batch["msa_mask"]
    return jnp.sum(nll * w), jnp.sum(w)


def eval_fn(model, batch):
    """Loss, accuracy and the profile baseline on the positions replaced by the mask token."""
    logits = model(batch)
    nll = _token_nll(logits, batch["target"])
    w = batch["mask_token"] * batch["msa_mask"]
    n = jnp.sum(w)
    correct = (jnp.argmax(logits, -1) == batch["target"]).astype(jnp.float32)
    all_w = batch["bert_mask"] * batch["msa_mask"]
    return {"loss": (jnp.sum(nll * w), n), "acc": (jnp.sum(correct * w), n),
            "profile_loss": (-jnp.sum(batch["profile_logp"] * w), n),
            "loss_all_selected": (jnp.sum(nll * all_w), jnp.sum(all_w))}


def _pipeline_embed(model, batch):
    """The input embedder of ``MsaEvoformer.__call__``: (m [B, S, R, c_m], z [B, R, R, c_z])."""
    msa_feat = jax.nn.one_hot(batch["msa"], msa_data.NUM_CLASSES, dtype=model.config.dtype)
    return model.evoformer.embedder(msa_feat[:, 0], msa_feat, batch["residue_index"])


def _pipeline_block_args(batch):
    seq_mask = batch["seq_mask"]
    return batch["msa_mask"], seq_mask[:, :, None] * seq_mask[:, None, :]


def _pipeline_head(model, mz, batch):
    nll = _token_nll(model.evoformer.masked_msa_head(mz[0]), batch["target"])
    return jnp.sum(nll * batch["bert_mask"] * batch["msa_mask"])


def _pipeline_count(batch):
    return jnp.sum(batch["bert_mask"] * batch["msa_mask"])


# The Evoformer stack as pipeline stages: embedder first, masked-MSA head and loss last.
PIPELINE = PipelineStages(embed_fn=_pipeline_embed, block_args_fn=_pipeline_block_args, head_fn=_pipeline_head,
                          count_fn=_pipeline_count, layers=("evoformer", "evoformer_stack", "blocks"),
                          apply_block=lambda block, mz, *args: block(*mz, *args))


def summarize(means: dict) -> dict:
    out = {}
    if "loss" in means:
        out["ppl"] = math.exp(means["loss"])
    if "loss" in means and "profile_loss" in means:
        out["gain_over_profile"] = means["profile_loss"] - means["loss"]
    return out


def _profile_accuracy(batches) -> float:
    """Accuracy of the profile's most frequent class at the mask-token positions."""
    hit = total = 0.0
    for b in batches:
        for i in range(b["msa"].shape[0]):
            rows = b["msa_mask"][i, :, 0] > 0
            cols = b["seq_mask"][i] > 0
            true = b["target"][i][np.ix_(rows, cols)]
            sel = b["bert_mask"][i][np.ix_(rows, cols)] > 0
            prof = msa_data.column_profile(true, (~sel).astype(np.float64))
            w = b["mask_token"][i][np.ix_(rows, cols)]
            hit += float(((prof.argmax(1)[None, :] == true) * w).sum())
            total += float(w.sum())
    return hit / max(total, 1.0)


def read_families(model_cfg) -> tuple[dict, tuple, dict]:
    """(alignments by family, the held-out families, ``{path: sha256}`` of the user's files read)."""
    named = tuple(n.strip() for n in model_cfg.held_out.split(",") if n.strip())
    if model_cfg.alignments:
        paths = files.expand(model_cfg.alignments, msa_data.ALIGNMENT_SUFFIXES, "--alignments")
        alignments, sources = msa_data.packed_alignments(paths)  # packed once, read when drawn
        held = named or msa_data.pick_held_out(alignments)
    else:
        alignments, sources, held = msa_data.load_alignments(), {}, named or HELD_OUT
    if set(held) >= set(alignments):
        raise ValueError(f"--held-out {','.join(held)} leaves no family to train on")
    return alignments, held, sources


def _names(families, shown: int = 10) -> str:
    names = sorted(families)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def build_data(train_cfg, model_cfg) -> Data:
    alignments, held_out, sources = read_families(model_cfg)
    train_al, held = msa_data.split_families(alignments, held_out)
    kw = dict(batch_size=train_cfg.batch_size, num_seq=model_cfg.num_seq, num_res=train_cfg.seq_len)
    train = msa_data.MSABatches(train_al, seed=train_cfg.seed, **kw)
    evals = msa_data.MSABatches(held, seed=train_cfg.seed, **kw).eval_batches(max(1, 256 // train_cfg.batch_size))
    n = sum(float((b["mask_token"] * b["msa_mask"]).sum()) for b in evals)
    profile = -sum(float((b["profile_logp"] * b["mask_token"] * b["msa_mask"]).sum()) for b in evals) / n
    summary = ""
    if sources:
        summary = (f"data: {len(alignments)} alignment families from --alignments; training on "
                   f"{_names(train_al)}; held out {_names(held)}; packed in {alignments.path.parent}")
    return Data(train=train, eval=evals, vocab_size=msa_data.NUM_CLASSES,
                baselines={"profile_loss": profile, "profile_acc": _profile_accuracy(evals),
                           "masked_positions": n}, sources=sources, summary=summary)


def check(model_cfg, train_cfg, data) -> None:
    if model_cfg.msa_classes != msa_data.NUM_CLASSES:
        raise ValueError(f"msa_classes={model_cfg.msa_classes} must be {msa_data.NUM_CLASSES} (AlphaFold's MSA tokens)")


def embed(model_cfg, model, path, batch_size: int = 16) -> dict:
    """The trained trunk's representations of the alignment in ``path`` (Stockholm, A3M or aligned
    FASTA; row 0 is the query), what AlphaFold-style models hand on to structure and contact
    heads. The query's columns are kept (a column where the query has a gap is dropped, as in a
    query-centred A3M) and the query with the next ``num_seq - 1`` rows (search tools list hits
    best first) is run uncorrupted through the embedder and the Evoformer stack. Returns
    ``query`` (the query's residues, a string of length L), ``single`` [L, c_m] (the query row of
    the final MSA representation, which AlphaFold's structure module reads), ``pair`` [L, L, c_z]
    and ``rows`` (the alignment rows used). One alignment per file, so ``batch_size`` is unused.
    One-line ValueError for a file that is not an alignment or a query without residues."""
    del batch_size
    a = msa_data.read_alignment(path)
    cols = np.flatnonzero(a[0] != msa_data.GAP_ID)
    if not len(cols):
        raise ValueError(f"{path}: the query (row 0) has no residues, only gaps")
    msa = a[:model_cfg.num_seq, cols].astype(np.int32)[None]  # [1, S, L]
    s, r = msa.shape[1:]
    graphdef, state = nnx.split(model)

    def run(state, msa):
        trunk = nnx.merge(graphdef, state).evoformer
        feat = jax.nn.one_hot(msa, msa_data.NUM_CLASSES, dtype=model_cfg.dtype)
        out = trunk(feat[:, 0], feat, jnp.arange(r, dtype=jnp.int32)[None], jnp.ones((1, s, r), jnp.float32),
                    jnp.ones((1, r), jnp.float32))
        return out["msa"][0, 0].astype(jnp.float32), out["pair"][0].astype(jnp.float32)

    single, pair = jax.jit(run)(state, msa)
    letters = np.array(list(msa_data.AMINO + "X-"))
    return {"query": np.asarray("".join(letters[msa[0, 0]])), "single": np.asarray(single), "pair": np.asarray(pair),
            "rows": np.arange(s)}


RECIPE = Recipe(
    name="msa-evoformer",
    description="AlphaFold 2 Evoformer, masked-MSA objective on alignments shipped in pyhmmer/pyfamsa, or yours",
    config_class=MsaEvoformerConfig,
    build_model=lambda config, rngs: MsaEvoformer(config, rngs=rngs),
    build_data=build_data,
    loss_fn=loss_fn,
    eval_fn=eval_fn,
    summarize=summarize,
    check=check,
    pipeline=PIPELINE,
    embed=embed,
    batch_axes={"msa": (BATCH, MSA_SEQ, RES), "target": (BATCH, MSA_SEQ, RES), "bert_mask": (BATCH, MSA_SEQ, RES),
                "mask_token": (BATCH, MSA_SEQ, RES), "profile_logp": (BATCH, MSA_SEQ, RES),
                "msa_mask": (BATCH, MSA_SEQ, RES), "seq_mask": (BATCH, RES), "residue_index": (BATCH, RES)},
    model_defaults=dict(c_m=32, c_z=16, msa_heads=4, msa_head_dim=8, pair_heads=2, pair_head_dim=8,
                        opm_channels=8, tri_mul_channels=16, num_blocks=2, target_feat_dim=msa_data.NUM_CLASSES,
                        msa_feat_dim=msa_data.NUM_CLASSES, num_seq=16),
    train_defaults=dict(steps=500, batch_size=4, seq_len=48, learning_rate=3e-3, warmup_steps=50,
                        eval_every=250, save_every=250),
)
