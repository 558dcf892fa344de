"""smiles-lm: the atom-level tokenizer, the rdkit corpus and its batches, the n-gram baseline, the
generation metrics against hand-made lists, greedy sampling against a plain decoding loop, and the
recipe trained through the CLI and the train loop under the shared technique flags."""

import collections
import dataclasses
import math
import re
import shutil
import zlib

import jax
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.data import smiles as sm
from sciscale_jax.data import smiles_pack as sp
from sciscale_jax.recipes import load_run, smiles_lm
from sciscale_jax.train import TrainConfig, train

rdkit = pytest.importorskip("rdkit", reason='smiles-lm needs rdkit: pip install -e ".[chem]"')

TRICKY = ["C[C@@H](N)C(=O)O", "c1cc[nH+]cc1", "C%10CCCCCCCCC%10", "ClCCBr", "[13CH3]C(Cl)(Br)I",
          "C1=CC=CC=C1.[Na+].[Cl-]", "F/C=C\\F", "N#CC#N", "[Fe+2]", "O=[N+]([O-])c1ccc2c(c1)C%11CC2%11"]


def test_tokens_of_tricky_smiles():
    assert sm.tokenize("C%10CC%10") == ["C", "%10", "C", "C", "%10"]
    assert sm.tokenize("[nH+]c1") == ["[nH+]", "c", "1"]
    assert sm.tokenize("ClC(Br)c") == ["Cl", "C", "(", "Br", ")", "c"]
    assert sm.tokenize("C l") == ["C", " ", "l"]  # not chlorine
    assert sm.tokenize("CCl") == ["C", "Cl"] and sm.tokenize("Cc") == ["C", "c"]
    assert sm.tokenize("[C@@H](F)/C=C\\B") == ["[C@@H]", "(", "F", ")", "/", "C", "=", "C", "\\", "B"]
    assert sm.tokenize("[13CH3]Sc1") == ["[13CH3]", "S", "c", "1"]


def test_regex_covers_any_string():
    rng = np.random.default_rng(0)
    alphabet = list("CNOSPFIBrcnosl()[]=#$:/\\@+-.%0123456789 Hxyz") + ["Cl", "Br", "[nH]", "%12"]
    for _ in range(300):
        s = "".join(rng.choice(alphabet, size=rng.integers(0, 30)))
        assert "".join(sm.tokenize(s)) == s
    for s in TRICKY:
        assert "".join(sm.tokenize(s)) == s


def test_tokenizer_round_trip_and_unknown_tokens():
    tok = sm.SmilesTokenizer.from_smiles(TRICKY)
    assert tok.tokens[:4] == sm.SPECIALS
    for s in TRICKY:
        ids = tok.encode(s)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.dtype == np.int32
        assert len(ids) == len(sm.tokenize(s)) + 2
        assert tok.decode(ids) == s
    ids = tok.encode("C[Xe]C")  # [Xe] never seen
    assert ids.tolist()[2] == tok.unk_id and tok.decode(ids) == "C?C"
    # decode stops at eos; padding after it is ignored
    assert tok.decode(np.concatenate([tok.encode("CCO"), [tok.pad_id] * 3])) == "CCO"
    with pytest.raises(ValueError, match="distinct"):
        sm.SmilesTokenizer(["C", "C"])


def test_rdkit_corpus_is_canonical_deduplicated_and_split_by_hash():
    mols = sm.load_molecules()
    assert len(mols) > 15_000 and len(set(mols)) == len(mols)
    from rdkit import Chem

    for s in mols[::997]:  # canonical: writing them again changes nothing; single fragment
        assert Chem.MolToSmiles(Chem.MolFromSmiles(s)) == s and "." not in s
        assert "".join(sm.tokenize(s)) == s
    train, val = sm.split_by_hash(mols, 0.1)
    assert not set(train) & set(val) and len(train) + len(val) == len(mols)
    assert 0.08 < len(val) / len(mols) < 0.12
    assert sm.split_by_hash(mols[::-1], 0.1)[1] == val[::-1]  # order does not decide the side


