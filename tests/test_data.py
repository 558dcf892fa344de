"""Protein tokenizer, FASTA reading, split, ESM masking and seeded batches."""

import importlib.util

import numpy as np
import pytest

from sciscale_jax.data import (MLMBatches, ProteinTokenizer, load_proteins, mask_tokens, read_fasta,
                               split_by_sequence, unigram_perplexity)
from sciscale_jax.data.mlm import KEPT, MASKED, NOT_CHOSEN, RANDOM, context_free_log_probs, table_accuracy, table_nll
from sciscale_jax.data import protein as protein_mod


@pytest.fixture(scope="module")
def proteins():
    return load_proteins()


def test_corpus_is_the_real_proteome(proteins):
    assert len(proteins) == 2100
    assert all("*" not in s for s in proteins)
    assert 250 < np.mean([len(s) for s in proteins]) < 400


def test_tokenizer_round_trip(proteins):
    tok = ProteinTokenizer()
    for seq in proteins[:300]:
        ids = tok.encode(seq, add_special=True)
        assert ids[0] == tok.cls_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == seq
    assert tok.decode(tok.encode("acdxbzuo")) == "ACDXBZUO"
    assert tok.vocab_size == 4 + 20 + 5


def test_unknown_symbols():
    with pytest.raises(ValueError, match=r"unknown residue symbols \['-', 'J'\]"):
        ProteinTokenizer().encode("MKJ-A")
    tok = ProteinTokenizer(unknown="x")
    assert tok.decode(tok.encode("MKJ-A")) == "MKXXA"
    with pytest.raises(ValueError, match="unknown='drop'"):
        ProteinTokenizer(unknown="drop")


def test_read_fasta_strips_stop(tmp_path):
    path = tmp_path / "x.faa"
    path.write_text(">a desc\nMKV\nLL*\n>b\nAC\n")
    assert read_fasta(path) == [("a", "MKVLL"), ("b", "AC")]


def test_split_is_deterministic_disjoint_and_order_free(proteins):
    train, val = split_by_sequence(proteins, 0.1)
    assert len(train) + len(val) == len(proteins)
    assert not set(train) & set(val)
    assert 0.06 < len(val) / len(proteins) < 0.14
    train2, val2 = split_by_sequence(proteins[::-1], 0.1)
    assert sorted(val2) == sorted(val)


def test_masking_proportions_over_many_draws():
    tok = ProteinTokenizer()
    rng = np.random.default_rng(0)
    tokens = rng.choice(tok.residue_ids, size=(400, 500)).astype(np.int32)
    maskable = np.ones_like(tokens, bool)
    maskable[:, :3] = False  # e.g. cls / padding: never chosen
    inputs, targets, weights, corruption = mask_tokens(tokens, maskable, rng, mask_id=tok.mask_id,
                                                       residue_ids=tok.residue_ids)
    chosen = weights > 0
    n = maskable.sum()
    assert not chosen[:, :3].any()
    np.testing.assert_array_equal(targets, tokens)
    assert abs(chosen.sum() / n - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)
    k = chosen.sum()
    as_mask = (inputs == tok.mask_id) & chosen
    unchanged = (inputs == tokens) & chosen
    # a random replacement can coincide with the original residue (p = 1/20)
    for frac, expected in ((as_mask.sum() / k, 0.8), (unchanged.sum() / k, 0.1 + 0.1 / 20)):
        assert abs(frac - expected) < 4 * np.sqrt(expected * (1 - expected) / k)
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
    assert np.isin(inputs[chosen & ~as_mask], tok.residue_ids).all()
    # The corruption labels say what happened: every mask token is MASKED, every changed
    # residue RANDOM, and about 10% of chosen positions are KEPT (RANDOM may redraw the original).
    np.testing.assert_array_equal(corruption == NOT_CHOSEN, ~chosen)
    np.testing.assert_array_equal(corruption == MASKED, as_mask)
    assert (corruption[chosen & (inputs != tokens) & ~as_mask] == RANDOM).all()
    np.testing.assert_array_equal(inputs[corruption == KEPT], tokens[corruption == KEPT])
    for code, expected in ((KEPT, 0.1), (RANDOM, 0.1)):
        frac = (corruption == code).sum() / k
        assert abs(frac - expected) < 4 * np.sqrt(expected * (1 - expected) / k)
    with pytest.raises(ValueError, match="mask_frac=0.9 and random_frac=0.2"):
        mask_tokens(tokens, maskable, rng, mask_id=tok.mask_id, residue_ids=tok.residue_ids, mask_frac=0.9,
                    random_frac=0.2)


def test_batches_are_a_function_of_seed_and_step(proteins):
    tok = ProteinTokenizer()
    enc = [tok.encode(s, add_special=True) for s in proteins[:50]]
    a = MLMBatches(enc, tok, batch_size=4, seq_len=32, seed=3)
    b = MLMBatches(enc, tok, batch_size=4, seq_len=32, seed=3)
    for key in ("inputs", "targets", "weights", "corruption", "mask"):
        np.testing.assert_array_equal(a.batch(7)[key], b.batch(7)[key])
    assert not np.array_equal(a.batch(7)["inputs"], a.batch(8)["inputs"])
    batch = a.batch(1)
    assert batch["inputs"].shape == (4, 32) and batch["mask"].dtype == bool
    assert not (batch["weights"] * (batch["targets"] < 4)).any()  # specials are never targets


def test_eval_batches_cover_every_sequence_once(proteins):
    tok = ProteinTokenizer()
    enc = [tok.encode(s, add_special=True) for s in proteins[:37]]
    ev = MLMBatches(enc, tok, batch_size=8, seq_len=16, seed=0).eval_batches()
    assert len(ev) == 5 and sum(int(b["mask"].any(axis=1).sum()) for b in ev) == 37
    ev2 = MLMBatches(enc, tok, batch_size=8, seq_len=16, seed=0).eval_batches()
    np.testing.assert_array_equal(ev[2]["weights"], ev2[2]["weights"])


