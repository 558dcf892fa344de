"""Alignments, AlphaFold's masked-MSA corruption and the column-profile baseline (data/msa.py)."""

import numpy as np
import pytest

from sciscale_jax.data import msa as M


def test_stockholm_drops_hmmer_insert_columns_and_fasta_reads_as_is(tmp_path):
    sto = tmp_path / "a.sto"
    sto.write_text("# STOCKHOLM 1.0\n#=GF ID x\ns1  AC.dE-\ns2  ACkd-Y\n#=GR s1 PP ......\n//\n")
    got = M.read_alignment(sto)
    # columns 2 ('.', 'k') and 3 ('d', 'd') are inserts: only lower case and '.'; E, Y, gaps stay
    expected = np.array([[M.AMINO.index(c) if c != "-" else M.GAP_ID for c in row] for row in ("ACE-", "AC-Y")])
    np.testing.assert_array_equal(got, expected)
    fa = tmp_path / "a.afa"
    fa.write_text(">a\nAC-B\n>b\nA.CZ\n")
    got = M.read_alignment(fa)
    assert got.shape == (2, 4) and got[0, 2] == M.GAP_ID and got[1, 1] == M.GAP_ID
    assert got[0, 3] == M.UNKNOWN_ID  # B is ambiguous: X


@pytest.mark.parametrize("text, match", [(">a\nACD\n>b\nAC\n", "one length"), ("hello\n", "not a Stockholm"),
                                         (">a\n\n", "non-empty")])
def test_bad_alignment_files_are_named(tmp_path, text, match):
    path = tmp_path / "x.afa"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        M.read_alignment(path)
    binary = tmp_path / "y.sto"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="y.sto"):
        M.read_alignment(binary)


def test_shipped_alignments_load():
    al = M.load_alignments()
    assert al["hemopexin"].shape[0] == 4188 and al["adeno_fiber"].shape[0] == 242
    assert al["LuxC"].shape[0] == 13
    for a in al.values():
        assert a.dtype == np.int8 and a.min() >= 0 and a.max() <= M.GAP_ID


def test_column_profile_is_the_weighted_count_plus_pseudocount():
    msa = np.array([[0, 21], [0, 3], [5, 3]])
    w = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    p = M.column_profile(msa, w, pseudocount=1.0)
    expected0 = np.ones(22)
    expected0[0] += 1
    expected0[5] += 1
    np.testing.assert_allclose(p[0], expected0 / expected0.sum())
    expected1 = np.ones(22)
    expected1[21] += 1
    expected1[3] += 2
    np.testing.assert_allclose(p[1], expected1 / expected1.sum())


def _batches(seed=0, **kw):
    train, _ = M.split_families(M.load_alignments(), ("adeno_fiber",))
    return M.MSABatches(train, **{**dict(batch_size=4, num_seq=8, num_res=40, seed=seed), **kw})


def test_corruption_follows_alphafold_proportions():
    b = _batches()
    sel = mask = kept = real = 0.0
    for step in range(25):
        x = b.batch(step)
        real += x["msa_mask"].sum()
        s = x["bert_mask"] > 0
        sel += s.sum()
        mask += x["mask_token"].sum()
        kept += ((x["msa"] == x["target"]) & s).sum()
        assert (x["msa"][~s] == x["target"][~s]).all()            # unselected positions untouched
        assert (x["msa"][x["mask_token"] > 0] == M.MASK_ID).all()
        assert not (x["msa_mask"][:, 0] * (x["target"][:, 0] == M.GAP_ID)).any()  # the query has no gaps
    assert abs(sel / real - 0.15) < 0.01
    assert abs(mask / sel - 0.70) < 0.03
    assert 0.10 < kept / sel < 0.16        # 10% kept, plus uniform/profile draws that hit the true residue


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = _batches(seed=3).batch(7), _batches(seed=3).batch(7)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["msa"], _batches(seed=3).batch(8)["msa"])


def test_profile_logp_scores_the_target_under_the_visible_rows_profile():
    x = _batches().batch(0)
    i = 0
    rows = int(x["msa_mask"][i, :, 0].sum())
    cols = int(x["seq_mask"][i].sum())
    true, sel = x["target"][i, :rows, :cols], x["bert_mask"][i, :rows, :cols] > 0
    prof = M.column_profile(true, (~sel).astype(float))
    ref = np.log(prof[np.arange(cols)[None, :], true])
    np.testing.assert_allclose(x["profile_logp"][i, :rows, :cols], ref, rtol=1e-6)


def test_split_holds_out_whole_families():
    al = M.load_alignments()
    train, held = M.split_families(al, ("adeno_fiber", "LuxC"))
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(al)
    with pytest.raises(ValueError, match="not among"):
        M.split_families(al, ("nope",))
