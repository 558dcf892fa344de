"""Per-process data: each shipped data source builds rows ``start:stop`` of a training batch
(``batch_rows``) bit for bit equal to those rows of its full batch, building only those rows;
and ``multihost.global_batch`` asks each process's source for exactly the rows its devices hold.

References: the full ``batch(step)`` of the same source, cut with numpy; for the MSA examples also
a plain copy of the example builder as it stood before it was split into draw and build (the
stream the recorded msa-evoformer figures were trained on).
"""

import numpy as np
import pytest
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sciscale_jax.data import mlm, msa, smiles, weather
from sciscale_jax.data.mlm import MLMBatches, RepeatedSymbolTask
from sciscale_jax.data.protein import ProteinTokenizer
from sciscale_jax.parallel import multihost

STEPS = (0, 1, 5, 977)


def _splits(batch_size):
    """Row ranges of 1, 2 and 4 equal processes, and an unequal split."""
    out = [[(p * batch_size // n, (p + 1) * batch_size // n) for p in range(n)] for n in (1, 2, 4)]
    out.append([(0, 3), (3, 4), (4, batch_size)])
    return out


def _assert_slices_equal_full(source, steps=STEPS):
    for step in steps:
        full = source.batch(step)
        for split in _splits(source.batch_size):
            parts = [source.batch_rows(step, lo, hi) for lo, hi in split]
            for k, v in full.items():
                assert all(p[k].dtype == v.dtype for p in parts), k
                assert np.array_equal(np.concatenate([p[k] for p in parts]), v), (step, split, k)
            assert all(p.keys() == full.keys() for p in parts)


class _Rows:
    """Counts the rows a wrapped row builder returns (its result's first dimension)."""

    def __init__(self, fn, first=lambda out: out):
        self.fn, self.first, self.rows = fn, first, 0

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.rows += len(self.first(out))
        return out


def _synthetic_proteins(rng, tok, n=40):
    residues = tok.residue_ids
    return [np.concatenate([[tok.cls_id], rng.choice(residues, size=int(rng.integers(1, 45))), [tok.eos_id]])
            .astype(np.int32) for _ in range(n)]


@pytest.mark.parametrize("seq_len", [23, 64])
def test_mlm_rows_equal_the_full_batch_and_only_they_are_built(seq_len, monkeypatch):
    tok = ProteinTokenizer()
    enc = _synthetic_proteins(np.random.default_rng(0), tok)  # 3..47 tokens: some cropped, some padded
    source = MLMBatches(enc, tok, batch_size=8, seq_len=seq_len, seed=3)
    _assert_slices_equal_full(source)
    counter = _Rows(mlm.window_rows, first=lambda out: out[0])
    monkeypatch.setattr(mlm, "window_rows", counter)
    rows = source.batch_rows(4, 2, 5)
    assert counter.rows == 3 and rows["inputs"].shape == (3, seq_len)
    # every kind of corruption happens in some slice, so the replacement residues are aligned
    kinds = np.concatenate([source.batch_rows(s, 4, 8)["corruption"].ravel() for s in range(20)])
    assert set(np.unique(kinds)) == {mlm.NOT_CHOSEN, mlm.MASKED, mlm.RANDOM, mlm.KEPT}


def test_mlm_rows_on_the_real_proteome():
    pytest.importorskip("pyhmmer")
    from sciscale_jax.data.protein import load_proteins
    tok = ProteinTokenizer()
    enc = [tok.encode(s, add_special=True) for s in load_proteins()[:300]]
    _assert_slices_equal_full(MLMBatches(enc, tok, batch_size=8, seq_len=40, seed=1), steps=(0, 3))


def _alignments(rng):
    out = {}
    for name, (rows, cols) in {"a": (5, 30), "b": (23, 50), "c": (9, 17)}.items():
        a = rng.integers(0, 21, (rows, cols)).astype(np.int8)
        a[rng.random((rows, cols)) < 0.3] = msa.GAP_ID
        out[name] = a
    return out


def _old_example(self, rng):
    """``MSABatches.example`` as written before it was split into ``_draw`` and ``_build``."""
    a = self.alignments[rng.choice(len(self.alignments), p=self.family_p)]
    coverage = (a != msa.GAP_ID).mean(axis=1)
    query = rng.choice(np.flatnonzero(coverage >= np.quantile(coverage, 0.5)))
    cols = np.flatnonzero(a[query] != msa.GAP_ID)
    start = rng.integers(0, max(len(cols) - self.num_res, 0) + 1)
    cols = cols[start:start + self.num_res]
    window = a[:, cols]
    others = np.setdiff1d(np.arange(a.shape[0]), [query])
    cov = (window[others] != msa.GAP_ID).mean(axis=1)
    good = others[cov >= self.min_coverage]
    pool = good if len(good) >= min(self.num_seq - 1, len(others)) else others
    picked = rng.choice(pool, size=min(self.num_seq - 1, len(pool)), replace=False)
    true = window[np.concatenate([[query], picked])].astype(np.int32)
    s, r = true.shape
    selected = rng.random((s, r)) < self.mask_rate
    profile = msa.column_profile(true, (~selected).astype(np.float64))
    kind = rng.random((s, r))
    uniform = rng.integers(0, 20, (s, r))
    cum = np.cumsum(profile, axis=1)
    from_profile = (rng.random((s, r, 1)) > cum[None, :, :]).sum(-1).clip(max=msa.GAP_ID)
    corrupted = np.where(kind < 0.7, msa.MASK_ID, np.where(kind < 0.8, uniform, np.where(kind < 0.9, from_profile, true)))
    m = np.where(selected, corrupted, true)
    out = {"msa": m, "target": true, "bert_mask": selected, "mask_token": selected & (m == msa.MASK_ID),
           "profile_logp": np.log(profile[np.arange(r)[None, :], true]),
           "profile_hit": profile.argmax(1)[None, :] == true}
    return self._pad(out, s, r)


def test_msa_rows_equal_the_full_batch_and_the_stream_is_unchanged(monkeypatch):
    source = msa.MSABatches(_alignments(np.random.default_rng(1)), batch_size=8, num_seq=6, num_res=20, seed=2)
    _assert_slices_equal_full(source)
    for step in (0, 9):  # the full batch is the one the example builder always gave
        rng = np.random.default_rng([source.seed, step])
        old = [_old_example(source, rng) for _ in range(source.batch_size)]
        for k, v in source.batch(step).items():
            assert np.array_equal(v, np.stack([e[k] for e in old])), k
    built = _Rows(source._build, first=lambda out: [out])
    monkeypatch.setattr(source, "_build", built)
    assert source.batch_rows(3, 6, 8)["msa"].shape == (2, 6, 20) and built.rows == 2


@pytest.mark.parametrize("pack", [False, True])
def test_smiles_rows_equal_the_full_batch_and_only_they_are_built(pack, monkeypatch):
    rng = np.random.default_rng(4)
    enc = [np.concatenate([[1], rng.integers(4, 30, int(rng.integers(1, 20))), [2]]).astype(np.int32)
           for _ in range(50)]
    source = smiles.CausalLMBatches(enc, 0, batch_size=8, seq_len=13, seed=7, pack=pack)
    _assert_slices_equal_full(source)
    counter = _Rows(smiles.pad_rows, first=lambda out: out[0])
    monkeypatch.setattr(smiles, "pad_rows", counter)
    assert source.batch_rows(2, 5, 8)["inputs"].shape == (3, 13) and counter.rows == 3


def test_weather_rows_equal_the_full_batch_and_only_they_are_gathered(monkeypatch):
    traj = np.random.default_rng(5).normal(size=(3, 10, 2, 4, 8)).astype(np.float32)
    source = weather.ForecastBatches(traj, lead_steps=2, interval_hours=6, batch_size=8, seed=1)
    _assert_slices_equal_full(source)
    gathered = _Rows(source._gather, first=lambda out: out["lead"])
    monkeypatch.setattr(source, "_gather", gathered)
    assert source.batch_rows(2, 0, 2)["x"].shape == (2, 2, 4, 8) and gathered.rows == 2


@pytest.mark.parametrize("source", ["mlm", "msa", "smiles", "weather"])
def test_bad_row_ranges_are_refused(source):
    tok = ProteinTokenizer()
    traj = np.zeros((2, 5, 1, 2, 2), np.float32)
    src = {"mlm": lambda: MLMBatches(_synthetic_proteins(np.random.default_rng(0), tok, 5), tok, batch_size=4,
                                     seq_len=8),
           "msa": lambda: msa.MSABatches(_alignments(np.random.default_rng(0)), batch_size=4, num_seq=3, num_res=5),
           "smiles": lambda: smiles.CausalLMBatches([np.arange(1, 5)], 0, batch_size=4, seq_len=4),
           "weather": lambda: weather.ForecastBatches(traj, lead_steps=1, interval_hours=6, batch_size=4)}[source]()
    for start, stop in ((2, 2), (-1, 2), (0, 5), (3, 1)):
        with pytest.raises(ValueError, match=r"0 <= start < stop <= batch_size=4"):
            src.batch_rows(0, start, stop)


class _ProcessView:
    """A batch sharding seen from process ``p`` of ``n``: the devices whose row shard (data, fsdp
    order) falls in that process's share, as the hybrid mesh puts data-like axes across processes."""

    def __init__(self, sharding, mesh, p, n):
        self.sharding, self.owner = sharding, {}
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        for (i, j, _), d in np.ndenumerate(mesh.devices):
            self.owner[d] = (i * mesh.shape["fsdp"] + j) // (shards // n) == p

    def addressable_devices_indices_map(self, shape):
        return {d: ix for d, ix in self.sharding.devices_indices_map(shape).items() if self.owner[d]}


@pytest.mark.parametrize("n", [1, 2, 4])
def test_global_batch_asks_each_process_for_its_rows_only(n, monkeypatch):
    tok = ProteinTokenizer()
    source = MLMBatches(_synthetic_proteins(np.random.default_rng(2), tok), tok, batch_size=8, seq_len=12, seed=4)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    specs = {"inputs": P(("data", "fsdp"), "tensor"), "targets": P(("data", "fsdp")), "weights": P(("data", "fsdp")),
             "corruption": P(("data", "fsdp")), "mask": P(("data", "fsdp"))}
    full = source.batch(6)
    shapes = {k: full[k].shape for k in specs}
    calls, built = [], _Rows(mlm.window_rows, first=lambda out: out[0])
    monkeypatch.setattr(mlm, "window_rows", built)
    monkeypatch.setattr(source, "batch_rows", lambda step, lo, hi, f=source.batch_rows: calls.append((step, lo, hi))
                        or f(step, lo, hi))
    monkeypatch.setattr(multihost.jax, "make_array_from_process_local_data",
                        lambda sharding, local, shape: (local, shape))
    rows = 8 // n
    for p in range(n):
        view = {k: _ProcessView(NamedSharding(mesh, s), mesh, p, n) for k, s in specs.items()}
        out = multihost.global_batch(source, 6, view, shapes)
        assert calls[-1] == (6, p * rows, (p + 1) * rows)
        for k in specs:
            local, shape = out[k]
            assert shape == full[k].shape and np.array_equal(local, full[k][p * rows:(p + 1) * rows]), k
    assert built.rows == 8 and len(calls) == n  # every process built its rows once, no process the whole batch


def test_local_batch_cuts_columns_and_falls_back_to_the_full_batch():
    task = RepeatedSymbolTask(num_symbols=5, batch_size=6, seq_len=7, seed=1)  # no batch_rows
    full = task.batch(2)
    index = {"inputs": (slice(2, 4), slice(1, 5)), "mask": (slice(0, 6), slice(0, 7))}
    out = multihost.local_batch(task, 2, index)
    assert np.array_equal(out["inputs"], full["inputs"][2:4, 1:5]) and np.array_equal(out["mask"], full["mask"])
    tok = ProteinTokenizer()
    source = MLMBatches(_synthetic_proteins(np.random.default_rng(3), tok), tok, batch_size=6, seq_len=9, seed=0)
    full = source.batch(1)
    index = {"inputs": (slice(3, 5), slice(2, 9)), "targets": (slice(1, 4), slice(0, 9))}  # rows 1..5 built
    out = multihost.local_batch(source, 1, index)
    assert np.array_equal(out["inputs"], full["inputs"][3:5, 2:9])
    assert np.array_equal(out["targets"], full["targets"][1:4])