def test_curation_keeps_neutral_organic_molecules_and_refuses_the_rest():
    from rdkit import Chem

    same = lambda s: Chem.MolToSmiles(Chem.MolFromSmiles(s))  # noqa: E731  RDKit's canonical form
    kept = {"OCC": "CCO", "O=[N+]([O-])c1ccccc1": same("O=[N+]([O-])c1ccccc1"),  # nitro: N+ and O-, net 0
            "[O-][n+]1ccccc1": same("[O-][n+]1ccccc1"), "C[N+](C)(C)CC(=O)[O-]": same("C[N+](C)(C)CC(=O)[O-]"),
            "CC(=O)[O-].[Na+]": "CC(=O)O", "CC[NH+](C)C.[Cl-]": "CCN(C)C",  # salts: largest fragment, neutralised
            "FC(F)(F)c1ccc(Br)cc1I": same("FC(F)(F)c1ccc(Br)cc1I"), "OB(O)c1ccccc1": same("OB(O)c1ccccc1"),
            "C" * 50: "C" * 50}
    for smi, want in kept.items():
        assert sm.curate(smi) == want, smi
    refused = ["C[Si](C)(C)C", "CC(=O)O[Hg]C", "C[Se]C", "C[N+](C)(C)C.[Br-]",  # element, net charge
               "C[S+](C)C", "[13CH3]CO", "C[O]", "C" * 51, "C1CC", "not a smiles"]  # charge kind, isotope, radical
    assert [sm.curate(s) for s in refused] == [None] * len(refused)
    for s in sm.load_molecules()[::503]:  # the shipped corpus passes its own filter unchanged
        assert sm.curate(s) == s


def test_batches_are_a_pure_function_of_seed_and_step():
    tok = sm.SmilesTokenizer.from_smiles(TRICKY)
    enc = [tok.encode(s) for s in TRICKY]
    a = sm.CausalLMBatches(enc, tok.pad_id, batch_size=5, seq_len=24, seed=3)
    b = sm.CausalLMBatches(enc, tok.pad_id, batch_size=5, seq_len=24, seed=3)
    for step in (0, 7):
        for k in ("inputs", "mask"):
            np.testing.assert_array_equal(a.batch(step)[k], b.batch(step)[k])
    assert not np.array_equal(a.batch(0)["inputs"], a.batch(1)["inputs"])
    batch = a.batch(2)
    assert (batch["inputs"][:, 0] == tok.bos_id).all()
    np.testing.assert_array_equal(batch["mask"], batch["inputs"] != tok.pad_id)
    rows = {tok.decode(r) for r in batch["inputs"]}
    assert rows <= set(TRICKY)
    evals = sm.CausalLMBatches(enc, tok.pad_id, batch_size=4, seq_len=24).eval_batches()
    decoded = [tok.decode(r) for e in evals for r, m in zip(e["inputs"], e["mask"]) if m.any()]
    assert decoded == TRICKY and sum(int(e["mask"].any(1).sum()) for e in evals) == len(TRICKY)


def test_packed_batches_hold_whole_molecules_end_to_end():
    tok = sm.SmilesTokenizer.from_smiles(TRICKY)
    enc = [tok.encode(s) for s in TRICKY]
    packed = sm.CausalLMBatches(enc, tok.pad_id, batch_size=4, seq_len=37, seed=5, pack=True)
    batch = packed.batch(3)
    assert batch["inputs"].shape == (4, 37) and batch["mask"].all()  # no padding anywhere
    np.testing.assert_array_equal(batch["inputs"], packed.batch(3)["inputs"])
    for row in batch["inputs"].tolist():
        assert row[0] == tok.bos_id
        pieces = [p for p in ",".join(map(str, row)).split(f",{tok.bos_id},")]  # molecules after the first
        segments = [[int(x) for x in p.split(",") if x] for p in pieces]
        segments[0] = segments[0][1:]  # the leading bos
        for seg in segments[:-1]:  # every molecule but the last is whole: its tokens, then eos
            assert seg[-1] == tok.eos_id and tok.decode(seg) in TRICKY
        last = tok.decode(segments[-1])  # the last one is cut at the row's end
        assert any(s.startswith(last) for s in TRICKY)


def _packs(root):
    return sorted((root / "smiles").glob("[0-9a-f]*[0-9a-f]"))


