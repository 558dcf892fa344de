"""Masked-language-model batches (BERT, Devlin et al. 2019; ESM, Rives et al. 2021).

Each residue is chosen for prediction with probability 15%; a chosen residue becomes the
mask token 80% of the time, a random standard residue 10%, and stays unchanged 10%.
Batches carry which of the three happened (``corruption``: ``MASKED``, ``RANDOM``, ``KEPT``),
so a metric can score the positions whose residue the model cannot see apart from those
it can copy. Batches are a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted run would have seen.

Packed rows (``pack=True``, training batches only): whole sequences follow one another in a row,
each drawn uniformly (with replacement, as unpacked rows draw theirs), until fewer than
``PACK_MIN_PIECE`` positions are left; a sequence longer than the room left is cropped to a random
window of that room (as an unpacked row crops to ``seq_len``). ``batch["segments"]`` numbers the
pieces of each row 1, 2, ... (0: padding), and the model keeps them apart (each attends only to
itself, with its own positions). Each row draws from its own stream ``(seed, step, row)``, so any
slice of rows is built alone. On proteins of median length 276 (pyhmmer's), an unpacked 1,024-token
row is 31% real tokens and a packed one 99.9% (``benchmarks/packing.py``).

Two baselines without context: the unigram (residue frequencies of the training split)
and the context-free table P(target | input token at the same position), counted on
training batches. On mask-replaced positions the table is the unigram of masked targets;
on kept and randomised positions it is what copying the visible token earns.
"""

from __future__ import annotations

import collections.abc
import math

import numpy as np

from sciscale_jax.data.rows import check_rows

PACK_MIN_PIECE = 16   # packed rows: positions left below which the rest of the row is padding
_PACK_STREAM = 0x9ACC  # packed rows' random streams: (seed, step, _PACK_STREAM, row)

# Values of ``batch["corruption"]``: what happened to each position.
NOT_CHOSEN, MASKED, RANDOM, KEPT = 0, 1, 2, 3
CORRUPTIONS = {"masked": MASKED, "random": RANDOM, "kept": KEPT}


def crop_and_pad(ids_list, seq_len: int, rng: np.random.Generator, pad_id: int):
    """Crop each id array to a random window of ``seq_len`` and right-pad; returns (tokens, real)."""
    tokens = np.full((len(ids_list), seq_len), pad_id, np.int32)
    for row, ids in enumerate(ids_list):
        start = int(rng.integers(0, len(ids) - seq_len + 1)) if len(ids) > seq_len else 0
        window = ids[start:start + seq_len]
        tokens[row, :len(window)] = window
    return tokens, tokens != pad_id


def window_rows(ids_list, offsets, seq_len: int, pad_id: int):
    """Each id array's window of ``seq_len`` ids from its offset, right-padded; returns (tokens, real).

    ``crop_and_pad`` with the crop offsets given instead of drawn.
    """
    tokens = np.full((len(ids_list), seq_len), pad_id, np.int32)
    for row, (ids, offset) in enumerate(zip(ids_list, offsets)):
        window = ids[offset:offset + seq_len]
        tokens[row, :len(window)] = window
    return tokens, tokens != pad_id


def mask_tokens(tokens, maskable, rng: np.random.Generator, *, mask_id: int, residue_ids,
                mask_prob: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1):
    """ESM-style corruption.

    Returns (inputs, targets, weights, corruption): ``weights`` (float32) marks every chosen
    position, ``corruption`` (int8) says what became of it (``MASKED``, ``RANDOM``, ``KEPT``,
    or ``NOT_CHOSEN``). A random replacement may draw the original residue; it still counts
    as ``RANDOM``.
    """
    if not (0 < mask_prob <= 1 and 0 <= mask_frac and 0 <= random_frac and mask_frac + random_frac <= 1):
        raise ValueError(f"mask_prob={mask_prob} must be in (0, 1], mask_frac={mask_frac} and "
                         f"random_frac={random_frac} >= 0 with a sum <= 1")
    chosen = maskable & (rng.random(tokens.shape) < mask_prob)
    action = rng.random(tokens.shape)
    masked = chosen & (action < mask_frac)
    swap = chosen & (action >= mask_frac) & (action < mask_frac + random_frac)
    inputs = tokens.copy()
    inputs[masked] = mask_id
    inputs[swap] = rng.choice(np.asarray(residue_ids), size=int(swap.sum()))
    corruption = np.where(masked, MASKED, np.where(swap, RANDOM, np.where(chosen, KEPT, NOT_CHOSEN)))
    return inputs, tokens, chosen.astype(np.float32), corruption.astype(np.int8)


