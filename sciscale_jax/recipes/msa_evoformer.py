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
With ``--msa-features alphafold`` it sees AlphaFold 2's own input features instead: ``msa_feat``
(49 channels: the one-hot MSA, deletion flags and values, the cluster profile and mean deletions
of the extra rows nearest each row), ``target_feat`` (22: a chain-break flag and the corrupted
query, the mask token read as X) and, with ``--num-extra-seq E`` and ``--num-extra-blocks``, E
extra rows (25 channels) through the extra-MSA stack, so AlphaFold's published parameters
(``--init-from params_model_1.npz``) start a run, are evaluated or embed alignments.
Validation scores the positions replaced by the mask token (the others show their residue or
a decoy), next to the baseline: the column profile of the rows that are not masked (and of
every extra row with AlphaFold's features: the model sees their profile). A model below the
profile's loss uses more than conservation.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sciscale_jax.axes import BATCH, MSA_SEQ, RES
from sciscale_jax.data import files
from sciscale_jax.data import msa as msa_data
from sciscale_jax.models import evoformer_params
from sciscale_jax.models.evoformer import Evoformer, EvoformerConfig
from sciscale_jax.parallel import PipelineStages
from sciscale_jax.recipes.base import Data, Recipe

HELD_OUT = ("adeno_fiber",)
ALPHAFOLD_EXTRA_SEQ = 1024   # AlphaFold 2 monomer's max_extra_msa
# (target_feat, msa_feat, extra_msa_feat) channels of each input feature set
FEATURE_DIMS = {"onehot": (msa_data.NUM_CLASSES, msa_data.NUM_CLASSES, None), "alphafold": (22, 49, 25)}


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
    msa_features: str = dataclasses.field(default="onehot", metadata={
        "choices": tuple(FEATURE_DIMS), "help": "the model's inputs: onehot (the MSA and query as 23 classes) or "
        "alphafold (AlphaFold 2's features: deletions, cluster profiles, extra rows; what its parameters read)"})
    num_extra_seq: int = dataclasses.field(default=0, metadata={
        "help": "extra MSA rows per example for the extra-MSA stack (--msa-features alphafold, "
        f"--num-extra-blocks > 0); 0: AlphaFold's {ALPHAFOLD_EXTRA_SEQ} where that stack runs"})

    def __post_init__(self):
        for name in ("alignments", "held_out"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a comma-separated string")
        if self.msa_features not in FEATURE_DIMS:
            raise ValueError(f"msa_features={self.msa_features!r} must be one of {', '.join(FEATURE_DIMS)}")
        # the feature widths follow the feature set (either set's widths are accepted: the recipe's defaults)
        for name, want in zip(("target_feat_dim", "msa_feat_dim", "extra_msa_feat_dim"),
                              FEATURE_DIMS[self.msa_features]):
            given = getattr(self, name)
            if want is None:
                continue
            if given not in {dims[i] for dims in FEATURE_DIMS.values() for i in range(3)} - {None}:
                raise ValueError(f"{name}={given!r}: msa_features={self.msa_features!r} makes {want} channels")
            object.__setattr__(self, name, want)
        if not isinstance(self.num_extra_seq, int) or self.num_extra_seq < 0:
            raise ValueError(f"num_extra_seq={self.num_extra_seq!r} must be a non-negative integer")
        if self.num_extra_blocks and self.msa_features != "alphafold":
            raise ValueError(f"num_extra_blocks={self.num_extra_blocks}: the extra-MSA stack reads extra rows, which "
                             "are AlphaFold's features: --msa-features alphafold")
        if self.num_extra_blocks and not self.num_extra_seq:
            object.__setattr__(self, "num_extra_seq", ALPHAFOLD_EXTRA_SEQ)
        if self.num_extra_seq and not self.num_extra_blocks:
            raise ValueError(f"num_extra_seq={self.num_extra_seq}: extra rows are read by the extra-MSA stack; give "
                             "--num-extra-blocks > 0 (AlphaFold runs 4)")
        super().__post_init__()


def _deletion_value(d):
    return jnp.arctan(d / 3.0) * (2.0 / jnp.pi)


def features(cfg, batch) -> dict:
    """The Evoformer's inputs from a batch: ``target_feat``, ``msa_feat`` and, with extra rows,
    ``extra_msa_feat`` and ``extra_msa_mask``. ``onehot``: the MSA's 23 classes, the query row as
    ``target_feat``. ``alphafold``: AlphaFold 2's ``make_msa_feat`` (one-hot MSA, has_deletion,
    deletion_value = 2/pi arctan(d/3), cluster profile, cluster deletion mean's value: 49
    channels), ``target_feat`` [between-segment flag 0, one-hot of the corrupted query over 20
    amino acids and X, the mask token read as X] (22) and the extra rows' one-hot, has_deletion and
    deletion_value (25)."""
    msa = batch["msa"]
    if cfg.msa_features == "onehot":
        msa_feat = jax.nn.one_hot(msa, msa_data.NUM_CLASSES, dtype=cfg.dtype)
        return {"target_feat": msa_feat[:, 0], "msa_feat": msa_feat}
    d, cd = batch["deletion"].astype(jnp.float32), batch["cluster_deletion_mean"].astype(jnp.float32)
    msa_feat = jnp.concatenate([jax.nn.one_hot(msa, msa_data.NUM_CLASSES), jnp.clip(d, 0.0, 1.0)[..., None],
                                _deletion_value(d)[..., None], batch["cluster_profile"].astype(jnp.float32),
                                _deletion_value(cd)[..., None]], axis=-1)
    aatype = jnp.minimum(msa[:, 0], msa_data.UNKNOWN_ID)   # a masked (or gap) query residue is unknown
    target_feat = jnp.concatenate([jnp.zeros(aatype.shape + (1,)), jax.nn.one_hot(aatype, msa_data.GAP_ID)], -1)
    out = {"target_feat": target_feat.astype(cfg.dtype), "msa_feat": msa_feat.astype(cfg.dtype)}
    if cfg.num_extra_blocks:
        e = batch["extra_deletion"].astype(jnp.float32)
        extra = jnp.concatenate([jax.nn.one_hot(batch["extra_msa"], msa_data.NUM_CLASSES),
                                 jnp.clip(e, 0.0, 1.0)[..., None], _deletion_value(e)[..., None]], axis=-1)
        out.update(extra_msa_feat=extra.astype(cfg.dtype), extra_msa_mask=batch["extra_msa_mask"])
    return out


class MsaEvoformer(nnx.Module):
    """Corrupted MSA tokens [B, S, R] (and, with AlphaFold's features, their deletions, cluster
    summaries and extra rows) -> masked-MSA logits [B, S, R, 23]."""

    def __init__(self, config: MsaEvoformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.evoformer = Evoformer(config, rngs=rngs)

    def __call__(self, batch, key=None):
        return self.trunk(batch, key)["masked_msa_logits"]

    def trunk(self, batch, key=None) -> dict:
        """The Evoformer's outputs (``msa``, ``pair``, both heads' logits) for a batch."""
        f = features(self.config, batch)
        return self.evoformer(f["target_feat"], f["msa_feat"], batch["residue_index"], batch["msa_mask"],
                              batch["seq_mask"], extra_msa_feat=f.get("extra_msa_feat"),
                              extra_msa_mask=f.get("extra_msa_mask"), key=key)


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
    out = {"loss": (jnp.sum(nll * w), n), "acc": (jnp.sum(correct * w), n),
           "profile_loss": (-jnp.sum(batch["profile_logp"] * w), n),
           "loss_all_selected": (jnp.sum(nll * all_w), jnp.sum(all_w))}
    if "cluster_logp" in batch:  # AlphaFold's features: the nearest-rows baseline too
        out["cluster_loss"] = (-jnp.sum(batch["cluster_logp"] * w), n)
    return out


def _pipeline_embed(model, batch):
    """The input embedder of ``MsaEvoformer.__call__``: (m [B, S, R, c_m], z [B, R, R, c_z])."""
    f = features(model.config, batch)
    return model.evoformer.embed(f["target_feat"], f["msa_feat"], batch["residue_index"])


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
    if "loss" in means and "cluster_loss" in means:
        out["gain_over_clusters"] = means["cluster_loss"] - means["loss"]
    return out


def read_families(model_cfg) -> tuple[dict, tuple, dict, dict | None]:
    """(alignments by family, the held-out families, ``{path: sha256}`` of the user's files read,
    the insertion counts by family for AlphaFold's features: None where the alignments carry them
    (packed) or the features do not read them)."""
    named = tuple(n.strip() for n in model_cfg.held_out.split(",") if n.strip())
    inserted = None
    if model_cfg.alignments:
        paths = files.expand(model_cfg.alignments, msa_data.ALIGNMENT_SUFFIXES, "--alignments")
        alignments, sources = msa_data.packed_alignments(paths)  # packed once, read when drawn
        held = named or msa_data.pick_held_out(alignments)
    elif model_cfg.msa_features == "alphafold":
        (alignments, inserted), sources, held = msa_data.load_alignments(insertions=True), {}, named or HELD_OUT
    else:
        alignments, sources, held = msa_data.load_alignments(), {}, named or HELD_OUT
    if set(held) >= set(alignments):
        raise ValueError(f"--held-out {','.join(held)} leaves no family to train on")
    return alignments, held, sources, inserted


def _names(families, shown: int = 10) -> str:
    names = sorted(families)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def build_data(train_cfg, model_cfg) -> Data:
    alignments, held_out, sources, inserted = read_families(model_cfg)
    train_al, held = msa_data.split_families(alignments, held_out)
    kw = dict(batch_size=train_cfg.batch_size, num_seq=model_cfg.num_seq, num_res=train_cfg.seq_len,
              features=model_cfg.msa_features, num_extra_seq=model_cfg.num_extra_seq, insertions=inserted)
    train = msa_data.MSABatches(train_al, seed=train_cfg.seed, **kw)
    evals = msa_data.MSABatches(held, seed=train_cfg.seed, **kw).eval_batches(max(1, 256 // train_cfg.batch_size))
    n = sum(float((b["mask_token"] * b["msa_mask"]).sum()) for b in evals)

    def score(field):  # a baseline's mean over the positions replaced by the mask token
        return sum(float((b[field] * b["mask_token"] * b["msa_mask"]).sum()) for b in evals) / n

    baselines = {"profile_loss": -score("profile_logp"), "profile_acc": score("profile_hit")}
    if model_cfg.msa_features == "alphafold":
        baselines.update(cluster_loss=-score("cluster_logp"), cluster_acc=score("cluster_hit"))
    summary = ""
    if sources:
        summary = (f"data: {len(alignments)} alignment families from --alignments; training on "
                   f"{_names(train_al)}; held out {_names(held)}; packed in {alignments.path.parent}")
    return Data(train=train, eval=evals, vocab_size=msa_data.NUM_CLASSES,
                baselines={**baselines, "masked_positions": n}, sources=sources, summary=summary)


def check(model_cfg, train_cfg, data) -> None:
    if model_cfg.msa_classes != msa_data.NUM_CLASSES:
        raise ValueError(f"msa_classes={model_cfg.msa_classes} must be {msa_data.NUM_CLASSES} (AlphaFold's MSA tokens)")
    if model_cfg.num_extra_blocks and "pipeline" in (train_cfg.mesh or ""):
        raise ValueError("a pipeline axis splits the main Evoformer stack; the extra-MSA stack "
                         f"(num_extra_blocks={model_cfg.num_extra_blocks}) has no stage: run it without a pipeline")
    if model_cfg.num_recycle and "pipeline" in (train_cfg.mesh or ""):
        raise ValueError(f"num_recycle={model_cfg.num_recycle}: recycling feeds the last stage's outputs back to the "
                         "first stage's embedder, which a pipeline's stages do not: run it without a pipeline")


def abstract_batch(model_cfg, train_cfg) -> dict:
    """One training batch's shapes (``MSABatches``' fields for this feature set)."""
    b, s, r, e = train_cfg.batch_size, model_cfg.num_seq, train_cfg.seq_len, model_cfg.num_extra_seq
    f32, i32 = np.float32, np.int32
    shapes = {"msa": ((b, s, r), i32), "target": ((b, s, r), i32), "bert_mask": ((b, s, r), f32),
              "mask_token": ((b, s, r), f32), "profile_logp": ((b, s, r), f32), "profile_hit": ((b, s, r), f32),
              "msa_mask": ((b, s, r), f32), "seq_mask": ((b, r), f32), "residue_index": ((b, r), i32)}
    if model_cfg.msa_features == "alphafold":
        shapes.update(deletion=((b, s, r), f32), cluster_profile=((b, s, r, msa_data.NUM_CLASSES), f32),
                      cluster_deletion_mean=((b, s, r), f32), cluster_logp=((b, s, r), f32),
                      cluster_hit=((b, s, r), f32))
        if e:
            shapes.update(extra_msa=((b, e, r), i32), extra_deletion=((b, e, r), f32), extra_msa_mask=((b, e, r), f32))
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def init_settings(path) -> dict | None:
    """The model fields an AlphaFold 2 parameter file (``params_model_*.npz``) fixes: every size of
    its Evoformer and AlphaFold's input features; None for another path."""
    arrays = evoformer_params.alphafold_file(path)
    if arrays is None:
        return None
    return {**evoformer_params.alphafold_settings(arrays.shapes), "msa_features": "alphafold"}


def export(model_cfg, params, out, *, base: str | None = None, adapters: bool = False,
           dtype: str = "float32") -> list[str]:
    """The trained Evoformer (embedder, extra-MSA and main stacks, masked-MSA and distogram heads;
    LoRA adapters folded in) as an AlphaFold parameter file in folder ``out``: with ``base`` (the
    AlphaFold file the run started from) every other tensor of it (templates, recycling, structure
    module, other heads) is carried over unchanged into ``<base's name>``, a complete file AlphaFold
    reads; without it ``params_evoformer.npz`` holds the Evoformer alone."""
    if adapters:
        raise ValueError("--adapters: AlphaFold's parameter files hold no adapters; export the whole model "
                         "(the adapters folded into the weights)")
    if dtype != "float32":
        raise ValueError(f"--dtype {dtype}: AlphaFold computes with the float32 parameters it reads; export float32")
    if model_cfg.msa_features != "alphafold":
        raise ValueError("msa_features='onehot': AlphaFold's embedder reads its own 49 MSA and 22 target channels; "
                         "only a run with --msa-features alphafold exports to AlphaFold's layout")
    if model_cfg.lora_rank:
        from sciscale_jax.models.stack import merge_lora
        params = merge_lora(params, model_cfg.lora_scale)
    arrays = evoformer_params.alphafold_arrays(params["evoformer"])
    name = "params_evoformer.npz"
    if base is not None:
        kept = evoformer_params.NpzArrays(base)
        for key, shape in kept.shapes.items():
            if key in arrays and tuple(arrays[key].shape) != tuple(shape):
                raise ValueError(f"{base}: {key} has shape {shape}, the run's {arrays[key].shape}")
        arrays = {**{k: kept.read(k) for k in kept.shapes if k not in arrays}, **arrays}
        name = pathlib.Path(base).name
    out = pathlib.Path(out)
    out.mkdir(parents=True)
    np.savez(out / name, **{k: np.asarray(v, dtype=dtype) for k, v in sorted(arrays.items())})
    return [name]


def init_params(model_cfg, path) -> dict:
    """AlphaFold's Evoformer, input embedder and masked-MSA and distogram heads from ``path``, laid out
    as ``MsaEvoformer``'s parameters (per-block or scanned), each read when called."""
    from sciscale_jax.models.stack import is_lora
    from sciscale_jax.pure import partition
    from sciscale_jax.train.step import split_model
    from sciscale_jax.train.abstract import eval_shape_module

    wanted = split_model(eval_shape_module(lambda: MsaEvoformer(model_cfg, rngs=nnx.Rngs(0))))[1]
    base = partition(wanted, is_lora)[1]  # LoRA adapters are the run's own
    return {"evoformer": evoformer_params.alphafold_readers(path, base["evoformer"])}


def embed(model_cfg, model, path, batch_size: int = 16) -> dict:
    """The trained trunk's representations of the alignment in ``path`` (Stockholm, A3M or aligned
    FASTA; row 0 is the query), what AlphaFold-style models hand on to structure and contact
    heads. The query's columns are kept (a column where the query has a gap is dropped, as in a
    query-centred A3M) and the query with the next ``num_seq - 1`` rows (search tools list hits
    best first) is run uncorrupted through the embedder and the Evoformer stack (AlphaFold's
    features: every other row summarised into the clusters, the next ``num_extra_seq`` of them
    through the extra-MSA stack). Returns
    ``query`` (the query's residues, a string of length L), ``single`` [L, c_m] (the query row of
    the final MSA representation, which AlphaFold's structure module reads), ``pair`` [L, L, c_z]
    and ``rows`` (the alignment rows used). One alignment per file, so ``batch_size`` is unused.
    One-line ValueError for a file that is not an alignment or a query without residues."""
    del batch_size
    a, inserted = msa_data.read_alignment(path, insertions=True)
    cols = np.flatnonzero(a[0] != msa_data.GAP_ID)
    if not len(cols):
        raise ValueError(f"{path}: the query (row 0) has no residues, only gaps")
    msa = a[:model_cfg.num_seq, cols].astype(np.int32)[None]  # [1, S, L]
    s, r = msa.shape[1:]
    batch = {"msa": msa, "residue_index": np.arange(r, dtype=np.int32)[None],
             "msa_mask": np.ones((1, s, r), np.float32), "seq_mask": np.ones((1, r), np.float32)}
    if model_cfg.msa_features == "alphafold":  # the other rows summarised per cluster; the next E are the extra rows
        rest = np.arange(s, a.shape[0])
        deletion = msa_data.deletion_matrix(a, inserted, np.arange(s), cols)
        rest_deletion = msa_data.deletion_matrix(a, inserted, rest, cols)
        profile, mean = msa_data.cluster_summaries(msa[0], deletion, a[np.ix_(rest, cols)].astype(np.int32),
                                                   rest_deletion)
        batch.update(deletion=deletion[None], cluster_profile=profile[None], cluster_deletion_mean=mean[None])
        if model_cfg.num_extra_seq:
            e = model_cfg.num_extra_seq
            extra = np.full((e, r), msa_data.GAP_ID, np.int32)
            extra_deletion, extra_mask = np.zeros((e, r), np.float32), np.zeros((e, r), np.float32)
            n = min(e, len(rest))
            extra[:n], extra_deletion[:n], extra_mask[:n] = a[np.ix_(rest[:n], cols)], rest_deletion[:n], 1.0
            batch.update(extra_msa=extra[None], extra_deletion=extra_deletion[None], extra_msa_mask=extra_mask[None])
    graphdef, state = nnx.split(model)

    def run(state, batch):
        out = nnx.merge(graphdef, state).trunk(batch)
        return out["msa"][0, 0].astype(jnp.float32), out["pair"][0].astype(jnp.float32)

    single, pair = jax.jit(run)(state, batch)
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
    abstract_batch=abstract_batch,
    init_settings=init_settings,
    init_params=init_params,
    export=export,
    batch_axes={"msa": (BATCH, MSA_SEQ, RES), "target": (BATCH, MSA_SEQ, RES), "bert_mask": (BATCH, MSA_SEQ, RES),
                "mask_token": (BATCH, MSA_SEQ, RES), "profile_logp": (BATCH, MSA_SEQ, RES),
                "profile_hit": (BATCH, MSA_SEQ, RES), "msa_mask": (BATCH, MSA_SEQ, RES), "seq_mask": (BATCH, RES),
                "residue_index": (BATCH, RES), "deletion": (BATCH, MSA_SEQ, RES),
                "cluster_profile": (BATCH, MSA_SEQ, RES, None), "cluster_deletion_mean": (BATCH, MSA_SEQ, RES),
                "cluster_logp": (BATCH, MSA_SEQ, RES), "cluster_hit": (BATCH, MSA_SEQ, RES),
                "extra_msa": (BATCH, None, RES), "extra_deletion": (BATCH, None, RES),
                "extra_msa_mask": (BATCH, None, RES)},
    model_defaults=dict(c_m=32, c_z=16, msa_heads=4, msa_head_dim=8, pair_heads=2, pair_head_dim=8,
                        opm_channels=8, tri_mul_channels=16, num_blocks=2, target_feat_dim=msa_data.NUM_CLASSES,
                        msa_feat_dim=msa_data.NUM_CLASSES, num_seq=16),
    train_defaults=dict(steps=500, batch_size=4, seq_len=48, learning_rate=3e-3, warmup_steps=50,
                        eval_every=250, save_every=250),
)