def test_corpus_pack_is_used_checked_and_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCISCALE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "mols.smi"
    src.write_text("OCC ethanol\nc1ccccc1 benzene\nCCO dup\n[Na+].[Cl-].CC(=O)O salt\n")
    expected = ["CCO", "c1ccccc1", "CC(=O)O"]  # canonical, deduplicated, largest fragment
    assert sm.load_molecules([src]) == expected and "packing 1 SMILES file" in capsys.readouterr().err
    (folder,) = _packs(tmp_path / "cache")
    real = sp.curate_chunk
    monkeypatch.setattr(sp, "curate_chunk", lambda *a: pytest.fail("the pack was not used"))
    assert sm.load_molecules([src]) == expected and capsys.readouterr().err == ""
    monkeypatch.setattr(sp, "curate_chunk", real)
    tokens = (folder / "tokens.bin").read_bytes()
    for name, damaged in [("tokens.bin", tokens[:-2]), ("meta.json", b"{"), ("counts.npy", b"")]:
        good = (folder / name).read_bytes()
        (folder / name).write_bytes(damaged)
        assert sm.load_molecules([src]) == expected
        assert "packing" in capsys.readouterr().err  # cut short or unreadable: packed again, whole
        assert (folder / name).read_bytes() == good
    src.write_text("CCN\nC[N+](C)(C)C.[Br-]\n")  # other sources: another pack
    assert sm.load_molecules([src]) == ["CCN"] and len(_packs(tmp_path / "cache")) == 2
    # without curation the quaternary ammonium stays; the switch is part of the key
    assert sm.load_molecules([src], curated=False) == ["CCN", "C[N+](C)(C)C"]
    assert len(_packs(tmp_path / "cache")) == 3
    assert sm.load_molecules([src], cache=False) == ["CCN"] and len(_packs(tmp_path / "cache")) == 3


