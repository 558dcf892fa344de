"""Training on the user's own data files: protein-mlm ``--data`` (FASTA), msa-evoformer
``--alignments`` (Stockholm / aligned FASTA / A3M), smiles-lm ``--corpus`` (SMILES files).

Each recipe reads exactly the files named (plain or gzip, files and folders), splits them as
its docstring states (checked here with the rule written out independently), records each
file's SHA-256 in ``run_config.json`` (checked against ``hashlib``), and refuses in one line,
before anything on disk changes, to resume or evaluate a run on a file changed since; a run
restored from an unchanged file resumes. Bad files are refused in one line before training.
"""

import gzip
import hashlib
import json
import os
import pathlib
import re
import shutil
import zlib

import numpy as np
import pytest

from sciscale_jax import cli
from sciscale_jax.data import load_molecules, load_proteins
from sciscale_jax.data import msa as msa_data
from sciscale_jax.recipes import get_recipe, load_run

PROTEIN_TINY = ["--layers", "1", "--embed-dim", "32", "--heads", "2", "--mlp-dim", "64", "--seq-len", "32",
                "--batch-size", "4", "--eval-every", "2", "--save-every", "2", "--warmup-steps", "1", "--no-progress"]
MSA_TINY = ["--c-m", "16", "--c-z", "8", "--msa-heads", "2", "--msa-head-dim", "4", "--pair-heads", "2",
            "--pair-head-dim", "4", "--opm-channels", "4", "--tri-mul-channels", "8", "--num-blocks", "1",
            "--num-seq", "6", "--seq-len", "12", "--batch-size", "4", "--eval-every", "2", "--save-every", "2",
            "--warmup-steps", "1", "--no-progress"]
SMILES_TINY = ["--layers", "1", "--heads", "2", "--embed-dim", "32", "--mlp-dim", "64", "--seq-len", "48",
               "--batch-size", "8", "--samples", "0", "--eval-every", "2", "--save-every", "2", "--warmup-steps", "1",
               "--no-progress"]


