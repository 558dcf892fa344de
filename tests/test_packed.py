"""Packed corpora (``sciscale_jax.data.packed``, ``data.cache``, ``msa.packed_alignments``): a
protein pack holds exactly the proteins, split and unigram counts of the plain in-memory reader
(``protein.read_fasta`` + ``split_by_sequence`` + ``ProteinTokenizer.encode``), whatever the block
size the file is read in; bad files are refused in one line as the reader refuses them; the
cache is keyed by content, read back without packing again, packed anew when damaged, written
by one of several processes starting at once, and a writer killed mid-pack leaves nothing a
later run reads. Packed alignments hold what ``read_alignment`` reads and give the same batches.
"""

import gzip
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
import zlib

import numpy as np
import pytest

from sciscale_jax.data import ProteinTokenizer, load_proteins, msa, packed, split_by_sequence
from sciscale_jax.data.mlm import MLMBatches
from sciscale_jax.recipes import msa_evoformer, protein_mlm

TOK = ProteinTokenizer(unknown="x")


def _messy_files(folder: pathlib.Path, proteins) -> list[pathlib.Path]:
    """Four FASTA files in the forms found in the wild: gzip with wrapped lines and stops, CRLF
    and lower case with blank lines, headers without sequences, a stop-only record, symbols
    outside the alphabet (inner stop, '?', 'J', a digit), a missing final newline, CR line ends
    and headers indented by white space."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b, c = folder / "a.fasta.gz", folder / "b.faa", folder / "c.fa"
    with gzip.open(a, "wt") as f:
        f.write("".join(f">p{i} a description\n{s[:60]}\n{s[60:]}*\n" for i, s in enumerate(proteins[:70])))
    b.write_bytes("".join(f">q{i}\r\n{s.lower()}\r\n\r\n" for i, s in enumerate(proteins[70:120])).encode()
                  + b">empty\n>stars\n**\n>odd\nMK*Z?J1\n  \n>dup\n" + proteins[0].encode() + b"\n")
    c.write_text("\n\n" + "".join(f">r{i}\n{s}\n" for i, s in enumerate(proteins[120:140])) + ">last\nMKVL")
    d = folder / "d.fas"  # classic Mac OS line ends (CR only) and headers after white space
    d.write_bytes("".join(f"  >t{i}\r{s[:30]}\r{s[30:]}\r" for i, s in enumerate(proteins[140:150])).encode())
    return [a, b, c, d]


@pytest.fixture(scope="module")
def proteins():
    return load_proteins()[:150]


@pytest.mark.parametrize("block", [1 << 24, 5, 97])
def test_pack_holds_what_the_plain_reader_reads(tmp_path, proteins, monkeypatch, block):
    paths = _messy_files(tmp_path, proteins)
    monkeypatch.setattr(packed, "BLOCK", block)  # records and lines cut across blocks
    pack = packed.pack_fasta(paths, TOK)
    sequences = [s for p in paths for s in load_proteins(p)]
    assert len(pack) == len(sequences) == 150 + 3  # odd, dup, last
    train, val = pack.split(0.3)
    plain_train, plain_val = split_by_sequence(sequences, 0.3)
    assert [t.tolist() for t in train] == [TOK.encode(s, add_special=True).tolist() for s in plain_train]
    assert [t.tolist() for t in val] == [TOK.encode(s, add_special=True).tolist() for s in plain_val]
    assert 0 < len(val) < len(pack)
    # The duplicate of protein 0 lands on protein 0's side of the split.
    assert sum(np.array_equal(t, TOK.encode(proteins[0], add_special=True)) for t in (val if
               zlib.crc32(proteins[0].encode()) % 10_000 < 3_000 else train)) == 2
    assert {"MKVL", "MKXZXXX"} <= {TOK.decode(t) for t in [*train, *val]}  # no final newline; odd symbols
    for side, plain in ((False, plain_train), (True, plain_val)):
        counts = sum(np.bincount(TOK.encode(s, add_special=True), minlength=TOK.vocab_size) for s in plain)
        assert np.array_equal(pack.token_counts(0.3, held_out=side), counts)
    assert np.array_equal(train.lengths(), [len(s) + 2 for s in plain_train])
    assert [t.tolist() for t in train[2:9:3]] == [train[i].tolist() for i in (2, 5, 8)]


def test_batches_from_a_pack_on_disk_equal_batches_from_a_list(tmp_path, proteins):
    paths = _messy_files(tmp_path / "data", proteins)
    pack, _ = packed.packed_proteins(paths, TOK, cache=tmp_path / "cache")
    assert isinstance(pack.tokens, pathlib.Path) and pack.folder.parent == tmp_path / "cache" / "proteins"
    train, _ = pack.split(0.1)
    as_list = [train[i] for i in range(len(train))]
    a, b = MLMBatches(train, TOK, batch_size=6, seq_len=40, seed=2), MLMBatches(as_list, TOK, batch_size=6,
                                                                                 seq_len=40, seed=2)
    for step in (0, 7):
        for key, value in a.batch(step).items():
            np.testing.assert_array_equal(value, b.batch(step)[key])
    for key, value in a.batch_rows(3, 1, 4).items():
        np.testing.assert_array_equal(value, b.batch_rows(3, 1, 4)[key])


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG\r\n\x1a\n\x00\xff", r"x\.fasta is not a FASTA text file \(byte 0x89 at offset 0"),
    (b">a\nMKV\n\x00\n", r"x\.fasta is not a FASTA text file \(it holds NUL bytes\)"),
    (b">a\nMKV\n>b \xe9\n", r"x\.fasta is not a FASTA text file \(byte 0xe9 at offset 10 is not UTF-8"),
    (b"\n\n  \nid,sequence\n1,MKV\n", r"x\.fasta is not a FASTA file: line 4 comes before any '>' header "
                                       r"\('id,sequence'\)"),
    (b"", r"x\.fasta holds no protein sequences"),
    (b">a\n>b\n\n>c\n***\n", r"x\.fasta holds no protein sequences"),
])
@pytest.mark.parametrize("block", [1 << 24, 3])
def test_bad_files_are_refused_in_one_line(tmp_path, monkeypatch, content, match, block):
    monkeypatch.setattr(packed, "BLOCK", block)
    path = tmp_path / "x.fasta"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        packed.pack_fasta([path], TOK)
    assert "\n" not in str(err.value)


def test_broken_gzip_and_missing_files_are_refused(tmp_path):
    bad = tmp_path / "x.fasta.gz"
    bad.write_bytes(gzip.compress(b">a\nMKVLA\n" * 100)[:-30])  # cut short
    with pytest.raises(ValueError, match=r"x\.fasta\.gz is not a readable gzip file"):
        packed.pack_fasta([bad], TOK)
    with pytest.raises(ValueError, match=r"nope\.fasta: no such file"):
        packed.pack_fasta([tmp_path / "nope.fasta"], TOK)


def test_cache_is_keyed_by_content_and_read_back_without_packing(tmp_path, proteins, monkeypatch, capsys):
    cache = tmp_path / "cache"
    paths = _messy_files(tmp_path / "data", proteins)
    first, sources = packed.packed_proteins(paths, TOK, cache=cache)
    assert "sciscale: packing 4 FASTA file(s)" in capsys.readouterr().err
    assert list(sources) == [str(p.resolve()) for p in paths]
    assert json.loads((first.folder / "meta.json").read_text())["proteins"] == 153
    assert json.loads((first.folder / "sources.json").read_text()) == sources

    def no_packing(*args, **kwargs):
        raise AssertionError("packed again")

    # The same contents under other names: read back from the cache, nothing packed.
    moved = tmp_path / "moved"
    moved.mkdir()
    renamed = [moved / f"{i}{''.join(p.suffixes)}" for i, p in enumerate(paths)]
    for src, dst in zip(paths, renamed):
        dst.write_bytes(src.read_bytes())
    with monkeypatch.context() as m:
        m.setattr(packed, "pack_fasta", no_packing)
        again, _ = packed.packed_proteins(renamed, TOK, cache=cache)
    assert again.folder == first.folder and capsys.readouterr().err == ""
    assert [t.tolist() for t in again.proteins()] == [t.tolist() for t in first.proteins()]

    # A changed file is another pack; the old one stays for the runs that trained on it.
    with open(paths[-1], "a") as f:
        f.write("\n>new\nMKKLLPT\n")
    changed, _ = packed.packed_proteins(paths, TOK, cache=cache)
    assert changed.folder != first.folder and len(changed) == 154 and (first.folder / "meta.json").exists()
    assert changed.proteins()[153].tolist() == TOK.encode("MKKLLPT", add_special=True).tolist()
    # Another order of the same files is another corpus order: another pack.
    assert packed.packed_proteins(paths[::-1], TOK, cache=cache)[0].folder not in (first.folder, changed.folder)


@pytest.mark.parametrize("damage", ["truncated tokens", "bad meta", "no meta", "other format"])
def test_a_damaged_pack_is_packed_anew(tmp_path, proteins, damage):
    cache = tmp_path / "cache"
    paths = _messy_files(tmp_path / "data", proteins)
    good, _ = packed.packed_proteins(paths, TOK, cache=cache)
    expected = [t.tolist() for t in good.proteins()]
    folder = good.folder
    del good
    if damage == "truncated tokens":
        with open(folder / "tokens.bin", "r+b") as f:
            f.truncate(100)
    elif damage == "bad meta":
        (folder / "meta.json").write_text("{not json")
    elif damage == "no meta":
        (folder / "meta.json").unlink()
    else:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "format": packed.FORMAT + 1}))
    again, _ = packed.packed_proteins(paths, TOK, cache=cache)
    assert again.folder == folder
    assert [t.tolist() for t in again.proteins()] == expected


def test_a_failed_pack_leaves_nothing_and_a_killed_writer_is_cleaned_up(tmp_path, proteins, monkeypatch):
    cache = tmp_path / "cache"
    paths = _messy_files(tmp_path / "data", proteins)
    calls = []

    def failing_emit(*args):
        calls.append(1)
        if len(calls) > 2:
            raise OSError("disk full")
        return real_emit(*args)

    real_emit = packed._emit
    with monkeypatch.context() as m:
        m.setattr(packed, "_emit", failing_emit)
        m.setattr(packed, "BLOCK", 64)
        with pytest.raises(ValueError, match=r"writing the cache folder .* failed \(disk full\); free space "
                                             r"there or set SCISCALE_CACHE to another folder$"):
            packed.packed_proteins(paths, TOK, cache=cache)
    assert [p.name for p in (cache / "proteins").iterdir() if not p.name.endswith(".lock")] == []

    # A writer killed mid-pack (SIGKILL: no clean-up runs) leaves its partial folder behind.
    big = tmp_path / "big.fasta"
    big.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(load_proteins() * 3)))
    script = textwrap.dedent(f"""
        from sciscale_jax.data import ProteinTokenizer, packed
        packed.BLOCK = 256
        packed.packed_proteins([{str(big)!r}], ProteinTokenizer(unknown="x"), cache={str(cache)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while time.time() < deadline:
        partial = [p for p in (cache / "proteins").glob("*.partial.*") if (p / "tokens.bin").exists()
                   and (p / "tokens.bin").stat().st_size > 0]
        if partial or proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial, "the writer finished before it could be killed"
    assert not [p for p in (cache / "proteins").iterdir() if ".partial." not in p.name
                and not p.name.endswith(".lock")]  # no pack to read
    # A live writer's partial folder (this process's pid) is left alone; the dead one's is removed.
    live = cache / "proteins" / f"{partial[0].name.split('.')[0]}.partial.live"
    live.mkdir()
    (live / "writer.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    pack, _ = packed.packed_proteins([big], TOK, cache=cache)
    assert len(pack) == 3 * len(load_proteins())
    assert not partial[0].exists() and live.exists()


def test_processes_starting_at_once_pack_once(tmp_path):
    """The processes of a multi-process run build their data at once: one packs, the others wait
    for its pack and read it."""
    cache, big = tmp_path / "cache", tmp_path / "big.fasta"
    big.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(load_proteins() * 2)))
    script = textwrap.dedent(f"""
        from sciscale_jax.data import ProteinTokenizer, packed
        packed.BLOCK = 1024
        real = packed.pack_fasta
        def spy(*args):
            print("packing", flush=True)
            return real(*args)
        packed.pack_fasta = spy
        pack, _ = packed.packed_proteins([{str(big)!r}], ProteinTokenizer(unknown="x"), cache={str(cache)!r})
        print(pack.folder, len(pack))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].split("\n") for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(line == "packing" for out in outs for line in out) == 1, outs
    results = {next(line for line in out if line.startswith("/")) for out in outs}
    assert len(results) == 1 and results.pop().endswith(f" {2 * len(load_proteins())}")


def test_recipe_scores_an_evenly_spaced_share_of_a_large_held_out_split(tmp_path, proteins):
    paths = _messy_files(tmp_path / "data", proteins)
    spec = ",".join(map(str, paths))
    train_cfg = types.SimpleNamespace(batch_size=4, seq_len=24, seed=0)
    cfg = protein_mlm.ProteinMLMConfig(vocab_size=32, data=spec, val_fraction=0.5, val_sequences=7)
    data = protein_mlm.build_data(train_cfg, cfg)
    sequences = [s for p in paths for s in load_proteins(p)]
    _, plain_val = split_by_sequence(sequences, 0.5)
    assert len(plain_val) > 7
    picked = [plain_val[int(i)] for i in np.linspace(0, len(plain_val) - 1, 7).round()]
    assert f"{len(plain_val)} held out (7 of them scored)" in data.summary
    # Each evaluation pass holds the 7 picked proteins once, in order, then weightless padding rows.
    rows = data.eval[0]["targets"]
    for row, protein in zip(rows, picked):
        ids = TOK.encode(protein, add_special=True)
        window = row[row != TOK.pad_id]
        assert any(np.array_equal(window, ids[o:o + len(window)]) for o in range(len(ids) - len(window) + 1))
    assert (data.eval[0]["mask"][7:] == 0).all()
    with pytest.raises(ValueError, match="val_sequences=0 must be a positive integer"):
        protein_mlm.ProteinMLMConfig(vocab_size=32, val_sequences=0)


# --- packed alignments (msa-evoformer --alignments) ---------------------------------------------------------

def _alignment_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Stockholm (plain and gzip), aligned FASTA and A3M files of the shipped families."""
    folder.mkdir(parents=True, exist_ok=True)
    base, fam = msa._package_data("pyhmmer", "science"), msa._package_data("pyfamsa", "science")
    out = [folder / "LuxC.sto", folder / "KR.sto.gz", folder / "adeno.afa", folder / "p127.a3m"]
    out[0].write_bytes((base / "msa/LuxC.sto").read_bytes())
    out[1].write_bytes(gzip.compress((base / "jackhmmer/KR-6.sto").read_bytes()))
    out[2].write_bytes((fam / "adeno_fiber.upgma.afa").read_bytes())
    rows = msa.read_alignment(base / "jackhmmer/p12748-3.sto")[:30]
    letters = np.array(list(msa.AMINO + "X-"))
    out[3].write_text("".join(f">r{i}\n{''.join(letters[row])}{'acd' if i else ''}\n" for i, row in enumerate(rows)))
    return out


def test_packed_alignments_hold_what_the_reader_reads_and_draw_the_same_batches(tmp_path, monkeypatch):
    paths = _alignment_files(tmp_path / "al")
    plain = msa.read_alignments(paths)
    pack, sources = msa.packed_alignments(paths, cache=tmp_path / "cache")
    assert list(pack) == ["LuxC", "KR", "adeno", "p127"] == list(plain) and list(sources) == [str(p.resolve())
                                                                                              for p in paths]
    for name in plain:
        assert pack.shape(name) == plain[name].shape
        np.testing.assert_array_equal(pack[name], plain[name])
    # Splitting and building the batch source read nothing; drawing reads the families drawn.
    reads = []
    real = packed.data_cache.Reader.read
    monkeypatch.setattr(packed.data_cache.Reader, "read", lambda self, *a: reads.append(a) or real(self, *a))
    train, held = msa.split_families(pack, ("adeno",))
    a = msa.MSABatches(train, batch_size=4, num_seq=6, num_res=20, seed=1)
    assert isinstance(train, msa.Alignments) and list(held) == ["adeno"] and reads == []
    b = msa.MSABatches(msa.split_families(plain, ("adeno",))[0], batch_size=4, num_seq=6, num_res=20, seed=1)
    for step in (0, 5):
        for key, value in a.batch(step).items():
            np.testing.assert_array_equal(value, b.batch(step)[key])
    for key, value in a.batch_rows(2, 1, 3).items():
        np.testing.assert_array_equal(value, b.batch_rows(2, 1, 3)[key])
    assert 0 < len(reads) <= 4 * 2 + 3


def test_alignment_packs_are_keyed_by_content_and_family_names(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    paths = _alignment_files(tmp_path / "al")
    first, _ = msa.packed_alignments(paths, cache=cache)
    assert "packing 4 alignment file(s)" in capsys.readouterr().err
    copies = _alignment_files(tmp_path / "copy")  # the same files elsewhere: read back, nothing packed
    with monkeypatch.context() as m:
        m.setattr(msa, "read_alignment", lambda path: pytest.fail("read again"))
        again, _ = msa.packed_alignments(copies, cache=cache)
    assert again.path == first.path and capsys.readouterr().err == ""
    renamed = copies[0].with_name("LuxC2.sto")  # another family name: another pack
    copies[0].rename(renamed)
    other, _ = msa.packed_alignments([renamed, *copies[1:]], cache=cache)
    assert other.path != first.path and list(other)[0] == "LuxC2"
    # Two files of one family name, and a bad file, are refused in one line; no pack is left.
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "LuxC.afa").write_text(">a\nAC\n>b\nAD\n")
    with pytest.raises(ValueError, match="have the same family name 'LuxC'"):
        msa.packed_alignments([paths[0], tmp_path / "dup" / "LuxC.afa"], cache=cache)
    bad = tmp_path / "dup" / "bad.afa"
    bad.write_text(">a\nACD\n>b\nAC\n")
    with pytest.raises(ValueError, match=r"bad\.afa: rows of an alignment must be non-empty and of one length"):
        msa.packed_alignments([paths[0], bad], cache=cache)
    assert len([p for p in (cache / "alignments").iterdir() if p.is_dir()]) == 2  # first and other only


def test_msa_evoformer_names_at_most_ten_families_per_side(tmp_path):
    folder = tmp_path / "al"
    folder.mkdir()
    rng = np.random.default_rng(0)
    letters = np.array(list(msa.AMINO))
    for i in range(30):
        rows = letters[rng.integers(0, 20, (4, 16))]
        (folder / f"PF{i:05d}.afa").write_text("".join(f">s{k}\n{''.join(r)}\n" for k, r in enumerate(rows)))
    cfg = msa_evoformer.MsaEvoformerConfig(alignments=str(folder), num_seq=4)
    data = msa_evoformer.build_data(types.SimpleNamespace(batch_size=2, seq_len=8, seed=0), cfg)
    held = msa.pick_held_out([f"PF{i:05d}" for i in range(30)])
    train_names = sorted(set(f"PF{i:05d}" for i in range(30)) - set(held))
    assert (f"data: 30 alignment families from --alignments; training on {', '.join(train_names[:10])} and "
            f"{len(train_names) - 10} more; held out ") in data.summary
    assert "; packed in " in data.summary


def test_a_file_is_hashed_once_per_process_unless_it_may_have_changed(tmp_path, monkeypatch):
    """Checking a resumed run's recorded files and then packing them reads each file's bytes once;
    a file modified since, or modified just before it was hashed (git's "racy" rule), is read again."""
    from sciscale_jax.data import files

    monkeypatch.setattr(files, "_DIGESTS", {})
    path = tmp_path / "a.fasta"
    path.write_text(">a\nMKVL\n")
    old = time.time_ns() - 10 ** 10
    os.utime(path, ns=(old, old))
    reads = []
    real = files.hashlib.sha256
    monkeypatch.setattr(files.hashlib, "sha256", lambda *a: reads.append(1) or real(*a))
    first = files.sha256(path)
    assert files.sha256(path) == first and files.fingerprints([path])[str(path.resolve())] == first
    assert len(reads) == 1
    path.write_text(">a\nMKVA\n")  # the same size, modified now: read again, and again while racy
    second = files.sha256(path)
    assert second != first and files.sha256(path) == second and len(reads) == 3


def test_sciscale_cache_lists_entries_and_removes_the_unused_ones(tmp_path, proteins, monkeypatch, capsys):
    from sciscale_jax import cli
    from sciscale_jax.data import cache as data_cache

    root = tmp_path / "cache"
    monkeypatch.setenv("SCISCALE_CACHE", str(root))
    kept, gone = tmp_path / "kept.fasta", tmp_path / "gone.fasta"
    kept.write_text("".join(f">k{i}\n{s}\n" for i, s in enumerate(proteins[:20])))
    gone.write_text("".join(f">g{i}\n{s}\n" for i, s in enumerate(proteins[20:40])))
    (pack_kept, _), (pack_gone, _) = packed.packed_proteins([kept], TOK), packed.packed_proteins([gone], TOK)
    old = root / "smiles-0123456789abcdef.json"  # an earlier version's SMILES cache
    old.write_text('{"smiles": []}')
    dead = root / "proteins" / "feedface.partial.dead"  # left by a killed writer
    dead.mkdir()
    (dead / "writer.json").write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 1}))
    live = root / "proteins" / "cafe.partial.live"  # being written now (this process)
    live.mkdir()
    (live / "writer.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    gone.unlink()
    found = {e.path: e for e in data_cache.entries(root)}
    assert set(found) == {pack_kept.folder, pack_gone.folder, old, dead, live}
    assert found[pack_kept.folder].sources == (str(kept),) and not found[pack_kept.folder].unused
    assert found[pack_kept.folder].size == sum(p.stat().st_size for p in pack_kept.folder.iterdir())
    assert "gone.fasta is gone" in found[pack_gone.folder].unused
    assert found[old].unused and found[dead].unused and found[live].busy and not found[live].unused
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 5 entries" in out and "(from kept.fasta)" in out and "being written" in out
    assert "3 unused" in out and "sciscale cache --remove-unused" in out
    assert cli.main(["cache", "--remove", str(live)]) == 2  # refused in one line, nothing removed
    assert "is being written by a running process" in capsys.readouterr().err and live.exists()
    assert cli.main(["cache", "--remove", str(old), str(tmp_path / "kept.fasta")]) == 2  # checked before removing
    assert "is not an entry of the cache" in capsys.readouterr().err and kept.exists() and old.exists()
    assert cli.main(["cache", "--remove-unused"]) == 0
    assert "3 entries removed" in capsys.readouterr().out
    assert {e.path for e in data_cache.entries(root)} == {pack_kept.folder, live}
    assert not (root / "proteins" / f"{pack_gone.folder.name}.lock").exists()
    assert cli.main(["cache", "--remove", str(pack_kept.folder)]) == 0 and not pack_kept.folder.exists()
    assert packed.packed_proteins([kept], TOK)[0].folder == pack_kept.folder  # packed again when asked