def _corpus(n):
    """``n`` distinct molecules of the shipped corpus, raw as a user file would hold them (aromatic,
    some as salts or written differently), with duplicates and molecules curation refuses."""
    mols = sm.load_molecules()[:n]
    lines = []
    for i, m in enumerate(mols):
        lines.append(m if i % 3 else f"{m}.[Na+]")  # a counter-ion: the largest fragment stays
        if i % 5 == 0:
            lines.append(mols[i // 2])  # a duplicate of an earlier one
        if i % 11 == 0:
            lines.append("[Fe+2]" if i % 2 else "not a smiles")
    return mols, lines


@pytest.mark.parametrize("form", ["aromatic", "kekule"])
def test_pack_is_the_same_for_any_number_of_workers_and_stops_at_its_limit(tmp_path, monkeypatch, form):
    mols, lines = _corpus(300)
    (tmp_path / "a.smi").write_text("\n".join(lines[:200]) + "\n")
    (tmp_path / "b.smi").write_text("SMILES\n" + "\n".join(lines[200:]) + "\n")
    paths = [tmp_path / "a.smi", tmp_path / "b.smi"]
    monkeypatch.setattr(sp, "CHUNK", 23)  # many chunks, so the workers take turns
    packs = {}
    for workers in (1, 3):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        meta = sp.pack_smiles(paths, folder, form=form, workers=workers)
        packs[workers] = {p.name: p.read_bytes() for p in folder.iterdir()}
        assert meta["molecules"] == len(mols) and meta["records_read"] == len(lines)
    assert packs[1] == packs[3]  # byte for byte
    pack = sp._load(tmp_path / "w3", [sp.FORMAT, None, form, True, 0])
    got = [pack.smiles(j) for j in range(len(pack))]
    assert got == (mols if form == "aromatic" else [sm.to_form(m, form) for m in mols])  # file order, first kept
    assert pack.hashes.tolist() == [sp.smiles_hash(m) for m in mols]
    assert np.array_equal(pack.buckets, [zlib.crc32(m.encode()) % 10_000 for m in mols])
    train, val = pack.split(0.2)
    assert [got[j] for j in val] == [got[mols.index(m)] for m in sm.split_by_hash(mols, 0.2)[1]]
    counts = collections.Counter(t for j in train for t in sm.tokenize(got[j]))
    assert dict(zip(pack.vocab, pack.train_counts(0.2).tolist())) == {t: counts[t] for t in pack.vocab}
    assert dict(zip(pack.vocab, pack.train_counts(0.2, 150).tolist())) == {
        t: sum(sm.tokenize(got[j]).count(t) for j in train if j < 150) for t in pack.vocab}
    # the first 40 distinct molecules, and reading stops soon after them, with workers too
    folder = tmp_path / "limit"
    folder.mkdir()
    meta = sp.pack_smiles(paths, folder, form=form, workers=2, limit=40)
    limited = sp._load(folder, [sp.FORMAT, None, form, True, 40])
    assert [limited.smiles(j) for j in range(len(limited))] == got[:40]
    assert meta["records_read"] < len(lines) // 2


def test_a_failing_or_killed_worker_stops_packing_in_one_line(monkeypatch):
    chunks = [["CCO", "c1ccccc1"], ["CCN"], ["CCC"]]
    with pytest.raises(ValueError, match="^curating SMILES failed in a worker: ValueError: form='smarts' must be"):
        list(sp._curated(chunks, 2, True, "smarts"))
    pool = sp._Workers(1)
    try:
        pool.procs[0].kill()
        pool.procs[0].wait()
        with pytest.raises(RuntimeError, match="a SMILES curation worker ended unexpectedly"):
            pool.send(0, (["CCO"], True, "aromatic"))  # (the pipe may take the job and the answer never come)
            pool.receive(0)
    finally:
        pool.close()
    monkeypatch.setenv("SCISCALE_DATA_WORKERS", "0")
    with pytest.raises(ValueError, match="SCISCALE_DATA_WORKERS='0' must be a positive integer"):
        sp.default_workers()
    monkeypatch.setenv("SCISCALE_DATA_WORKERS", "3")
    assert sp.default_workers() == 3


def test_training_batches_read_from_the_pack_are_those_of_the_molecules_in_memory():
    corpus = smiles_lm.build_corpus(64, molecules=500, form="kekule")
    assert isinstance(corpus.train, sp.Molecules)
    in_memory = list(corpus.train)
    assert [corpus.tokenizer.decode(ids) for ids in in_memory] == corpus.train_smiles
    for pack in (False, True):
        a = sm.CausalLMBatches(corpus.train, corpus.tokenizer.pad_id, batch_size=6, seq_len=64, seed=2, pack=pack)
        b = sm.CausalLMBatches(in_memory, corpus.tokenizer.pad_id, batch_size=6, seq_len=64, seed=2, pack=pack)
        for step in range(3):
            assert all(np.array_equal(a.batch(step)[k], b.batch(step)[k]) for k in ("inputs", "mask"))
        assert all(np.array_equal(a.batch_rows(4, 2, 5)[k], b.batch_rows(4, 2, 5)[k]) for k in ("inputs", "mask"))
    # novelty by the packed hashes is novelty by the strings
    from rdkit import Chem

    aromatic = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in corpus.train_smiles]
    samples = aromatic[:5] + ["CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCO", "C1CC1C2CC2N", "not one"]
    assert sm.generation_metrics(samples, train_hashes=corpus.train_hashes()) == \
        sm.generation_metrics(samples, aromatic)


def test_large_corpora_score_and_fit_baselines_on_their_first_molecules(monkeypatch):
    monkeypatch.setattr(smiles_lm, "BASELINE_MOLECULES", 100)
    corpus = smiles_lm.build_corpus(64, molecules=2000, form="aromatic", eval_molecules=30)
    whole = smiles_lm.build_corpus(64, molecules=2000, form="aromatic", eval_molecules=0)
    assert len(corpus.val) == 30 and corpus.held_out == len(whole.val) > 30
    assert corpus.val_smiles == whole.val_smiles[:30] and corpus.baseline_molecules == 100
    fitted = sm.NGramModel(list(whole.train)[:100], corpus.tokenizer.vocab_size, n=corpus.ngram.n, k=0.01)
    assert fitted.perplexity(list(corpus.val)) == corpus.ngram.perplexity(list(corpus.val))
    with pytest.raises(ValueError, match="eval_molecules=-1 must be a non-negative integer"):
        smiles_lm.SmilesLMConfig(vocab_size=64, eval_molecules=-1)


def test_ngram_probabilities_sum_to_one_and_match_counts():
    rng = np.random.default_rng(1)
    vocab = 9
    enc = [np.concatenate([[1], rng.integers(3, vocab, rng.integers(2, 9)), [2]]) for _ in range(40)]
    k = 0.3
    model = sm.NGramModel(enc, vocab, n=3, k=k)
    for ctx in ([], [5], [4, 7], [8, 8, 8]):
        p = model.probs(ctx)
        assert p.sum() == pytest.approx(1.0, abs=1e-12) and p[0] == 0.0 and p[1] == 0.0
    # plain counting: how often does id w follow the context (4, 7) in the padded sequences?
    follows = np.zeros(vocab)
    for ids in enc:
        seq = [1, 1] + list(ids[1:])
        for t in range(2, len(seq)):
            if seq[t - 2:t] == [4, 7]:
                follows[seq[t]] += 1
    expected = np.where(np.isin(np.arange(vocab), [0, 1]), 0.0, follows + k) / (follows.sum() + k * (vocab - 2))
    np.testing.assert_allclose(model.probs([3, 4, 7]), expected, rtol=1e-12)
    # perplexity = exp(mean NLL) of every token after bos, written plainly with probs()
    nll = [-math.log(model.probs(list(ids[1:t]))[ids[t]]) for ids in enc[:5] for t in range(1, len(ids))]
    assert model.perplexity(enc[:5]) == pytest.approx(math.exp(np.mean(nll)), rel=1e-10)


def test_generation_metrics_on_hand_made_lists():
    samples = ["C1CC", "CCO", "OCC", "c1ccccc1", "CCO", "", "C(C"]
    m = sm.generation_metrics(samples, ["CCO"], diversity=True)
    assert m["validity"] == pytest.approx(4 / 7)          # C1CC (open ring), '' and C(C do not parse
    assert m["uniqueness"] == pytest.approx(2 / 4)        # CCO, OCC, CCO are one molecule
    assert m["novelty"] == pytest.approx(1 / 2)           # benzene is new, ethanol is not
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    a, b = (set(gen.GetFingerprint(Chem.MolFromSmiles(s)).GetOnBits()) for s in ("CCO", "c1ccccc1"))
    assert m["internal_diversity"] == pytest.approx(1 - len(a & b) / len(a | b))
    assert sm.generation_metrics(["C1CC"], [])["validity"] == 0.0


def test_greedy_sampling_matches_a_plain_decoding_loop():
    tok = sm.SmilesTokenizer.from_smiles(TRICKY)
    cfg = smiles_lm.SmilesLMConfig(vocab_size=tok.vocab_size + 3, num_layers=2, num_heads=2, embed_dim=16,
                                   mlp_dim=32, max_len=16, causal=True)
    model = smiles_lm.Transformer(cfg, rngs=nnx.Rngs(5))
    got = smiles_lm.sample(model, tok, 4, max_len=12, top_k=1, batch_size=2)  # two batches of one shape
    forward = jax.jit(lambda ids: model(ids))  # the full causal forward pass over a padded row of 12
    tokens = [tok.bos_id]
    while len(tokens) < 12:  # argmax of the last real position's logits over the real, predictable tokens
        row = np.full((1, 12), tok.pad_id, np.int32)
        row[0, :len(tokens)] = tokens
        logits = np.asarray(forward(row))[0, len(tokens) - 1].astype(np.float64)
        logits[[tok.pad_id, tok.bos_id]] = -np.inf
        logits[tok.vocab_size:] = -np.inf
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] == tok.eos_id:
            break
    assert got == [tok.decode(tokens)] * 4
    drawn = smiles_lm.sample(model, tok, 4, max_len=12, temperature=1.5, seed=1)
    assert drawn == smiles_lm.sample(model, tok, 4, max_len=12, temperature=1.5, seed=1) and len(set(drawn)) > 1
    with pytest.raises(ValueError, match="temperature=0"):
        smiles_lm.sample(model, tok, 2, max_len=8, temperature=0)