def _sha(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _saved(run) -> dict:
    return json.loads((run / "run_config.json").read_text())


def _checkpoints(run) -> list:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _one_line_error(capsys) -> str:
    """The error line; a line before it saying new files are being packed is progress, not the error."""
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                    if not line.startswith("sciscale: packing "))
    assert err.startswith("sciscale: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_protein_mlm_trains_on_fasta_files_and_refuses_them_changed(tmp_path, capsys):
    proteins = load_proteins()[:300]
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    with gzip.open(data / "a.fasta.gz", "wt") as f:  # a gzip file and a folder of FASTA files
        f.write("".join(f">p{i} some description\n{s[:60]}\n{s[60:]}*\n" for i, s in enumerate(proteins[:180])))
    (data / "more" / "b.faa").write_text("".join(f">q{i}\n{s.lower()}\n" for i, s in enumerate(proteins[180:])))
    (data / "more" / "notes.txt").write_text("not a FASTA file, and not read: only FASTA suffixes are\n")
    spec = f"{data / 'a.fasta.gz'},{data / 'more'}"
    run = tmp_path / "run"
    argv = ["train", "protein-mlm", "--out", str(run), "--data", spec, *PROTEIN_TINY]
    assert cli.main([*argv, "--steps", "2"]) == 0
    out = capsys.readouterr().out
    # CRC32 buckets below 10% of 10,000 are held out (recipes.protein_mlm's split, written out here).
    held = sum(zlib.crc32(s.encode()) % 10_000 < 1_000 for s in proteins)
    assert f"data: 300 proteins from 2 file(s) of --data: {300 - held} for training, {held} held out" in out
    assert 0 < held < 300
    # Packed once into the cache folder (tests/conftest.py points SCISCALE_CACHE at a temporary one).
    pack = pathlib.Path(re.search(r"; packed in (\S+)", out).group(1))
    assert pack.parent == pathlib.Path(os.environ["SCISCALE_CACHE"]) / "proteins"
    assert json.loads((pack / "meta.json").read_text())["proteins"] == 300
    files = {str((data / "a.fasta.gz").resolve()): _sha(data / "a.fasta.gz"),
             str((data / "more" / "b.faa").resolve()): _sha(data / "more" / "b.faa")}
    assert _saved(run)["data_files"] == files
    assert _saved(run)["model"]["data"] == spec

    before = (_saved(run), _checkpoints(run))
    with open(data / "more" / "b.faa", "a") as f:  # one more protein in a file the run read
        f.write(">extra\nMKVLAAGIVGLLLAAAQA\n")
    packs = sorted(pack.parent.iterdir())
    assert cli.main([*argv, "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()  # refused before the changed files are read (packed): one line
    assert err.startswith("sciscale: error: ") and "\n" not in err
    assert "holds a different run" in err and "b.faa" in err and files[str((data / "more" / "b.faa").resolve())] in err
    assert (_saved(run), _checkpoints(run)) == before and sorted(pack.parent.iterdir()) == packs  # nothing changed
    assert cli.main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()  # refused before the changed files are read (packed): one line
    assert err.startswith("sciscale: error: ") and "\n" not in err and sorted(pack.parent.iterdir()) == packs
    assert re.search(r"trained on other data: .*b\.faa changed \(sha256 \w{12}\.\.\. when the run trained", err), err
    # Evaluating on data the user names anew is their choice: the held-out part of a.fasta.gz.
    assert cli.main(["eval", str(run), "--data", str(data / "a.fasta.gz")]) == 0
    assert "validation loss" in capsys.readouterr().out

    (data / "more" / "b.faa").write_text("".join(f">q{i}\n{s.lower()}\n" for i, s in enumerate(proteins[180:])))
    assert cli.main([*argv, "--steps", "4", "--resume"]) == 0  # the same bytes again: resumes
    assert _checkpoints(run)[-1] == "4"


@pytest.mark.parametrize("files, match", [
    ({}, r"--data .*/missing.fasta: no such file or folder"),
    ({"empty": None}, r"--data .*/empty: the folder holds no \.fasta/.* files"),
    ({"x.fasta": b"\x89PNG\r\n\x1a\n\x00\xff"}, r"x\.fasta is not a FASTA text file"),
    ({"x.fasta.gz": b"plain text, not gzip"}, r"x\.fasta\.gz is not a readable gzip file"),
    ({"x.fasta": b"id,sequence\n1,MKV\n"}, r"x\.fasta is not a FASTA file: line 1 comes before any '>' header"),
    ({"x.fasta": b">a\nMKVLA\n"}, r"1 protein\(s\) split into 1 for training and 0 for validation"),
])
def test_protein_mlm_refuses_bad_data_files_in_one_line(tmp_path, capsys, files, match):
    for name, content in files.items():
        if content is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(content)
    spec = str(tmp_path / (next(iter(files)) if files else "missing.fasta"))
    out = tmp_path / "run"
    assert cli.main(["train", "protein-mlm", "--out", str(out), "--data", spec, *PROTEIN_TINY, "--steps", "2"]) == 2
    assert re.search(match, _one_line_error(capsys))
    assert not out.exists()


def _a3m(tokens: np.ndarray, rng) -> str:
    """The alignment as A3M: some rows carry insertions (lower-case residues) between columns."""
    letters = np.array(list(msa_data.AMINO + "X-"))
    lines = []
    for i, row in enumerate(tokens):
        text = list(letters[row])
        if i and i % 2 == 0:
            for at in sorted(rng.choice(len(text), 3, replace=False))[::-1]:
                text.insert(int(at), "".join(rng.choice(list("acdefgh"), int(rng.integers(1, 4)))))
        lines += [f">row{i}", "".join(text)]
    return "\n".join(lines) + "\n"


def test_a3m_insertions_are_dropped_and_lower_case_fasta_residues_kept(tmp_path):
    rng = np.random.default_rng(0)
    tokens = msa_data.load_alignments(include_pyfamsa=False)["LuxC"][:12, :40]
    letters = np.array(list(msa_data.AMINO + "X-"))
    (tmp_path / "f.afa").write_text("".join(f">r{i}\n{''.join(letters[row])}\n" for i, row in enumerate(tokens)))
    text = _a3m(tokens, rng)
    assert len({len(line) for line in text.splitlines()[1::2]}) > 1  # the insertions made rows unequal
    (tmp_path / "f.a3m").write_text(text)
    with gzip.open(tmp_path / "g.a3m.gz", "wt") as f:
        f.write(text)
    for name in ("f.afa", "f.a3m", "g.a3m.gz"):
        np.testing.assert_array_equal(msa_data.read_alignment(tmp_path / name), tokens)
    # Equal-length FASTA rows in lower case are residues (FAMSA writes them so), not insertions.
    (tmp_path / "lower.afa").write_text("".join(f">r{i}\n{''.join(letters[row]).lower()}\n"
                                                for i, row in enumerate(tokens)))
    np.testing.assert_array_equal(msa_data.read_alignment(tmp_path / "lower.afa"), tokens)


def test_held_out_families_follow_the_name_hash_whatever_the_order():
    names = [f"PF{i:05d}" for i in range(40)]
    held = msa_data.pick_held_out(names)
    assert held == msa_data.pick_held_out(names[::-1])
    assert set(held) == {n for n in names if zlib.crc32(n.encode()) % 10_000 < 1_000}
    assert 0 < len(held) < len(names)
    two = ["LuxC", "KR-6"]  # neither hashes under 10%: the lower bucket is held out, the other trains
    assert len(msa_data.pick_held_out(two)) == 1
    assert msa_data.pick_held_out(two, val_fraction=0.99) in (("LuxC",), ("KR-6",))
    with pytest.raises(ValueError, match="1 alignment family given .*at least two"):
        msa_data.pick_held_out(["LuxC"])


def test_msa_evoformer_trains_on_alignment_files_and_refuses_them_changed(tmp_path, capsys):
    shipped = msa_data.load_alignments(include_pyfamsa=False)
    base = msa_data._package_data("pyhmmer", "science")
    folder = tmp_path / "alignments"
    folder.mkdir()
    for rel in msa_data.PYHMMER_ALIGNMENTS[:2]:
        shutil.copy(base / rel, folder / pathlib.Path(rel).name)
    p12748 = shipped["p12748-3"][:40]
    with gzip.open(folder / "p12748.a3m.gz", "wt") as f:
        f.write(_a3m(p12748, np.random.default_rng(1)))
    run = tmp_path / "run"
    argv = ["train", "msa-evoformer", "--out", str(run), "--alignments", str(folder), "--held-out", "p12748",
            *MSA_TINY]
    assert cli.main([*argv, "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "data: 3 alignment families from --alignments; training on KR-6, LuxC; held out p12748" in out
    assert _saved(run)["data_files"] == {str(p.resolve()): _sha(p) for p in folder.iterdir()}
    # Validation reads the held-out A3M file alone: each example's query (row 0 of its true tokens)
    # is a window of the residues of one of that file's rows.
    data = get_recipe("msa-evoformer").build_data(*_configs(run))
    rows = [row[row != msa_data.GAP_ID] for row in p12748]
    for batch in data.eval[:2]:
        for target, seq_mask in zip(batch["target"][:, 0], batch["seq_mask"]):
            crop = target[seq_mask > 0]
            assert any(np.array_equal(crop, row[i:i + len(crop)])
                       for row in rows for i in range(len(row) - len(crop) + 1))

    before = (_saved(run), _checkpoints(run))
    luxc = folder / "LuxC.sto"
    luxc.write_text(luxc.read_text().replace("# STOCKHOLM 1.0", "# STOCKHOLM 1.0\n#=GF ID LuxC", 1))
    assert cli.main([*argv, "--steps", "4", "--resume"]) == 2
    assert "LuxC.sto" in _one_line_error(capsys)
    assert (_saved(run), _checkpoints(run)) == before

    assert cli.main(["train", "msa-evoformer", "--out", str(tmp_path / "r2"), "--alignments", str(folder),
                     "--held-out", "KR-6,LuxC,p12748", *MSA_TINY, "--steps", "2"]) == 2
    assert "leaves no family to train on" in _one_line_error(capsys)
    shutil.copy(folder / "KR-6.sto", tmp_path / "KR-6.afa.sto")
    assert cli.main(["train", "msa-evoformer", "--out", str(tmp_path / "r2"), "--alignments",
                     f"{folder},{tmp_path / 'KR-6.afa.sto'}", *MSA_TINY, "--steps", "2"]) == 2
    assert "have the same family name 'KR-6'" in _one_line_error(capsys)
    assert not (tmp_path / "r2").exists()


def _configs(run):
    from sciscale_jax.train import TrainConfig
    saved = _saved(run)
    return TrainConfig(**saved["train"]), get_recipe(saved["recipe"]).config_class(**saved["model"])


def test_smiles_lm_trains_on_smiles_files_and_loads_only_with_its_vocabulary_unchanged(tmp_path, capsys):
    molecules = load_molecules()[:300]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.smi").write_text("SMILES name\n" + "".join(f"{m} mol{i}\n" for i, m in enumerate(molecules[:200])))
    with gzip.open(folder / "b.csv.gz", "wt") as f:
        f.write("smiles,activity\n" + "".join(f'"{m}",{i}\n' for i, m in enumerate(molecules[200:])))
    run = tmp_path / "run"
    assert cli.main(["train", "smiles-lm", "--out", str(run), "--corpus", str(folder), *SMILES_TINY,
                     "--steps", "2"]) == 0
    out = capsys.readouterr().out
    counts = re.search(r"data: (\d+) curated molecules from 2 file\(s\) of --corpus: (\d+) for training, (\d+) held "
                       r"out, (\d+) longer than seq_len left out", out)
    assert counts and int(counts.group(1)) == 300, out  # the rdkit corpus is curated and distinct already
    assert int(counts.group(2)) + int(counts.group(3)) + int(counts.group(4)) == 300
    assert set(_saved(run)["data_files"]) == {str((folder / n).resolve()) for n in ("a.smi", "b.csv.gz")}

    # A run started from this one must number its tokens alike: half the corpus counts them otherwise.
    assert cli.main(["train", "smiles-lm", "--out", str(tmp_path / "tuned"), "--corpus", str(folder / "a.smi"),
                     "--init-from", str(run), *SMILES_TINY, "--steps", "2"]) == 2
    err = _one_line_error(capsys)
    assert re.search(r"--init-from .*: its vocabulary \(\d+ tokens\) is not this run's \(\d+; first difference at id "
                     r"\d+\): smiles-lm builds it from the training data", err), err
    assert not (tmp_path / "tuned").exists()
    future = tmp_path / "future"  # a run saved by a later version, with a setting this one does not know
    shutil.copytree(run, future)
    saved = _saved(future)
    saved["model"]["new_knob"] = 1
    (future / "run_config.json").write_text(json.dumps(saved))
    assert cli.main(["train", "smiles-lm", "--out", str(tmp_path / "tuned"), "--corpus", str(folder),
                     "--init-from", str(future), *SMILES_TINY, "--steps", "2"]) == 2
    err = _one_line_error(capsys)
    assert "its model settings cannot be read" in err and "new_knob" in err, err
    assert not (tmp_path / "tuned").exists()

    query = tmp_path / "q.smi"
    query.write_text("CCO\nOCC\n")
    assert cli.main(["embed", str(run), "--input", str(query), "--out", str(tmp_path / "e.npz")]) == 0
    emb = np.load(tmp_path / "e.npz")
    np.testing.assert_allclose(emb["mean"][0], emb["mean"][1], atol=1e-6)  # one molecule, two SMILES

    with open(folder / "a.smi", "a") as f:  # the vocabulary is built from these files
        f.write("ClC(Cl)(Cl)Br extra\n")
    assert cli.main(["embed", str(run), "--input", str(query), "--out", str(tmp_path / "e2.npz")]) == 2
    err = _one_line_error(capsys)
    assert "builds its vocabulary from the training data" in err and "a.smi changed" in err
    assert not (tmp_path / "e2.npz").exists()
    with pytest.raises(ValueError, match="a.smi changed"):
        load_run(run)
    (folder / "a.smi").unlink()
    with pytest.raises(ValueError, match="a.smi is gone"):
        load_run(run)
