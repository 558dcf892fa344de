"""AlphaFold 2's input features for msa-evoformer (``--msa-features alphafold``) and AlphaFold
parameter files as the start of a run (``--init-from params_model_*.npz``).

The references are transcriptions of DeepMind's alphafold/data/parsers.py (the deletion counts of
``parse_a3m`` and ``parse_stockholm``) and alphafold/model/tf/data_transforms.py
(``nearest_neighbor_clusters``, ``summarize_clusters``, ``make_msa_feat``, ``make_target_feat``),
written as plain loops here, not calls into the code under test."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.data import cache as data_cache
from sciscale_jax.data import msa as M
from sciscale_jax.models.evoformer import Evoformer
from sciscale_jax.recipes import get_recipe, load_run
from sciscale_jax.recipes import msa_evoformer as R
from test_evoformer_params import _set_directly, alphafold_shapes
from test_evoformer import SMALL

RECIPE = get_recipe("msa-evoformer")


def _a3m_deletions(row: str) -> list[int]:
    """parsers.parse_a3m: lower-case letters counted, reset at each match state."""
    out, count = [], 0
    for c in row:
        if c.islower():
            count += 1
        else:
            out.append(count)
            count = 0
    return out


def _stockholm_deletions(row: str, query: str) -> list[int]:
    """parsers.parse_stockholm: residues in columns where the query has a gap are deletions."""
    out, count = [], 0
    for res, q in zip(row, query):
        if res != "-" or q != "-":
            if q == "-":
                count += 1
            else:
                out.append(count)
                count = 0
    return out


def _tokens(row: str) -> list[int]:
    return [M.AMINO.index(c) if c in M.AMINO else M.GAP_ID if c == "-" else M.UNKNOWN_ID for c in row]


def test_deletions_are_counted_as_alphafolds_parsers_count_them(tmp_path):
    a3m = [">q", "ACDEFG", ">s1", "AkkC-EfFG", ">s2", "-CDEFGhh", ">s3", "mACDE-G", ">s4", "ACdDEFwyG"]
    (tmp_path / "x.a3m").write_text("\n".join(a3m) + "\n")
    tokens, inserted = M.read_alignment(tmp_path / "x.a3m", insertions=True)
    rows = a3m[1::2]
    want = np.array([_a3m_deletions(r) for r in rows])
    np.testing.assert_array_equal(inserted, want)
    np.testing.assert_array_equal(tokens, [_tokens("".join(c for c in r if not c.islower())) for r in rows])
    np.testing.assert_array_equal(M.deletion_matrix(tokens, inserted, np.arange(5), np.arange(6)), want)
    # HMMER's Stockholm: columns 3, 4 and 7 hold only '.' and lower case (inserts), dropped and counted;
    # with the '.' removed each row is its A3M line
    sto = ["ACD..EF.G", "A-Dkw-FgG", "ACDm.EF.G", "A-D..EF.-"]
    text = "# STOCKHOLM 1.0\n" + "".join(f"r{i} {r}\n" for i, r in enumerate(sto)) + "//\n"
    (tmp_path / "h.sto").write_text(text)
    tokens, inserted = M.read_alignment(tmp_path / "h.sto", insertions=True)
    np.testing.assert_array_equal(inserted, [_a3m_deletions(r.replace(".", "")) for r in sto])
    # aligned FASTA (no inserts): a drawn query's gap columns turn other rows' residues into deletions
    fasta = ["AC--DE-FG", "ACKLDEMF-", "-CK-DE-FG", "A-KLD-MFG", "ACK-DEW-G"]
    (tmp_path / "f.afa").write_text("".join(f">s{i}\n{r}\n" for i, r in enumerate(fasta)))
    tokens, inserted = M.read_alignment(tmp_path / "f.afa", insertions=True)
    assert not inserted.any()
    for q in (0, 2, 4):
        cols = np.flatnonzero(tokens[q] != M.GAP_ID)
        want = np.array([_stockholm_deletions(r, fasta[q]) for r in fasta])
        np.testing.assert_array_equal(M.deletion_matrix(tokens, inserted, np.arange(5), cols), want)
        # a crop keeps the deletions before its first column (counted on the whole row, then cropped)
        np.testing.assert_array_equal(M.deletion_matrix(tokens, inserted, [1, 3], cols[2:4], cols[1]),
                                      want[[1, 3]][:, 2:4])
    # both kinds at once: A3M inserts and a query with gaps (the drawn query is not row 0)
    tokens, inserted = M.read_alignment(tmp_path / "x.a3m", insertions=True)
    q = 2  # "-CDEFG": its gap column 0 turns the other rows' first residue into a deletion
    cols = np.flatnonzero(tokens[q] != M.GAP_ID)
    d = M.deletion_matrix(tokens, inserted, np.arange(5), cols)
    expected = np.array([_a3m_deletions(r) for r in rows])[:, 1:] + np.array(
        [[(tokens[i, 0] != M.GAP_ID) + _a3m_deletions(r)[0]] + [0] * 4 for i, r in enumerate(rows)])
    np.testing.assert_array_equal(d, expected)


def _clusters_reference(msa, deletion, extra, extra_deletion):
    """data_transforms.nearest_neighbor_clusters (gap_agreement_weight 0) + summarize_clusters, in loops."""
    s, r = msa.shape
    weights = [1.0] * 21 + [0.0, 0.0]
    assign = []
    for e in extra:
        agree = [sum(weights[msa[j, k]] for k in range(r) if e[k] == msa[j, k]) for j in range(s)]
        assign.append(int(np.argmax(agree)))
    profile = np.zeros((s, r, 23))
    dels = np.array(deletion, np.float64)
    counts = np.zeros(s)
    for j in range(s):
        for k in range(r):
            profile[j, k, msa[j, k]] += 1
    for e, d, j in zip(extra, extra_deletion, assign):
        counts[j] += 1
        for k in range(r):
            profile[j, k, e[k]] += 1
        dels[j] += d
    total = 1e-6 + 1 + counts
    return profile / total[:, None, None], dels / total[:, None], assign


def test_cluster_summaries_follow_alphafold():
    rng = np.random.default_rng(0)
    msa = rng.integers(0, 23, (5, 7))          # centres hold gaps (21) and mask tokens (22)
    msa[3] = msa[1]                            # a tie: the first of two equal centres wins
    extra = rng.integers(0, 22, (30, 7))
    extra[:4] = msa[1]
    deletion, extra_deletion = rng.integers(0, 4, (5, 7)), rng.integers(0, 9, (30, 7))
    profile, mean, assign = _clusters_reference(msa, deletion, extra, extra_deletion)
    assert 3 not in assign and assign[:4] == [1] * 4
    for block in (2, 64):
        got_profile, got_mean = M.cluster_summaries(msa, deletion, extra, extra_deletion, block=block)
        np.testing.assert_allclose(got_profile, profile, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-6, atol=1e-7)
    alone, alone_mean = M.cluster_summaries(msa, deletion, extra[:0], extra_deletion[:0])
    np.testing.assert_allclose(alone.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(alone_mean, deletion, rtol=1e-5)


def _shipped():
    al, ins = M.load_alignments(insertions=True)
    keep = ("LuxC", "KR-6", "adeno_fiber")
    return {k: al[k] for k in keep}, {k: ins[k] for k in keep}


def test_alphafold_batches_features_and_baseline():
    al, ins = _shipped()
    source = M.MSABatches(al, batch_size=3, num_seq=5, num_res=20, seed=4, features="alphafold", num_extra_seq=6,
                          insertions=ins)
    rng = np.random.default_rng([4, 0])
    draws = [source._draw(rng) for _ in range(3)]
    batch = source.batch(0)
    for i, d in enumerate(draws):
        a, name = d["array"], source.names[d["alignment"]]
        query = d["rows"][0]
        qcols = np.flatnonzero(a[query] != M.GAP_ID)
        at = int(np.flatnonzero(qcols == d["cols"][0])[0])
        before = qcols[at - 1] if at else -1
        s, r = len(d["rows"]), len(d["cols"])
        np.testing.assert_array_equal(batch["deletion"][i, :s, :r],
                                      M.deletion_matrix(a, ins[name], d["rows"], d["cols"], before))
        rest = np.setdiff1d(np.arange(len(a)), d["rows"])
        np.testing.assert_array_equal(d["rest"], rest)
        # the extra rows: true tokens of rows that are neither the query nor a centre, each once
        n_extra = int(batch["extra_msa_mask"][i, :, 0].sum())
        assert n_extra == min(6, len(rest)) and (batch["extra_msa_mask"][i, :n_extra, :r] == 1).all()
        extra_rows = rest[d["extra"]]
        assert len(set(extra_rows)) == n_extra and not set(extra_rows) & set(d["rows"])
        np.testing.assert_array_equal(batch["extra_msa"][i, :n_extra, :r], a[np.ix_(extra_rows, d["cols"])])
        # clusters of the corrupted centres and every other row, as AlphaFold summarises them
        rest_del = M.deletion_matrix(a, ins[name], rest, d["cols"], before)
        np.testing.assert_array_equal(batch["extra_deletion"][i, :n_extra, :r], rest_del[d["extra"]])
        profile, mean, assign = _clusters_reference(batch["msa"][i, :s, :r], batch["deletion"][i, :s, :r],
                                                    a[np.ix_(rest, d["cols"])], rest_del)
        np.testing.assert_allclose(batch["cluster_profile"][i, :s, :r], profile, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch["cluster_deletion_mean"][i, :s, :r], mean, rtol=1e-5, atol=1e-6)
        # the baseline counts every row the model sees: visible centres and all other rows
        true = batch["target"][i, :s, :r]
        counts = np.ones((r, 22))
        for row, sel in zip(true, batch["bert_mask"][i, :s, :r]):
            for k in range(r):
                counts[k, row[k]] += 1 - sel[k]
        for row in a[np.ix_(rest, d["cols"])]:
            for k in range(r):
                counts[k, row[k]] += 1
        p = counts / counts.sum(1, keepdims=True)
        np.testing.assert_allclose(batch["profile_logp"][i, :s, :r], np.log(p[np.arange(r)[None], true]), rtol=1e-5)
        np.testing.assert_array_equal(batch["profile_hit"][i, :s, :r], p.argmax(1)[None] == true)
        # the nearest-rows baseline: the true residues of each row's cluster members, the profile as a prior
        near = np.repeat(p[None], s, axis=0)
        for row, j in zip(a[np.ix_(rest, d["cols"])], assign):
            near[j, np.arange(r), row] += 1
        near /= near.sum(-1, keepdims=True)
        np.testing.assert_allclose(batch["cluster_logp"][i, :s, :r],
                                   np.log(near[np.arange(s)[:, None], np.arange(r)[None], true]), rtol=1e-5)
        np.testing.assert_array_equal(batch["cluster_hit"][i, :s, :r], near.argmax(-1) == true)
    for k, v in source.batch_rows(0, 1, 3).items():  # a process's rows of the global batch, bit for bit
        np.testing.assert_array_equal(v, batch[k][1:3], err_msg=k)
    # the model's inputs: make_msa_feat's 49 channels, make_target_feat's 22, the extra rows' 25
    cfg = RECIPE.make_config(**{**SMALL, "num_blocks": 1, "num_seq": 5, "msa_features": "alphafold",
                                "num_extra_seq": 6})
    f = jax.tree.map(np.asarray, R.features(cfg, batch))
    hot = lambda x, n: np.eye(n)[x]  # noqa: E731
    value = lambda d: np.arctan(d / 3.0) * 2.0 / np.pi  # noqa: E731
    want = np.concatenate([hot(batch["msa"], 23), np.clip(batch["deletion"], 0, 1)[..., None],
                           value(batch["deletion"])[..., None], batch["cluster_profile"],
                           value(batch["cluster_deletion_mean"])[..., None]], -1)
    np.testing.assert_allclose(f["msa_feat"], want, rtol=1e-6, atol=1e-7)
    aatype = np.where(batch["msa"][:, 0] > 20, 20, batch["msa"][:, 0])   # the mask token is unknown: X
    np.testing.assert_array_equal(f["target_feat"], np.concatenate([np.zeros(aatype.shape + (1,)),
                                                                    hot(aatype, 21)], -1))
    masked = batch["msa"][:, 0] == M.MASK_ID   # the true query residue is never shown where it is masked
    assert masked.any() and (f["target_feat"][masked][:, 1 + M.UNKNOWN_ID] == 1).all()
    np.testing.assert_allclose(f["extra_msa_feat"], np.concatenate(
        [hot(batch["extra_msa"], 23), np.clip(batch["extra_deletion"], 0, 1)[..., None],
         value(batch["extra_deletion"])[..., None]], -1), rtol=1e-6, atol=1e-7)
    # the planner's shapes are the batch's
    from sciscale_jax.train import TrainConfig
    shapes = R.abstract_batch(cfg, TrainConfig(batch_size=3, seq_len=20))
    assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
    logits = RECIPE.build_model(cfg, nnx.Rngs(0))(batch)
    assert logits.shape == (3, 5, 20, 23) and np.isfinite(np.asarray(logits)).all()


def test_feature_settings_are_checked_in_one_line():
    cfg = RECIPE.make_config(msa_features="alphafold")
    assert (cfg.target_feat_dim, cfg.msa_feat_dim, cfg.extra_msa_feat_dim) == (22, 49, 25)
    assert (RECIPE.make_config().target_feat_dim, RECIPE.make_config().msa_feat_dim) == (23, 23)
    assert RECIPE.make_config(msa_features="alphafold", num_extra_blocks=1).num_extra_seq == R.ALPHAFOLD_EXTRA_SEQ
    for kw, match in ((dict(num_extra_blocks=1), "msa-features alphafold"),
                      (dict(msa_features="alphafold", num_extra_seq=4), "num-extra-blocks"),
                      (dict(msa_features="esm"), "must be one of"),
                      (dict(msa_features="alphafold", msa_feat_dim=50), "makes 49 channels")):
        with pytest.raises(ValueError, match=match) as info:
            RECIPE.make_config(**kw)
        assert "\n" not in str(info.value)


CFG = dict(SMALL, num_blocks=2, num_extra_blocks=1, msa_features="alphafold")
CFG_EVO = __import__("test_evoformer").small_config(num_blocks=1, num_extra_blocks=1)


def _params_file(path, seed=0, drop=None, add=None):
    """An AlphaFold parameter file of ``CFG``'s sizes, named and shaped as DeepMind's (with tensors
    of the modules msa-evoformer does not build)."""
    from test_evoformer_params import IGNORED, CFG as EVO

    rng = np.random.default_rng(seed)
    e = R.evoformer_params.EVOFORMER
    recycling = {f"{e}/prev_pos_linear//weights": (15, EVO.c_z), f"{e}/prev_pos_linear//bias": (EVO.c_z,),
                 f"{e}/prev_msa_first_row_norm//scale": (EVO.c_m,), f"{e}/prev_msa_first_row_norm//offset": (EVO.c_m,),
                 f"{e}/prev_pair_norm//offset": (EVO.c_z,)}   # with IGNORED's prev_pair_norm//scale
    shapes = {**alphafold_shapes(EVO), **IGNORED, **recycling, **(add or {})}
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items() if k != drop}
    np.savez(path, **arrays)
    return arrays


def test_alphafold_parameter_file_starts_a_run(tmp_path, capsys):
    arrays = _params_file(tmp_path / "params_model_1.npz")
    fixed = R.init_settings(tmp_path / "params_model_1.npz")
    from test_evoformer_params import CFG as EVO

    assert fixed["msa_features"] == "alphafold" and fixed["recycle_first_pass"] is True
    for name in ("c_m", "c_z", "c_e", "num_blocks", "num_extra_blocks", "msa_heads", "msa_head_dim", "pair_heads",
                 "pair_head_dim", "extra_msa_heads", "extra_msa_head_dim", "opm_channels", "tri_mul_channels"):
        assert fixed[name] == getattr(EVO, name), name
    assert R.init_settings(tmp_path) is None
    # loaded (per block): the weights of assigning each AlphaFold tensor by its name, bit for bit
    direct = Evoformer(dataclasses.replace(EVO, recycle_first_pass=True), rngs=nnx.Rngs(3))
    _set_directly(direct, arrays)
    for name, value in arrays.items():  # the recycling embedder's tensors, by their names
        scope, p = name.split("//")
        if scope.split("/")[-1].startswith("prev_"):
            getattr(getattr(direct, scope.split("/")[-1]), p)[...] = value
    run = load_run(tmp_path / "params_model_1.npz", num_extra_seq=4, log=lambda *_: None)
    assert run.model_config.msa_features == "alphafold" and run.model_config.num_blocks == 2
    mine = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(direct, nnx.Param)))
    theirs = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(run.model.evoformer, nnx.Param))))
    assert len(mine) == len(theirs)
    for key, value in mine:
        np.testing.assert_array_equal(np.asarray(theirs[key]), np.asarray(value), err_msg=str(key))
    # a LoRA fine-tune of it through the CLI, scanned (the stacked arrays read whole): every AlphaFold
    # weight kept bit for bit, the adapters trained
    out = tmp_path / "run"
    assert cli.main(["train", "msa-evoformer", "--init-from", str(tmp_path / "params_model_1.npz"),
                     "--num-extra-seq", "4", "--num-seq", "4", "--lora-rank", "2", "--steps", "2", "--seq-len", "10",
                     "--batch-size", "2", "--eval-every", "2", "--save-every", "2", "--scan-layers",
                     "--out", str(out)]) == 0
    trained = load_run(out, log=lambda *_: None).model
    stack = trained.evoformer.evoformer_stack.blocks.msa_row_attention_with_pair_bias.attention
    np.testing.assert_array_equal(np.asarray(stack.query_w[...], np.float32),
                                  arrays[f"{R.evoformer_params.STACKS['evoformer_stack']}/"
                                         "msa_row_attention_with_pair_bias/attention//query_w"])
    assert np.abs(np.asarray(stack.query_w_lora.lora_b[...])).max() > 0
    from sciscale_jax.models.stack import is_lora
    from sciscale_jax.pure import partition
    frozen = partition(nnx.to_pure_dict(nnx.state(trained, nnx.Param)), is_lora)[1]["evoformer"]
    kept = R.evoformer_params.alphafold_arrays(jax.tree.map(lambda x: np.asarray(x, np.float32), frozen))
    assert len(kept) == len(arrays) - 2   # all but the two tensors msa-evoformer does not build
    for key, value in kept.items():
        np.testing.assert_array_equal(value, arrays[key], err_msg=key)
    # exported back into AlphaFold's file: the adapters folded into their weights, every other tensor kept
    assert cli.main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    with np.load(tmp_path / "exported" / "params_model_1.npz") as f:
        exported = {k: f[k] for k in f.files}
    assert set(exported) == set(arrays)
    lora = trained.config.lora_scale
    a, b = (np.asarray(x[...], np.float64) for x in (stack.query_w_lora.lora_a, stack.query_w_lora.lora_b))
    name = f"{R.evoformer_params.STACKS['evoformer_stack']}/msa_row_attention_with_pair_bias/attention//query_w"
    folded = arrays[name] + lora * np.einsum("nir,nrhd->nihd", a, b)
    np.testing.assert_allclose(exported[name], folded, rtol=1e-5, atol=1e-6)
    assert np.abs(exported[name] - arrays[name]).max() > 0
    for key in ("alphafold/alphafold_iteration/structure_module//foo",
                f"{R.evoformer_params.EVOFORMER}/left_single//weights"):
        np.testing.assert_array_equal(exported[key], arrays[key])
    # the file fixes the sizes: a flag that contradicts it is refused before anything is built
    capsys.readouterr()
    assert cli.main(["train", "msa-evoformer", "--init-from", str(tmp_path / "params_model_1.npz"), "--c-m", "8",
                     "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert "fixes c_m=16" in err and "\n" not in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("drop, add, match", [
    (f"{R.evoformer_params.EVOFORMER}/left_single//weights", None, "lack"),
    (None, {f"{R.evoformer_params.EVOFORMER}/evoformer_iteration/fused_triangle_multiplication//weights": (2, 8, 8)},
     "has no place"),
])
def test_alphafold_files_that_do_not_fit_are_refused_in_one_line(tmp_path, drop, add, match):
    _params_file(tmp_path / "p.npz", drop=drop, add=add)
    fixed = R.init_settings(tmp_path / "p.npz")
    cfg = RECIPE.make_config(**{**fixed, "num_extra_seq": 4})
    with pytest.raises(ValueError, match=match) as info:
        R.init_params(cfg, tmp_path / "p.npz")
    assert "\n" not in str(info.value)
    bad = tmp_path / "q.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    assert R.init_settings(bad) is None
    with pytest.raises(ValueError, match="not a readable .npz"):
        R.evoformer_params.NpzArrays(bad)


def test_packed_alignments_keep_insertions_and_old_packs_are_unused(tmp_path):
    (tmp_path / "a.a3m").write_text(">q\nACDEFG\n>s\nAkkC-EfFG\n>t\nmACDE-G\n")
    (tmp_path / "b.sto").write_text("# STOCKHOLM 1.0\nr0 ACD..EF.G\nr1 A-Dkw-FGG\n//\n")
    paths = [tmp_path / "a.a3m", tmp_path / "b.sto"]
    packed, _ = M.packed_alignments(paths, cache=tmp_path / "cache")
    for name, path in zip(("a", "b"), paths):
        tokens, inserted = M.read_alignment(path, insertions=True)
        np.testing.assert_array_equal(packed[name], tokens)
        np.testing.assert_array_equal(packed.insertions(name), inserted)
        np.testing.assert_array_equal(packed.subset([name]).insertions(name), inserted)
    assert packed.insertions("a").any() and packed.insertions("b").any()
    plain = M.MSABatches(dict(zip("ab", (M.read_alignment(p) for p in paths))), batch_size=2, num_seq=3, num_res=5,
                         features="alphafold", insertions=dict(zip("ab", (M.read_alignment(p, True)[1]
                                                                           for p in paths))))
    from_pack = M.MSABatches(packed, batch_size=2, num_seq=3, num_res=5, features="alphafold")
    for k, v in plain.batch(3).items():
        np.testing.assert_array_equal(from_pack.batch(3)[k], v, err_msg=k)
    folder = packed.path.parent
    meta = json.loads((folder / "meta.json").read_text())
    assert not [e for e in data_cache.entries(tmp_path / "cache") if e.unused]
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    (found,) = [e for e in data_cache.entries(tmp_path / "cache") if e.kind == "alignments"]
    assert "earlier version's format (1" in found.unused
    assert math.isfinite(len(M.packed_alignments(paths, cache=tmp_path / "cache")[0]))


def test_embed_with_alphafold_features_reads_every_row(tmp_path):
    """`sciscale embed` with AlphaFold's features: rows past num_seq are summarised into the clusters
    (and the next num_extra_seq go through the extra-MSA stack), so changing one changes the
    representations; so do residues in columns where the query has a gap (deletions)."""
    from test_msa_evoformer import _afa, _alignment

    cfg = RECIPE.make_config(**{**SMALL, "num_blocks": 1, "num_seq": 4, "msa_features": "alphafold",
                                "num_extra_seq": 2, "msa_dropout": 0.0, "pair_dropout": 0.0})
    model = RECIPE.build_model(cfg, nnx.Rngs(4))
    rng = np.random.default_rng(5)
    nnx.update(model, jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(x.dtype),
                                   nnx.state(model, nnx.Param)))
    rows = _alignment(np.random.default_rng(3), 9, 12)
    base = RECIPE.embed(cfg, model, _afa(tmp_path / "base.afa", rows))
    assert base["single"].shape == (12, cfg.c_m) and list(base["rows"]) == list(range(4))
    for i, name in ((5, "extra_row"), (8, "cluster_only_row")):   # rows 4-5 extra, 6-8 only in the clusters
        changed = rows[:i] + ["".join("W" if c != "W" else "A" for c in rows[i])] + rows[i + 1:]
        other = RECIPE.embed(cfg, model, _afa(tmp_path / f"{name}.afa", changed))
        assert np.abs(other["pair"] - base["pair"]).max() > 1e-4, name
    inserts = [rows[0][:4] + "---" + rows[0][4:]] + [r[:4] + "KLM" + r[4:] for r in rows[1:]]
    other = RECIPE.embed(cfg, model, _afa(tmp_path / "deletions.afa", inserts))
    assert str(other["query"]) == rows[0] and np.abs(other["pair"] - base["pair"]).max() > 1e-4


@pytest.mark.slow
def test_alphafold_features_with_the_extra_stack_train_on_a_dap_mesh_as_on_one_device(tmp_path):
    """Two steps with AlphaFold's features and an extra-MSA block on data=2 x dap=2 give the one-device
    parameters (the extra rows and cluster fields placed as the batch, the extra stack sharded)."""
    from sciscale_jax.train import TrainConfig, train

    model = RECIPE.make_config(**{**SMALL, "c_m": 8, "c_z": 8, "num_seq": 5, "msa_features": "alphafold",
                                  "num_extra_seq": 6})
    out = {}
    for mesh in ("", "data=2,dap=2"):
        cfg = TrainConfig(steps=2, batch_size=2, seq_len=11, eval_every=1000, save_every=1000, log_every=1,
                          warmup_steps=1, seed=1, mesh=mesh)
        result = train(RECIPE, model, cfg, tmp_path / (mesh or "one"), progress=False, log=lambda *_: None)
        out[mesh] = [np.asarray(x) for x in jax.tree.leaves(result["state"].params)]
    init = [np.asarray(x) for x in jax.tree.leaves(nnx.state(RECIPE.build_model(model, nnx.Rngs(1)), nnx.Param))]
    scale = max(np.abs(x).max() for x in out[""])
    assert max(np.abs(a - b).max() for a, b in zip(out[""], init)) > 100 * 1e-5 * scale   # the steps moved them
    for a, b in zip(out["data=2,dap=2"], out[""], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_recycling_first_pass_adds_alphafolds_terms_for_zero_previous_outputs():
    """``recycle_first_pass``: AlphaFold's recycling embedder on its first pass (modules.py,
    EmbeddingsAndEvoformer): prev_pos_linear of the distogram of the previous positions (all zero:
    15 bins of squared distance between 3.25^2 and 20.75^2, upper edge 1e8), the layer norms of the
    previous first MSA row and pair (zeros), added to m's first row and to z before the stacks."""
    from test_evoformer import perturb
    from test_evoformer_params import _inputs

    cfg = dataclasses.replace(CFG_EVO, recycle_first_pass=True)
    model = perturb(Evoformer(cfg, rngs=nnx.Rngs(0)), 1)
    args, kwargs = _inputs()
    got = model(*args, **kwargs)
    lower = np.linspace(3.25, 20.75, 15) ** 2
    upper = np.concatenate([lower[1:], [1e8]])
    d2 = np.zeros((7, 7, 1))                                  # previous positions: all at the origin
    dgram = ((d2 > lower) & (d2 < upper)).astype(np.float32)
    ln = lambda x, norm: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)  # noqa: E731
                          * np.asarray(norm.scale[...]) + np.asarray(norm.offset[...]))
    seq_mask = args[4]
    pair_mask = seq_mask[:, :, None] * seq_mask[:, None, :]

    def trunk(recycled: bool):
        m, z = (np.array(x) for x in model.embedder(*args[:3]))
        if recycled:
            z = z + dgram @ np.asarray(model.prev_pos_linear.weights[...]) + np.asarray(model.prev_pos_linear.bias[...])
            z = z + ln(np.zeros((7, 7, cfg.c_z)), model.prev_pair_norm)
            m[:, 0] += ln(np.zeros((7, cfg.c_m)), model.prev_msa_first_row_norm)
        e = model.extra_msa_activations(kwargs["extra_msa_feat"])
        _, z = model.extra_msa_stack(e, z, kwargs["extra_msa_mask"], pair_mask)
        return model.evoformer_stack(m, z, args[3], pair_mask)

    m, z = trunk(True)
    np.testing.assert_allclose(np.asarray(got["msa"]), np.asarray(m), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got["pair"]), np.asarray(z), rtol=2e-5, atol=2e-5)
    assert np.abs(np.asarray(trunk(False)[1]) - np.asarray(got["pair"])).max() > 1e-3   # the terms matter