# --- the recipe through the CLI and the train loop ----------------------------------------------------------

TINY = ["--molecules", "1200", "--layers", "2", "--heads", "2", "--embed-dim", "32", "--mlp-dim", "64",
        "--seq-len", "48", "--batch-size", "16", "--warmup-steps", "5", "--no-progress"]


def test_cli_train_beats_the_unigram_baseline_and_scores_samples(tmp_path, capsys):
    assert cli.main(["train", "smiles-lm", "--out", str(tmp_path / "run"), "--steps", "60", "--lr", "5e-3",
                     "--eval-every", "30", "--save-every", "30", "--samples", "40", *TINY]) == 0
    out = capsys.readouterr().out
    ppl = float(re.search(r"validation loss [\d.]+, ppl ([\d.]+)", out).group(1))
    unigram = float(re.search(r"baseline unigram_ppl: ([\d.]+)", out).group(1))
    assert re.search(r"baseline ngram[345]_ppl: ", out)
    assert ppl < unigram, out
    assert "40 sampled SMILES scored by RDKit" in out
    rows = re.findall(r"\| (smiles-lm, temperature 0.7|smiles-lm, temperature 1.0|token \d-gram baseline) \| "
                      r"([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out)
    assert len(rows) == 3, out
    assert all(0.0 <= float(v) <= 1.0 for row in rows for v in row[1:])


def test_combined_technique_flags_train_on_eight_devices(tmp_path, capsys):
    """bf16, full remat, chunked attention, a 3-axis mesh with ZeRO-3 and gradient accumulation in one run
    (flash attention, compiled in Pallas interpret mode on CPU, is the slow parametrisation below)."""
    assert cli.main(["train", "smiles-lm", "--out", str(tmp_path / "run"), "--steps", "4", "--lr", "5e-3",
                     "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--samples", "0", *TINY, "--precision", "bf16",
                     "--remat", "full", "--attention", "chunked", "--mesh", "data=2,fsdp=2,tensor=2", "--zero", "3",
                     "--grad-accum", "2"]) == 0
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"validation loss ([\d.]+)", out)]
    first = float(re.search(r"step 2: train loss [\d.]+ +val_loss ([\d.]+)", out).group(1))
    assert math.isfinite(losses[-1]) and losses[-1] < first, out  # it learns between the two evaluations