def test_eval_passes_reach_the_masked_target_count(proteins):
    tok = ProteinTokenizer()
    enc = [tok.encode(s, add_special=True) for s in proteins[:37]]
    ev = MLMBatches(enc, tok, batch_size=8, seq_len=16, seed=0).eval_batches(min_masked=500, rows=24)
    masked = [int((b["corruption"] == MASKED).sum()) for b in ev]
    assert sum(masked) >= 500 and sum(masked[:-2]) < 500       # passes of 2 batches each, no extra pass
    assert len(ev) % 2 == 0 and all(b["inputs"].shape == (24, 16) for b in ev)
    # each pass its own corruption of the same sequences
    assert not np.array_equal(ev[0]["corruption"], ev[2]["corruption"])
    np.testing.assert_array_equal(ev[0]["mask"][:, 0], ev[2]["mask"][:, 0])


def test_context_free_table_matches_plain_counts():
    """P(target | input) counted by hand over chosen positions, add-one smoothed over residues."""
    tok = ProteinTokenizer()
    r = tok.residue_ids
    m = tok.mask_id
    train = [{"inputs": np.array([[m, m, m, r[1], r[2]]]), "targets": np.array([[r[0], r[1], r[0], r[0], r[2]]]),
              "weights": np.array([[1.0, 1.0, 1.0, 1.0, 0.0]])}]
    table = context_free_log_probs(train, tok)
    n_res = len(r)

    def p(inp, tgt, counts):  # counts: {target: n} for this input
        total = sum(counts.values()) + n_res + (tok.vocab_size - 4 - n_res)  # +1 on every non-special token
        return (counts.get(tgt, 0) + 1) / total

    np.testing.assert_allclose(np.exp(table[m, r[0]]), p(m, r[0], {r[0]: 2, r[1]: 1}))
    np.testing.assert_allclose(np.exp(table[m, r[1]]), p(m, r[1], {r[0]: 2, r[1]: 1}))
    np.testing.assert_allclose(np.exp(table[r[1], r[0]]), p(r[1], r[0], {r[0]: 1}))
    np.testing.assert_allclose(np.exp(table[r[2], r[2]]), p(r[2], r[2], {}))   # weight 0: not counted
    assert np.all(np.isinf(table[:, [tok.pad_id, tok.mask_id, tok.cls_id, tok.eos_id]]))
    ev = [{"inputs": np.array([[m, r[1], r[3]]]), "targets": np.array([[r[0], r[0], r[3]]]),
           "weights": np.ones((1, 3)), "corruption": np.array([[MASKED, RANDOM, KEPT]], np.int8)}]
    for positions, want in (("masked", -table[m, r[0]]), ("random", -table[r[1], r[0]]),
                            ("kept", -table[r[3], r[3]])):
        assert table_nll(table, ev, positions) == pytest.approx((want, 1.0))
    assert table_nll(table, ev, "selected")[1] == 3.0
    assert table_accuracy(table, ev, "masked") == 1.0 and table_accuracy(table, ev, "random") == 1.0
    assert table_accuracy(table, ev, "kept") == 0.0   # r[3] was never seen: the table predicts r[0]
    with pytest.raises(ValueError, match="positions='x'"):
        table_nll(table, ev, "x")


def test_unigram_perplexity_matches_plain_formula():
    tok = ProteinTokenizer()
    train = [np.array([4, 4, 5, 6], np.int32)]
    batch = {"targets": np.array([[4, 5, 9]]), "weights": np.array([[1.0, 1.0, 0.0]])}
    counts = np.ones(tok.vocab_size)
    counts[[4, 5, 6]] += [2, 1, 1]
    counts[:4] = 0
    p = counts / counts.sum()
    expected = np.exp(-(np.log(p[4]) + np.log(p[5])) / 2)
    assert unigram_perplexity(train, [batch], tok) == pytest.approx(expected)


def test_missing_pyhmmer_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(protein_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyhmmer" else real(name, *a))
    with pytest.raises(ImportError, match=r"sciscale_jax\[science\]"):
        load_proteins()


def test_repeated_symbol_task_floor_is_the_context_free_optimum():
    """Counted over many batches, P(target | mask token) is uniform over the symbols: the
    context-free table scores log(num_symbols), and every masked target is visible elsewhere."""
    from sciscale_jax.data.mlm import RepeatedSymbolTask

    tok = ProteinTokenizer()   # its specials and 25 non-special ids cover the task's ids
    task = RepeatedSymbolTask(num_symbols=5, batch_size=16, seq_len=11, seed=2, mask_id=tok.mask_id,
                              first_symbol=int(tok.residue_ids[0]))
    train = [task.batch(i) for i in range(300)]
    table = context_free_log_probs(train, tok)
    total, count = table_nll(table, task.eval_batches(60), "masked")
    assert count > 1000
    assert abs(total / count - task.floor) < 0.02 and task.floor == pytest.approx(np.log(5))
    for b in train[:20]:
        assert (b["corruption"][b["weights"] > 0] == MASKED).all()
        for row in range(16):   # the sequence's symbol is visible at an unmasked position (or all are masked)
            visible = b["inputs"][row][b["weights"][row] == 0]
            assert visible.size == 0 or (visible == b["targets"][row, 0]).all()
    with pytest.raises(ValueError, match="mask_id=5 lies among the symbols"):
        RepeatedSymbolTask(num_symbols=5, batch_size=2, seq_len=4, mask_id=5, first_symbol=4)