class MLMBatches:
    """Seeded MLM batches over encoded sequences (each already wrapped as cls ... eos)."""

    def __init__(self, encoded, tokenizer, *, batch_size: int, seq_len: int, seed: int = 0,
                 mask_prob: float = 0.15, pack: bool = False):
        if batch_size <= 0 or seq_len <= 2:
            raise ValueError(f"batch_size={batch_size} must be > 0 and seq_len={seq_len} > 2")
        if not 0 < mask_prob <= 1:
            raise ValueError(f"mask_prob={mask_prob} must be in (0, 1]")
        if not encoded:
            raise ValueError("no sequences to batch")
        # Any sequence of id arrays (a list, or proteins read from a pack on disk when drawn) is kept as is.
        self.encoded = encoded if isinstance(encoded, collections.abc.Sequence) else list(encoded)
        self.tok = tokenizer
        self.batch_size, self.seq_len, self.seed, self.mask_prob = batch_size, seq_len, seed, mask_prob
        self.pack = bool(pack)
        self._specials = np.array([tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id, tokenizer.eos_id])

    def _make(self, ids_list, rng):
        tokens, real = crop_and_pad(ids_list, self.seq_len, rng, self.tok.pad_id)
        maskable = real & ~np.isin(tokens, self._specials)
        inputs, targets, weights, corruption = mask_tokens(tokens, maskable, rng, mask_id=self.tok.mask_id,
                                                           residue_ids=self.tok.residue_ids,
                                                           mask_prob=self.mask_prob)
        return {"inputs": inputs, "targets": targets, "weights": weights, "corruption": corruption, "mask": real}

    def batch(self, step: int) -> dict:
        """The training batch of ``step``: sequences drawn with replacement, then cropped (or packed)
        and masked."""
        if self.pack:
            return self._packed(step, 0, self.batch_size)
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, len(self.encoded), self.batch_size)
        return self._make([self.encoded[i] for i in picks], rng)

    def batch_rows(self, step: int, start: int, stop: int) -> dict:
        """Rows ``start:stop`` of ``batch(step)``, bit for bit, cropping and masking only those rows.

        Every random number ``batch`` draws is drawn here too, at the global batch's shape (the
        picks, each row's crop offset, the choice and action uniforms, the replacement residues),
        so the slice's part of the stream is the one the full batch uses; the other rows only
        contribute how many of their positions take a random residue.
        """
        check_rows(start, stop, self.batch_size)
        if self.pack:
            return self._packed(step, start, stop)
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, len(self.encoded), self.batch_size)
        return self._make_rows([self.encoded[i] for i in picks], rng, start, stop)

    def _packed_row(self, rng):
        """One packed row: (tokens [seq_len], segment ids [seq_len], 0 for padding)."""
        seq_len = self.seq_len
        tokens = np.full(seq_len, self.tok.pad_id, np.int32)
        segments = np.zeros(seq_len, np.int32)
        pos, piece = 0, 0
        while seq_len - pos >= min(PACK_MIN_PIECE, seq_len):
            ids = self.encoded[int(rng.integers(0, len(self.encoded)))]
            room = seq_len - pos
            start = int(rng.integers(0, len(ids) - room + 1)) if len(ids) > room else 0
            window = ids[start:start + room]
            piece += 1
            tokens[pos:pos + len(window)] = window
            segments[pos:pos + len(window)] = piece
            pos += len(window)
        return tokens, segments

    def _packed(self, step: int, start: int, stop: int) -> dict:
        """Rows ``start:stop`` of packed batch ``step``, each from its own stream."""
        rows = []
        for row in range(start, stop):
            rng = np.random.default_rng([self.seed, step, _PACK_STREAM, row])
            tokens, segments = self._packed_row(rng)
            real = segments > 0
            maskable = real & ~np.isin(tokens, self._specials)
            inputs, targets, weights, corruption = mask_tokens(
                tokens[None], maskable[None], rng, mask_id=self.tok.mask_id, residue_ids=self.tok.residue_ids,
                mask_prob=self.mask_prob)
            rows.append({"inputs": inputs, "targets": targets, "weights": weights, "corruption": corruption,
                         "mask": real[None], "segments": segments[None]})
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def _make_rows(self, ids_list, rng, start: int, stop: int) -> dict:
        """Rows ``start:stop`` of ``_make(ids_list, rng)`` with the same draws from ``rng``."""
        seq_len, mask_frac, random_frac = self.seq_len, 0.8, 0.1  # mask_tokens' defaults, as _make uses
        offsets = [int(rng.integers(0, len(ids) - seq_len + 1)) if len(ids) > seq_len else 0 for ids in ids_list]
        u_choose = rng.random((len(ids_list), seq_len))
        u_action = rng.random((len(ids_list), seq_len))
        swap_if_maskable = (u_choose < self.mask_prob) & (u_action >= mask_frac) & (u_action < mask_frac + random_frac)
        swaps = [0] * len(ids_list)  # positions per row that take a random residue
        for row, (ids, offset) in enumerate(zip(ids_list, offsets)):
            if not start <= row < stop:
                window = ids[offset:offset + seq_len]
                swaps[row] = int(swap_if_maskable[row, :len(window)][~np.isin(window, self._specials)].sum())
        tokens, real = window_rows(ids_list[start:stop], offsets[start:stop], seq_len, self.tok.pad_id)
        maskable = real & ~np.isin(tokens, self._specials)
        chosen = maskable & (u_choose[start:stop] < self.mask_prob)
        action = u_action[start:stop]
        masked = chosen & (action < mask_frac)
        swap = chosen & (action >= mask_frac) & (action < mask_frac + random_frac)
        swaps[start:stop] = swap.sum(axis=1).tolist()
        residues = rng.choice(np.asarray(self.tok.residue_ids), size=sum(swaps))
        before = sum(swaps[:start])
        inputs = tokens.copy()
        inputs[masked] = self.tok.mask_id
        inputs[swap] = residues[before:before + int(swap.sum())]
        corruption = np.where(masked, MASKED, np.where(swap, RANDOM, np.where(chosen, KEPT, NOT_CHOSEN)))
        return {"inputs": inputs, "targets": tokens, "weights": chosen.astype(np.float32),
                "corruption": corruption.astype(np.int8), "mask": real}

    def eval_batches(self, min_masked: int = 0, rows: int | None = None) -> list[dict]:
        """Every sequence once per pass, each pass with its own fixed crop and corruption.

        Passes are added until at least ``min_masked`` positions are mask-replaced (one pass
        at least); the same batches every call. ``rows`` per batch defaults to ``batch_size``;
        the last batch of a pass is padded with weightless rows.
        """
        rows = rows or self.batch_size
        out, masked, n_pass = [], 0, 0
        while n_pass == 0 or masked < min_masked:
            rng = np.random.default_rng([self.seed, 2**31 - 1, n_pass])
            for start in range(0, len(self.encoded), rows):
                chunk = self.encoded[start:start + rows]
                batch = self._make(chunk, rng)
                if len(chunk) < rows:
                    fill = rows - len(chunk)
                    batch = {k: np.concatenate([v, np.zeros((fill,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
                masked += int((batch["corruption"] == MASKED).sum())
                out.append(batch)
            n_pass += 1
            if n_pass > 10_000:
                raise ValueError(f"min_masked={min_masked} needs over 10,000 passes over {len(self.encoded)} sequences")
        return out


def residue_log_probs(counts, tokenizer, alpha: float = 1.0):
    """[..., V] log of (counts + alpha) normalised over the residues; specials get -inf (never targets)."""
    counts = np.asarray(counts, np.float64) + alpha
    specials = [tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id, tokenizer.eos_id]
    counts[..., specials] = 0.0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum(axis=-1, keepdims=True))


def _select(batch, positions: str):
    """Boolean [B, S] of the scored positions: 'selected' (all chosen) or one corruption kind."""
    if positions == "selected":
        return batch["weights"] > 0
    if positions not in CORRUPTIONS:
        raise ValueError(f"positions={positions!r} must be 'selected' or one of {sorted(CORRUPTIONS)}")
    return batch["corruption"] == CORRUPTIONS[positions]


def unigram_log_probs(train_encoded, tokenizer) -> np.ndarray:
    """[V] log residue frequencies of the training sequences, add-one smoothed."""
    counts = np.zeros(tokenizer.vocab_size)
    for ids in train_encoded:
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    return residue_log_probs(counts, tokenizer)


def context_free_log_probs(train_batches, tokenizer) -> np.ndarray:
    """[V_input, V_target] log P(target | input token at the same position), add-one smoothed.

    Counted over the chosen positions of ``train_batches`` (what a training objective sees).
    """
    v = tokenizer.vocab_size
    counts = np.zeros((v, v))
    for b in train_batches:
        sel = b["weights"] > 0
        np.add.at(counts, (b["inputs"][sel], b["targets"][sel]), 1.0)
    return residue_log_probs(counts, tokenizer)


def table_nll(log_probs, eval_batches, positions: str = "masked") -> tuple[float, float]:
    """(sum of -log p(target), count) over ``positions`` of ``eval_batches``.

    ``log_probs`` is a [V] unigram or a [V_input, V_target] table looked up by the input token.
    """
    total, count = 0.0, 0
    for b in eval_batches:
        sel = _select(b, positions)
        lp = log_probs[b["targets"][sel]] if log_probs.ndim == 1 else log_probs[b["inputs"][sel], b["targets"][sel]]
        total, count = total - float(lp.sum()), count + int(sel.sum())
    return total, float(count)


def table_accuracy(log_probs, eval_batches, positions: str = "masked") -> float:
    """Fraction of ``positions`` whose target is the table's most probable residue."""
    hits, count = 0, 0
    for b in eval_batches:
        sel = _select(b, positions)
        pred = np.argmax(log_probs if log_probs.ndim == 1 else log_probs[b["inputs"][sel]], axis=-1)
        hits, count = hits + int((pred == b["targets"][sel]).sum()), count + int(sel.sum())
    return hits / max(count, 1)


def unigram_perplexity(train_encoded, eval_batches, tokenizer, positions: str = "selected") -> float:
    """Perplexity of residue frequencies of the training split (add-one smoothed) on the eval targets.

    Special tokens get no probability mass: only residues are ever predicted.
    """
    total, count = table_nll(unigram_log_probs(train_encoded, tokenizer), eval_batches, positions)
    return math.exp(total / max(count, 1.0))


class RepeatedSymbolTask:
    """A synthetic MLM whose context signal is known exactly, for tests and negative controls.

    Each sequence repeats one symbol drawn uniformly from ``num_symbols`` token ids
    (``first_symbol`` ...); with ``noise`` > 0 each position instead holds a uniformly drawn
    symbol with that probability. Positions are chosen with ``mask_prob`` and all replaced by
    the mask token. Every position's symbol is uniform on its own, so every context-free
    predictor scores at best ``floor = log(num_symbols)`` nats on masked positions; the
    visible positions of the same sequence reveal its symbol, and a model that reads them
    can reach ``optimum`` (the entropy of a position given its sequence's symbol: 0 without
    noise). Batches have the keys of ``MLMBatches`` and are a pure function of (seed, step).
    """

    def __init__(self, *, num_symbols: int, batch_size: int, seq_len: int, seed: int = 0, mask_id: int = 1,
                 first_symbol: int = 4, mask_prob: float = 0.15, noise: float = 0.0):
        if not 0 <= noise < 1:
            raise ValueError(f"noise={noise} must be in [0, 1)")
        if num_symbols < 2 or batch_size <= 0 or seq_len < 2 or not 0 < mask_prob < 1:
            raise ValueError(f"num_symbols={num_symbols} must be >= 2, batch_size={batch_size} > 0, "
                             f"seq_len={seq_len} >= 2 and mask_prob={mask_prob} in (0, 1)")
        if first_symbol <= mask_id < first_symbol + num_symbols:
            raise ValueError(f"mask_id={mask_id} lies among the symbols {first_symbol}..{first_symbol + num_symbols - 1}")
        self.num_symbols, self.batch_size, self.seq_len, self.seed = num_symbols, batch_size, seq_len, seed
        self.mask_id, self.first_symbol, self.mask_prob = mask_id, first_symbol, mask_prob
        self.vocab_size = max(mask_id, first_symbol + num_symbols - 1) + 1
        self.noise = noise
        self.floor = math.log(num_symbols)
        p_own = 1 - noise + noise / num_symbols
        p_other = noise / num_symbols
        self.optimum = 0.0 - p_own * math.log(p_own) - (num_symbols - 1) * (p_other * math.log(p_other) if noise else 0.0)
        self.optimum = max(0.0, self.optimum)

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step, 7])
        symbols = self.first_symbol + rng.integers(0, self.num_symbols, (self.batch_size, 1))
        tokens = np.broadcast_to(symbols, (self.batch_size, self.seq_len)).astype(np.int32)
        if self.noise:
            noisy = rng.random(tokens.shape) < self.noise
            tokens = np.where(noisy, self.first_symbol + rng.integers(0, self.num_symbols, tokens.shape),
                              tokens).astype(np.int32)
        inputs, targets, weights, corruption = mask_tokens(
            tokens, np.ones(tokens.shape, bool), rng, mask_id=self.mask_id, residue_ids=[self.first_symbol],
            mask_prob=self.mask_prob, mask_frac=1.0, random_frac=0.0)
        return {"inputs": inputs, "targets": targets, "weights": weights, "corruption": corruption,
                "mask": np.ones(tokens.shape, bool)}

    def eval_batches(self, n: int) -> list[dict]:
        """``n`` held-out batches (steps no training run reaches)."""
        return [self.batch(2**31 - 1 - i) for i in range(n)]
