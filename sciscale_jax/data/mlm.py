"""Masked-language-model batches (BERT, Devlin et al. 2019; ESM, Rives et al. 2021).

Each residue is chosen for prediction with probability 15%; a chosen residue becomes the
mask token 80% of the time, a random standard residue 10%, and stays unchanged 10%.
Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import math

import numpy as np


def crop_and_pad(ids_list, seq_len: int, rng: np.random.Generator, pad_id: int):
    """Crop each id array to a random window of ``seq_len`` and right-pad; returns (tokens, real)."""
    tokens = np.full((len(ids_list), seq_len), pad_id, np.int32)
    for row, ids in enumerate(ids_list):
        start = int(rng.integers(0, len(ids) - seq_len + 1)) if len(ids) > seq_len else 0
        window = ids[start:start + seq_len]
        tokens[row, :len(window)] = window
    return tokens, tokens != pad_id


def mask_tokens(tokens, maskable, rng: np.random.Generator, *, mask_id: int, residue_ids,
                mask_prob: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1):
    """ESM-style corruption. Returns (inputs, targets, weights) where weights mark predicted positions."""
    chosen = maskable & (rng.random(tokens.shape) < mask_prob)
    action = rng.random(tokens.shape)
    inputs = tokens.copy()
    inputs[chosen & (action < mask_frac)] = mask_id
    swap = chosen & (action >= mask_frac) & (action < mask_frac + random_frac)
    inputs[swap] = rng.choice(np.asarray(residue_ids), size=int(swap.sum()))
    return inputs, tokens, chosen.astype(np.float32)


class MLMBatches:
    """Seeded MLM batches over encoded sequences (each already wrapped as cls ... eos)."""

    def __init__(self, encoded, tokenizer, *, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size <= 0 or seq_len <= 2:
            raise ValueError(f"batch_size={batch_size} must be > 0 and seq_len={seq_len} > 2")
        if not encoded:
            raise ValueError("no sequences to batch")
        self.encoded, self.tok = list(encoded), tokenizer
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        specials = np.array([tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id, tokenizer.eos_id])
        self._specials = specials

    def _make(self, ids_list, rng):
        tokens, real = crop_and_pad(ids_list, self.seq_len, rng, self.tok.pad_id)
        maskable = real & ~np.isin(tokens, self._specials)
        inputs, targets, weights = mask_tokens(tokens, maskable, rng, mask_id=self.tok.mask_id,
                                               residue_ids=self.tok.residue_ids)
        return {"inputs": inputs, "targets": targets, "weights": weights, "mask": real}

    def batch(self, step: int) -> dict:
        """The training batch of ``step``: sequences drawn with replacement, then cropped and masked."""
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, len(self.encoded), self.batch_size)
        return self._make([self.encoded[i] for i in picks], rng)

    def eval_batches(self) -> list[dict]:
        """Every sequence once, in order, with a fixed corruption: the same positions every call."""
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        out = []
        for start in range(0, len(self.encoded), self.batch_size):
            chunk = self.encoded[start:start + self.batch_size]
            batch = self._make(chunk, rng)
            if len(chunk) < self.batch_size:  # pad the last batch with weightless rows
                fill = self.batch_size - len(chunk)
                batch = {k: np.concatenate([v, np.zeros((fill,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            out.append(batch)
        return out


def unigram_perplexity(train_encoded, eval_batches, tokenizer) -> float:
    """Perplexity of residue frequencies of the training split (add-one smoothed) on the eval targets.

    Special tokens get no probability mass: only residues are ever predicted.
    """
    counts = np.ones(tokenizer.vocab_size)
    for ids in train_encoded:
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    counts[[tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id, tokenizer.eos_id]] = 0.0
    with np.errstate(divide="ignore"):
        log_p = np.log(counts / counts.sum())
    nll = sum(float(-(log_p[b["targets"][b["weights"] > 0]] * b["weights"][b["weights"] > 0]).sum())
              for b in eval_batches)
    n = sum(float(b["weights"].sum()) for b in eval_batches)
    return math.exp(nll / n)