def test_missing_rdkit_names_the_extra(tmp_path, monkeypatch, capsys):
    find_spec = sm.importlib.util.find_spec
    monkeypatch.setattr(sm.importlib.util, "find_spec", lambda name, *a: None if name == "rdkit" else find_spec(name, *a))
    assert cli.main(["train", "smiles-lm", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().err.strip() == 'sciscale: error: SMILES data needs rdkit: pip install -e ".[chem]"'


def _train(tmp_path, name, steps=4, resume=False, model=(), **over):
    args = ["smiles-lm", *TINY, *model]
    recipe, model_cfg, train_cfg = cli.build_configs(args)
    cfg = TrainConfig(**{**train_cfg.to_dict(), "steps": steps, "eval_every": 1000, "save_every": 2,
                         "log_every": 1, **over})
    return train(recipe, model_cfg, cfg, tmp_path / name, resume=resume, progress=False, log=lambda *_: None)


# ethanol, phenol and acetic acid twice each (the last as its sodium salt), paracetamol
MOLECULES = ["CCO", "OCC", "c1ccccc1O", "Oc1ccccc1", "CC(=O)Nc1ccc(O)cc1", "CC(=O)O", "[Na+].[O-]C(=O)C"]


def _smi(path, smiles):
    path.write_text("SMILES name\n" + "".join(f"{s} m{i}\n" for i, s in enumerate(smiles)))
    return path


def test_embed_gives_one_representation_per_molecule_whatever_its_smiles(tmp_path, monkeypatch):
    """Molecules are curated and written as the training corpus is, so two SMILES of one molecule
    (and a salt of it) get the same representation; batched and padded, each equals the
    molecule's hidden states computed alone; what the model cannot read is refused in one line."""
    recipe, model_cfg, _ = cli.build_configs(["smiles-lm", *TINY])
    model = recipe.build_model(model_cfg, nnx.Rngs(0))
    out = smiles_lm.embed(model_cfg, model, _smi(tmp_path / "m.smi", MOLECULES), batch_size=2)
    assert list(out["smiles"]) == MOLECULES and out["mean"].shape == (len(MOLECULES), model_cfg.embed_dim)
    canonical = list(out["canonical"])
    assert canonical[0] == canonical[1] == "CCO" and canonical[2] == canonical[3] and canonical[5] == canonical[6]
    assert canonical[2] == "OC1=CC=CC=C1"  # the run's Kekulé form
    tok = smiles_lm.tokenizer_of(model_cfg)
    for i, form in enumerate(canonical):
        ids = tok.encode(form)
        alone = np.asarray(model.hidden(ids[None]))[0]
        rows = out["per_token"][out["offsets"][i]:out["offsets"][i + 1]]
        np.testing.assert_allclose(rows, alone[1:-1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["last"][i], alone[-1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["mean"][i], alone[1:-1].mean(0), rtol=1e-5, atol=1e-5)
    assert np.abs(out["last"][0] - out["last"][2]).max() > 1e-3  # molecules told apart
    bad = {"C1CC": "RDKit cannot parse it, or it lies outside the training corpus",
           "C[Si](C)(C)C": "RDKit cannot parse it, or it lies outside the training corpus"}
    for smiles, match in bad.items():
        with pytest.raises(ValueError, match=match) as info:
            smiles_lm.embed(model_cfg, model, _smi(tmp_path / "bad.smi", ["CCO", smiles]))
        assert "molecule 2" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="molecule 1 .* 22 tokens with bos/eos exceed the model's max_len=16"):
        smiles_lm.embed(dataclasses.replace(model_cfg, max_len=16), model, _smi(tmp_path / "long.smi", ["C" * 20]))
    without_o = sm.SmilesTokenizer([t for t in tok.tokens[4:] if t != "O"])  # a vocabulary that lacks oxygen
    monkeypatch.setattr(smiles_lm, "tokenizer_of", lambda cfg: without_o)
    with pytest.raises(ValueError, match=r"molecule 1 \('CCO'\): tokens \['O'\] never occur in the training split"):
        smiles_lm.embed(model_cfg, model, _smi(tmp_path / "o.smi", ["CCO"]))


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_recipe_resumes_bit_identically_with_full_remat(tmp_path):
    full = _train(tmp_path, "full", model=["--remat", "full"])
    shutil.copytree(tmp_path / "full", tmp_path / "split")  # the same run, as if killed after its step-2 checkpoint
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "4")
    resumed = _train(tmp_path, "split", resume=True, model=["--remat", "full"])
    for a, b in zip(_leaves(full["state"]), _leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    # the trained model's molecule representations, saved by `sciscale embed`
    target = tmp_path / "emb.npz"
    assert cli.main(["embed", str(tmp_path / "full"), "--input", str(_smi(tmp_path / "m.smi", MOLECULES)),
                     "--out", str(target), "--batch-size", "4"]) == 0
    saved = np.load(target)
    assert saved["mean"].shape == saved["last"].shape == (len(MOLECULES), 32)
    loaded = load_run(tmp_path / "full", log=lambda *_: None)
    direct = smiles_lm.embed(loaded.model_config, loaded.model, tmp_path / "m.smi", batch_size=4)
    np.testing.assert_allclose(saved["last"], direct["last"], rtol=1e-6, atol=1e-6)
    plain = _train(tmp_path, "plain")  # remat changes memory, not the math
    for a, b in zip(_leaves(full["state"]), _leaves(plain["state"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("flags,over,rtol", [
    (["--attention", "chunked"], {}, 2e-4),
    (["--attention", "flash"], {}, 2e-4),
    ([], {"grad_accum": 2}, 2e-4),
    ([], {"mesh": "data=2,fsdp=2,tensor=2", "zero": 3}, 2e-4),
])
def test_techniques_match_the_plain_run(tmp_path, flags, over, rtol):
    plain = _train(tmp_path, "plain", steps=3)
    other = _train(tmp_path, "other", steps=3, model=flags, **over)
    for a, b in zip(_leaves(plain["state"]), _leaves(other["state"])):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-5)
    assert other["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_bf16_trains_close_to_fp32(tmp_path):
    plain = _train(tmp_path, "plain", steps=8)
    bf16 = _train(tmp_path, "bf16", steps=8, model=["--precision", "bf16"])
    assert math.isfinite(bf16["val_loss"]) and bf16["val_loss"] == pytest.approx(plain["val_loss"], rel=0.05)


def _example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "smiles_lm.py"
    spec = importlib.util.spec_from_file_location("smiles_lm_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_example_script_trains_samples_and_scores(tmp_path, capsys):
    import json

    assert _example().main([*TINY, "--steps", "20", "--samples", "24", "--out", str(tmp_path / "run"),
                            "--json", str(tmp_path / "figures.json")]) == 0
    out = capsys.readouterr().out
    assert "| smiles-lm, temperature 0.7 |" in out and "-gram baseline |" in out
    figures = json.loads((tmp_path / "figures.json").read_text())
    for who in ("model", "model_t1", "ngram"):
        assert all(0.0 <= figures[who][k] <= 1.0 for k in ("validity", "uniqueness", "novelty"))


@pytest.mark.slow
def test_example_script_in_its_default_form(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its run directory goes under runs/
    assert _example().main(["--no-progress"]) == 0
    out = capsys.readouterr().out
    validity = float(re.search(r"\| smiles-lm, temperature 0.7 \| ([\d.]+) \|", out).group(1))
    ngram = float(re.search(r"-gram baseline \| ([\d.]+) \|", out).group(1))
    assert validity > ngram, out


AROMATIC = ["c1ccccc1", "c1ccc2[nH]ccc2c1", "Cc1ncc(C(=O)O)o1", "O=[N+]([O-])c1ccc(Cl)cc1", "Nc1nccs1",
            "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "c1ccc2cc3ccccc3cc2c1", "Oc1ccc(-c2ccncc2)cc1", "c1cc[se]c1"]


def test_kekule_form_is_the_same_molecule_without_aromatic_atoms():
    from rdkit import Chem

    for s in AROMATIC:
        kek = sm.to_form(s, "kekule")
        raw = Chem.MolFromSmiles(kek, sanitize=False)  # as written, before RDKit perceives aromaticity
        assert not any(a.GetIsAromatic() for a in raw.GetAtoms()), kek
        assert not any(b.GetBondType() == Chem.BondType.AROMATIC for b in raw.GetBonds()), kek
        assert not re.search(r"[bcnops]|\[[0-9]*(se|as|te|[bcnops])", kek.replace("Cl", "").replace("[Se]", ""))
        assert "=" in kek and ":" not in kek
        # the same molecule: equal canonical aromatic SMILES and InChI as RDKit writes them from the input
        assert Chem.MolToSmiles(Chem.MolFromSmiles(kek)) == Chem.MolToSmiles(Chem.MolFromSmiles(s))
        assert Chem.MolToInchi(Chem.MolFromSmiles(kek)) == Chem.MolToInchi(Chem.MolFromSmiles(s))
        assert sm.to_form(kek, "kekule") == kek  # canonical: one string per molecule
        assert sm.to_form(kek, "aromatic") == Chem.MolToSmiles(Chem.MolFromSmiles(s))
    with pytest.raises(ValueError, match="form='smarts' must be one of"):
        sm.to_form("CCO", "smarts")
    with pytest.raises(ValueError, match="smiles_form='smarts' must be one of"):
        smiles_lm.SmilesLMConfig(vocab_size=40, smiles_form="smarts")


def test_kekule_pack_has_its_own_key_and_aligns_with_the_aromatic_list(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCISCALE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "mols.smi"
    src.write_text("\n".join(AROMATIC + ["CCO", "OCC"]) + "\n")
    arom = sm.load_molecules([src])
    kek = sm.load_molecules([src], form="kekule")
    assert len(_packs(tmp_path / "cache")) == 2
    from rdkit import Chem

    assert len(kek) == len(arom) == len(AROMATIC)  # ethanol once; curation drops selenophene (Se)
    for k, a in zip(kek, arom):  # molecule i is the same in both forms
        assert Chem.MolToSmiles(Chem.MolFromSmiles(k)) == a and not re.search(r"[cnos]", k.replace("Cl", ""))
    # the split hashes the aromatic SMILES: both forms put the same molecules on each side
    tr_a, va_a = sm.split_by_hash(arom, 0.3)
    tr_k, va_k = sm.split_by_hash(kek, 0.3, keys=arom)
    assert [arom[kek.index(k)] for k in tr_k] == tr_a and [arom[kek.index(k)] for k in va_k] == va_a
    with pytest.raises(ValueError, match="keys has 1 entries for 2 SMILES"):
        sm.split_by_hash(["C", "CC"], 0.5, keys=["C"])


def test_kekule_corpus_holds_the_aromatic_corpus_molecules_on_the_same_sides():
    from rdkit import Chem

    kek = smiles_lm.build_corpus(64, molecules=400, form="kekule")
    aro = smiles_lm.build_corpus(64, molecules=400, form="aromatic")
    assert not any(re.fullmatch(r"[bcnops]|\[[0-9]*[a-z].*\]", t) for t in kek.tokenizer.tokens[4:])
    canonical = [Chem.MolToSmiles(Chem.MolFromSmiles(k)) for k in kek.train_smiles]
    assert np.array_equal(np.sort(np.array([sp.smiles_hash(c) for c in canonical], np.uint64)), kek.train_hashes())
    # same split: every Kekulé training molecule is an aromatic training molecule (the longer Kekulé
    # strings drop a few more at seq_len 64), and no validation molecule crosses sides
    assert set(canonical) <= set(aro.train_smiles)
    val_aromatic = {Chem.MolToSmiles(Chem.MolFromSmiles(k)) for k in kek.val_smiles}
    assert val_aromatic <= set(aro.val_smiles) and not val_aromatic & set(aro.train_smiles)


def test_gzipped_csv_with_a_smiles_header_reads_its_first_column(tmp_path):
    import gzip

    path = tmp_path / "set.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("SMILES,SPLIT\nCCO,train\n\"c1ccccc1O\",test\n\nCC(=O)N,train\n")
    assert sm.read_smiles_file(path) == ["CCO", "c1ccccc1O", "CC(=O)N"]


def test_moses_corpus_without_molsets_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "moses" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install molsets --no-deps"):
        smiles_lm.build_corpus(64, molecules=100, corpus="moses")
    with pytest.raises(ValueError, match="corpus=''"):
        smiles_lm.SmilesLMConfig(vocab_size=64, corpus="")
    with pytest.raises(ValueError, match="^--corpus zinc: no such file or folder$"):  # neither shipped nor a path
        smiles_lm.build_corpus(64, molecules=100, corpus="zinc")


def test_moses_corpus_reads_only_its_first_molecules(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("moses") is None:
        pytest.skip("the optional MOSES data needs molsets: pip install molsets --no-deps")
    from rdkit import Chem

    monkeypatch.setenv("SCISCALE_CACHE", str(tmp_path))
    raw = sm.load_moses("train")[:400]
    mols = sm.load_molecules(sm.moses_smiles_files(), limit=300)
    assert len(mols) == len(set(mols)) == 300
    # MOSES molecules are neutral single fragments: curation keeps them as RDKit's canonical SMILES
    expected = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in raw]
    assert mols == list(dict.fromkeys(expected))[:300]
    corpus = smiles_lm.build_corpus(64, molecules=300, corpus="moses", form="aromatic")
    assert len(corpus.train_smiles) + len(corpus.val_smiles) + corpus.dropped == 300
    assert set(corpus.train_smiles) <= set(mols) and not set(corpus.train_smiles) & set(corpus.val_smiles)
