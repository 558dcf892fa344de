"""smiles-lm: a causal (GPT-style) SMILES language model on molecules shipped in the rdkit wheel.

Data (``sciscale_jax.data.smiles``): about 15,500 distinct canonical SMILES from three files of
the rdkit wheel (NCI, WEHI screening compounds, a ChEMBL series), curated as GuacaMol and MOSES
curate theirs (largest fragment, neutralised, organic elements, no net charge; ``smiles.curate``),
split by a hash of the canonical SMILES into train and validation, written as Kekulé SMILES
(``C1=CC=CC=C1``: no aromatic atoms, so the model never writes an aromatic ring RDKit cannot
kekulise) or, with ``--smiles-form aromatic``, as aromatic SMILES (the split is the same for
both), tokenized atom by atom
(Schwaller et al. 2019); molecules longer than ``seq_len`` tokens (with bos and eos) are left out,
so sampling up to ``seq_len`` tokens covers every training molecule. The corpus is curated by
worker processes and packed once on disk (``data.smiles_pack``), and each molecule a batch draws
is read from there, so corpora larger than memory (MOSES, ``--corpus`` files) train.
The model is the library's Transformer with ``causal=True``, trained on next-token loss over
packed rows (whole molecules one after another, ``pack=True``).

Evaluation: validation loss and perplexity per token on the first ``eval_molecules`` held-out
molecules, beside two baselines on the same molecules and tokens: unigram frequencies and the
best add-k token n-gram (n = 3..5), both fitted on the first ``BASELINE_MOLECULES`` training
molecules. After
training, ``evaluate_generation`` samples molecules (temperature, top-k) and reports the
generation metrics chemists use (validity, uniqueness, novelty by RDKit; Polykovskiy et al.
2020, "MOSES") next to the same metrics of n-gram samples; ``report`` prints them at the end of
``sciscale train smiles-lm`` (``--samples``, ``--temperature``, ``--top-k``; figures at
temperature 1.0 beside them).

Sampling decodes with a key/value cache (``sciscale_jax.models.decode``) inside one jitted
``lax.scan``; approximate-attention models (Linformer, Performer) rerun the full causal forward
pass once per generated position on a prefix padded up to a multiple of 16 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sciscale_jax.data import files
from sciscale_jax.data import smiles as sm
from sciscale_jax.data import smiles_pack
from sciscale_jax.losses import causal_lm_loss
from sciscale_jax.models import Transformer, TransformerConfig, decode, hidden_states
from sciscale_jax.recipes.base import Data, Recipe
from sciscale_jax.recipes.transformer_stages import CAUSAL_LM


@dataclasses.dataclass(frozen=True)
class SmilesLMConfig(TransformerConfig):
    """The causal Transformer plus the data choices of this recipe."""

    molecules: int = dataclasses.field(default=0, metadata={
        "help": "use the first N molecules of the corpus (0: all); for quick runs"})
    val_fraction: float = dataclasses.field(default=0.1, metadata={"help": "share of molecules held out (by hash)"})
    eval_molecules: int = dataclasses.field(default=10_000, metadata={
        "help": "held-out molecules scored at each evaluation: the first N (0: all of them)"})
    corpus: str = dataclasses.field(default="rdkit", metadata={
        "help": "'rdkit': molecules shipped in rdkit; 'moses': the MOSES set from the optional molsets wheel "
        "(pip install molsets --no-deps; ~1.76M molecules, so first use curates on every core for a long while: "
        "--molecules N reads the first N); else your SMILES files or folders of them, comma-separated "
        "(.smi, .csv, .txt, or those .gz; the first column), curated as the shipped ones"})
    smiles_form: str = dataclasses.field(default="kekule", metadata={
        "choices": sm.SMILES_FORMS, "help": "train on 'aromatic' (c1ccccc1) or 'kekule' (C1=CC=CC=C1) canonical SMILES"})
    pack: bool = dataclasses.field(default=True, metadata={
        "help": "fill training rows with whole molecules one after another (no padding)"})
    isolate_molecules: bool = dataclasses.field(default=False, metadata={
        "help": "packed rows: each molecule attends only to itself, its positions from 0, and no token is "
        "predicted across a boundary, as when a molecule is sampled from bos alone (default: a molecule "
        "also sees those before it in its row)"})
    samples: int = dataclasses.field(default=1000, metadata={
        "group": "generation", "help": "SMILES sampled after training and scored by RDKit (0: none)"})
    temperature: float = dataclasses.field(default=0.7, metadata={
        "group": "generation", "help": "sampling temperature (figures at 1.0 are printed too)"})
    top_k: int = dataclasses.field(default=0, metadata={
        "group": "generation", "help": "sample among the k likeliest tokens (0: all)"})

    def __post_init__(self):
        if not isinstance(self.molecules, int) or self.molecules < 0:
            raise ValueError(f"molecules={self.molecules!r} must be a non-negative integer")
        if not isinstance(self.corpus, str) or not self.corpus.strip():
            raise ValueError(f"corpus={self.corpus!r} must be 'rdkit', 'moses' or paths of SMILES files")
        if self.smiles_form not in sm.SMILES_FORMS:
            raise ValueError(f"smiles_form={self.smiles_form!r} must be one of {sm.SMILES_FORMS}")
        if not isinstance(self.pack, bool):
            raise ValueError(f"pack={self.pack!r} must be a bool")
        if not isinstance(self.isolate_molecules, bool):
            raise ValueError(f"isolate_molecules={self.isolate_molecules!r} must be a bool")
        if self.isolate_molecules and not self.pack:
            raise ValueError("isolate_molecules keeps packed molecules apart; without pack each row holds one "
                             "molecule already: drop --isolate-molecules or keep --pack")
        if self.isolate_molecules and self.attention in ("linformer", "performer"):
            raise ValueError(f"isolate_molecules keeps each packed molecule to itself, which attention="
                             f"{self.attention!r} (it mixes every position of a row) cannot; use exact attention")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 0:
            raise ValueError(f"samples={self.samples!r} must be a non-negative integer")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature!r} must be a positive finite number")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be a non-negative integer")
        if not isinstance(self.eval_molecules, int) or isinstance(self.eval_molecules, bool) \
                or self.eval_molecules < 0:
            raise ValueError(f"eval_molecules={self.eval_molecules!r} must be a non-negative integer")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must lie in (0, 1)")
        super().__post_init__()


BASELINE_MOLECULES = 200_000  # training molecules the n-gram baselines are fitted on (the first ones)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """What training, evaluation and generation need of the corpus: the tokenizer, the molecules of
    each side of the split that fit ``seq_len`` (read from the pack when drawn), and the n-gram
    baseline."""

    tokenizer: sm.SmilesTokenizer
    train: smiles_pack.Molecules  # in the trained form, bos ... eos
    val: smiles_pack.Molecules    # the held-out molecules scored at each evaluation (the first eval_molecules)
    ngram: sm.NGramModel
    dropped: int        # molecules longer than seq_len tokens (with bos and eos), left out
    held_out: int       # held-out molecules that fit seq_len (val holds the first eval_molecules of them)
    baseline_molecules: int  # training molecules the baselines were fitted on
    baselines: dict = dataclasses.field(default_factory=dict)  # unigram and best n-gram perplexity on val

    @property
    def train_smiles(self) -> list[str]:
        return self.train.smiles()

    @property
    def val_smiles(self) -> list[str]:
        return self.val.smiles()

    def train_hashes(self) -> np.ndarray:
        """Sorted hashes of the training molecules' aromatic canonical SMILES, for novelty."""
        return self.train.hashes()


def corpus_files(corpus: str) -> list | None:
    """The SMILES files of ``corpus`` ("rdkit": None, the shipped files; "moses"; or the user's
    comma-separated files and folders)."""
    if corpus == "rdkit":
        return None
    if corpus == "moses":
        return sm.moses_smiles_files()
    return sm.user_smiles_files(corpus)


def _pack(molecules: int, form: str, corpus: str) -> tuple[smiles_pack.SmilesPack, int, dict]:
    """(the corpus's pack in ``form``, how many of its molecules the run uses, the user's files'
    SHA-256). The shipped rdkit corpus is packed whole and cut to ``molecules``; MOSES and the
    user's files are read only as far as their first ``molecules`` distinct molecules (0: all)."""
    paths = corpus_files(corpus)
    limit = 0 if paths is None else molecules
    pack, sources = smiles_pack.packed_smiles(paths or sm.rdkit_smiles_files(), form=form, limit=limit)
    if not len(pack):
        raise ValueError(f"--corpus {corpus}: no molecule survived curation (organic elements, neutral after "
                         "neutralising; the first column of each line must be a SMILES string)")
    return pack, min(molecules or len(pack), len(pack)), sources


def _tokenizer(pack: smiles_pack.SmilesPack, use: int, val_fraction: float) -> tuple[sm.SmilesTokenizer, np.ndarray]:
    """The tokenizer of the training side (its tokens most frequent first, ``SmilesTokenizer.from_smiles``)
    and the table from the pack's token ids to its ids (unk for tokens the training side lacks)."""
    counts = pack.train_counts(val_fraction, use)
    seen = sorted((i for i, c in enumerate(counts.tolist()) if c), key=lambda i: (-int(counts[i]), pack.vocab[i]))
    tok = sm.SmilesTokenizer([pack.vocab[i] for i in seen])
    table = np.array([tok._index.get(t, tok.unk_id) for t in pack.vocab] or [tok.unk_id], np.int32)
    return tok, table


def tokenizer_of(model_cfg) -> sm.SmilesTokenizer:
    """The tokenizer a run with ``model_cfg`` trained with (its vocabulary is the training split's)."""
    pack, use, _ = _pack(model_cfg.molecules, model_cfg.smiles_form, model_cfg.corpus)
    return _tokenizer(pack, use, model_cfg.val_fraction)[0]


def build_corpus(seq_len: int, molecules: int = 0, val_fraction: float = 0.1, ngram_orders=(3, 4, 5),
                 form: str = "kekule", corpus: str = "rdkit", eval_molecules: int = 10_000) -> Corpus:
    """The corpus ("rdkit", "moses" or SMILES files) packed, split by a hash of the aromatic canonical
    SMILES (both forms hold the same molecules on each side), tokenized; the n-gram baselines
    (n in ``ngram_orders``) fitted on the first ``BASELINE_MOLECULES`` training molecules, the best
    on the evaluation molecules (the first ``eval_molecules`` held-out ones; 0: all) kept.
    MOSES and SMILES files are read only as far as their first ``molecules`` distinct molecules (0: all)."""
    pack, use, _ = _pack(molecules, form, corpus)
    tok, table = _tokenizer(pack, use, val_fraction)
    train_idx, val_idx = pack.split(val_fraction, use)
    fits = pack.lengths() + 2 <= seq_len
    kept_train, kept_val = train_idx[fits[train_idx]], val_idx[fits[val_idx]]
    if not len(kept_train) or not len(kept_val):
        raise ValueError(f"seq_len={seq_len} leaves no molecules on one side of the split "
                         f"({len(kept_train)} train, {len(kept_val)} validation)")
    view = lambda index: smiles_pack.Molecules(pack, index, table, tok.bos_id, tok.eos_id)  # noqa: E731
    train, val = view(kept_train), view(kept_val[:eval_molecules or None])
    fitted = train[:BASELINE_MOLECULES]
    scored = val[:]
    ppl = {m: m.perplexity(scored) for m in (sm.NGramModel(fitted, tok.vocab_size, n=n, k=0.01) for n in ngram_orders)}
    best = min(ppl, key=ppl.get)
    baselines = {"unigram_ppl": sm.unigram_perplexity(fitted, scored, tok.vocab_size), f"ngram{best.n}_ppl": ppl[best]}
    return Corpus(tok, train, val, best, dropped=use - len(kept_train) - len(kept_val), held_out=len(kept_val),
                  baseline_molecules=len(fitted), baselines=baselines)


def build_data(train_cfg, model_cfg) -> Data:
    corpus = build_corpus(train_cfg.seq_len, model_cfg.molecules, model_cfg.val_fraction, form=model_cfg.smiles_form,
                          corpus=model_cfg.corpus, eval_molecules=model_cfg.eval_molecules)
    tok = corpus.tokenizer
    kw = dict(batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len, seed=train_cfg.seed)
    train = sm.CausalLMBatches(corpus.train, tok.pad_id, pack=model_cfg.pack,
                               segments=getattr(model_cfg, "isolate_molecules", False), **kw)
    train.corpus = corpus  # for evaluate_generation after training
    evals = sm.CausalLMBatches(corpus.val, tok.pad_id, **kw).eval_batches()
    shipped = model_cfg.corpus in ("rdkit", "moses")
    sources = {} if shipped else files.fingerprints(corpus_files(model_cfg.corpus))
    summary = ""
    if sources:
        held = (f"{corpus.held_out} held out" if len(corpus.val) == corpus.held_out else
                f"{corpus.held_out} held out (the first {len(corpus.val)} scored at each evaluation)")
        summary = (f"data: {len(corpus.train) + corpus.held_out + corpus.dropped} curated molecules from "
                   f"{len(sources)} file(s) of --corpus: {len(corpus.train)} for training, {held}, {corpus.dropped} "
                   f"longer than seq_len left out")
        if corpus.baseline_molecules < len(corpus.train):
            summary += f"; baselines fitted on the first {corpus.baseline_molecules} training molecules"
    return Data(train=train, eval=evals, vocab_size=tok.vocab_size, baselines=dict(corpus.baselines),
                sources=sources, summary=summary, train_only=("segments",) if train.segments else ())


def summarize(means: dict) -> dict:
    return {"ppl": math.exp(means["loss"])} if "loss" in means else {}


def check(model_cfg, train_cfg, data) -> None:
    if not model_cfg.causal:
        raise ValueError("smiles-lm is a causal language model: causal=False is not supported")
    if train_cfg.seq_len > model_cfg.max_len:
        raise ValueError(f"seq_len={train_cfg.seq_len} exceeds the model's max_len={model_cfg.max_len}")
    if model_cfg.vocab_size < data.vocab_size:
        raise ValueError(f"model vocab_size={model_cfg.vocab_size} is smaller than the data's {data.vocab_size}")


# --- sampling and generation metrics ------------------------------------------------------------------------

def _restrict(logits_bv, vocab_used: int, temperature: float, top_k: int):
    """Logits over the tokenizer's real, predictable tokens (no pad, bos or padded rows), top-k cut, / T."""
    logits_bv = logits_bv.astype(jnp.float32)
    logits_bv = jnp.where(jnp.arange(logits_bv.shape[-1]) < vocab_used, logits_bv, -jnp.inf)
    logits_bv = logits_bv.at[:, sm.SPECIALS.index("<pad>")].set(-jnp.inf)
    logits_bv = logits_bv.at[:, sm.SPECIALS.index("<bos>")].set(-jnp.inf)
    if top_k:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv >= kth, logits_bv, -jnp.inf)
    return logits_bv / temperature


def _next_token_fn(graphdef, vocab_used: int, temperature: float, top_k: int):
    """jit(params, rest, tokens_bL, t, key) -> next ids [b] drawn from position t's logits (full forward)."""

    def next_token(params, rest, tokens_bl, t, key):
        logits_bv = nnx.merge(graphdef, params, rest)(tokens_bl)[:, t, :]
        return jax.random.categorical(key, _restrict(logits_bv, vocab_used, temperature, top_k)).astype(jnp.int32)

    return jax.jit(next_token)


@functools.lru_cache(maxsize=8)
def _cached_sampler(graphdef, vocab_used: int, top_k: int, max_len: int, bos: int, eos: int, pad: int):
    """jit(params, rest, key, temperature, batch) -> ids [batch, max_len]: bos, then tokens drawn with a KV cache.

    One jitted function per model structure and setting (the temperature is traced), so sampling the
    same model again, at another temperature, compiles nothing new.
    """

    def run(params, rest, key, temperature, batch):
        model = nnx.merge(graphdef, params, rest)
        cache = decode.init_cache(model, batch, max_len)

        def step(carry, t):
            cache, token_b, done_b, key = carry
            key, sub = jax.random.split(key)
            logits_bv, cache = decode.decode_step(model, cache, token_b, t)
            nxt_b = jax.random.categorical(sub, _restrict(logits_bv, vocab_used, temperature, top_k)).astype(jnp.int32)
            nxt_b = jnp.where(done_b, pad, nxt_b)
            return (cache, nxt_b, done_b | (nxt_b == eos), key), nxt_b

        start_b = jnp.full((batch,), bos, jnp.int32)
        _, tokens_tb = jax.lax.scan(step, (cache, start_b, jnp.zeros(batch, bool), key), jnp.arange(max_len - 1))
        return jnp.concatenate([start_b[:, None], tokens_tb.T], axis=1)

    return jax.jit(run, static_argnums=4)


def sample(model, tokenizer, num: int, *, max_len: int, temperature: float = 1.0, top_k: int = 0,
           seed: int = 0, batch_size: int = 500) -> list[str]:
    """``num`` SMILES sampled from ``model``, each started at bos and ended at eos or ``max_len`` tokens.

    Exact-attention models decode with a key/value cache (``sciscale_jax.models.decode``);
    Linformer and Performer models rerun the full forward pass for every position.
    """
    if temperature <= 0 or top_k < 0 or num <= 0 or max_len < 2:
        raise ValueError(f"temperature={temperature} must be > 0, top_k={top_k} >= 0, num={num} > 0 "
                         f"and max_len={max_len} >= 2")
    if max_len > model.config.max_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_len={model.config.max_len}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.device_get((nnx.to_pure_dict(params), nnx.to_pure_dict(rest)))
    key, out = jax.random.key(seed), []
    if model.config.attention not in decode.APPROXIMATE:
        run = _cached_sampler(graphdef, tokenizer.vocab_size, int(top_k), max_len, tokenizer.bos_id,
                              tokenizer.eos_id, tokenizer.pad_id)
        for start in range(0, num, batch_size):
            key, sub = jax.random.split(key)
            rows = np.asarray(run(params, rest, sub, jnp.float32(temperature), min(batch_size, num - start)))
            out.extend(tokenizer.decode(row) for row in rows)
        return out
    step = _next_token_fn(graphdef, tokenizer.vocab_size, float(temperature), int(top_k))
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        tokens = np.full((b, max_len), tokenizer.pad_id, np.int32)
        tokens[:, 0] = tokenizer.bos_id
        done = np.zeros(b, bool)
        for t in range(max_len - 1):
            width = min(max_len, 16 * (t // 16 + 1))
            key, sub = jax.random.split(key)
            nxt = np.asarray(step(params, rest, jnp.asarray(tokens[:, :width]), t, sub))
            tokens[:, t + 1] = np.where(done, tokenizer.pad_id, nxt)
            done |= nxt == tokenizer.eos_id
            if done.all():
                break
        out.extend(tokenizer.decode(row) for row in tokens)
    return out


def trained_model(model_cfg, state) -> Transformer:
    """The model of a finished run: ``train(...)["state"]`` merged into a fresh module on one device."""
    graphdef, _, _ = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return nnx.merge(graphdef, *jax.device_get((state.params, state.rest)))


def evaluate_generation(model, data: Data, n: int = 1000, *, temperature: float = 1.0, top_k: int = 0,
                        seed: int = 0, diversity: bool = False) -> dict:
    """Validity, uniqueness, novelty of ``n`` sampled SMILES, for the model and for the n-gram baseline.

    Returns ``{"model": metrics, "ngram": metrics, "samples": model's SMILES}``.
    """
    corpus: Corpus = data.train.corpus
    max_len = data.train.seq_len
    samples = sample(model, corpus.tokenizer, n, max_len=max_len, temperature=temperature, top_k=top_k, seed=seed)
    ngram_samples = corpus.ngram.sample(n, corpus.tokenizer, max_len=max_len - 1, seed=seed)
    seen = corpus.train_hashes()
    return {"model": sm.generation_metrics(samples, diversity=diversity, train_hashes=seen),
            "ngram": sm.generation_metrics(ngram_samples, diversity=diversity, train_hashes=seen),
            "samples": samples}


def generation_figures(model_cfg, train_cfg, state, data: Data | None = None) -> dict:
    """Generation metrics of a finished run: ``model_cfg.samples`` SMILES at ``model_cfg.temperature``
    and ``top_k`` (key "model"), at temperature 1.0 without top-k ("model_t1", when that differs)
    and from the n-gram baseline ("ngram"); with internal diversity."""
    data = data or build_data(train_cfg, model_cfg)
    model = trained_model(model_cfg, state)
    n, seed = model_cfg.samples, train_cfg.seed
    out = {"samples": n, "temperature": model_cfg.temperature, "top_k": model_cfg.top_k,
           "train_molecules": len(data.train.corpus.train), "ngram_n": data.train.corpus.ngram.n}
    gen = evaluate_generation(model, data, n, temperature=model_cfg.temperature, top_k=model_cfg.top_k, seed=seed,
                              diversity=True)
    out.update(model=gen["model"], ngram=gen["ngram"], examples=gen["samples"][:5])
    if model_cfg.temperature != 1.0 or model_cfg.top_k:
        corpus = data.train.corpus
        plain = sample(model, corpus.tokenizer, n, max_len=data.train.seq_len, seed=seed)
        out["model_t1"] = sm.generation_metrics(plain, diversity=True, train_hashes=corpus.train_hashes())
    return out


def report(model_cfg, train_cfg, state) -> list[str]:
    """Lines printed after ``sciscale train smiles-lm``: the generation metrics table (none when samples=0)."""
    return format_figures(generation_figures(model_cfg, train_cfg, state)) if model_cfg.samples else []


def format_figures(fig: dict) -> list[str]:
    """``generation_figures`` as a markdown table, then five sampled SMILES."""
    k = f", top-k {fig['top_k']}" if fig["top_k"] else ""
    rows = [(f"smiles-lm, temperature {fig['temperature']}{k}", fig["model"])]
    if "model_t1" in fig:
        rows.append(("smiles-lm, temperature 1.0", fig["model_t1"]))
    rows.append((f"token {fig['ngram_n']}-gram baseline", fig["ngram"]))
    lines = [f"{fig['samples']} sampled SMILES scored by RDKit (training set {fig['train_molecules']} molecules)",
             "| sampler | validity | uniqueness | novelty | internal diversity |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {m['validity']:.3f} | {m['uniqueness']:.3f} | {m['novelty']:.3f} | "
              f"{m['internal_diversity']:.3f} |" for name, m in rows]
    return lines + ["examples: " + "  ".join(fig["examples"])]


def embed(model_cfg, model, path, batch_size: int = 16) -> dict:
    """Molecule representations from the trained model, as chemical language models are used as
    featurisers: each molecule of the SMILES file ``path`` (.smi, .csv or .gz; first column) is
    curated and written as the training corpus is (largest fragment, neutralised, canonical, in
    the run's ``smiles_form``), so any SMILES of one molecule gives one result, and run as
    ``bos`` + tokens + ``eos`` through the model (batched and padded under a key mask, as
    ``hidden_states`` does). Returns ``smiles`` [N] (as read), ``canonical`` [N] (as run),
    ``mean`` [N, embed] (over the molecule's tokens), ``last`` [N, embed] (the state at ``eos``:
    a causal model's summary of the whole molecule), ``per_token`` [total tokens, embed] and
    ``offsets`` [N + 1]. One-line ValueError naming the molecule for one RDKit cannot parse or
    the corpus would leave out, a token the training split never had, or one longer than
    ``max_len``."""
    smiles = sm.read_smiles_file(path)
    if not smiles:
        raise ValueError(f"{path} holds no SMILES")
    tok, ids, forms = tokenizer_of(model_cfg), [], []
    for i, raw in enumerate(smiles):
        curated = sm.curate(raw)
        if curated is None:
            raise ValueError(f"{path}, molecule {i + 1} ({raw!r}): RDKit cannot parse it, or it lies outside the "
                             f"training corpus (elements {' '.join(sorted(sm.ALLOWED_ELEMENTS))}, neutral, at most "
                             f"{sm.MAX_HEAVY_ATOMS} heavy atoms)")
        form = sm.to_form(curated, model_cfg.smiles_form)
        unseen = sorted({t for t in sm.tokenize(form) if t not in tok.tokens})
        if unseen:
            raise ValueError(f"{path}, molecule {i + 1} ({raw!r}): tokens {unseen} never occur in the training split")
        forms.append(form)
        ids.append(tok.encode(form))
        if len(ids[-1]) > model_cfg.max_len:
            raise ValueError(f"{path}, molecule {i + 1} ({raw!r}): {len(ids[-1])} tokens with bos/eos exceed the "
                             f"model's max_len={model_cfg.max_len}")
    states = hidden_states(model, ids, batch_size=batch_size, pad_id=tok.pad_id)
    atoms = [h[1:-1] for h in states]
    return {"smiles": np.asarray(smiles), "canonical": np.asarray(forms),
            "mean": np.stack([a.mean(axis=0) for a in atoms]), "last": np.stack([h[-1] for h in states]),
            "per_token": np.concatenate(atoms), "offsets": np.cumsum([0] + [len(a) for a in atoms])}


RECIPE = Recipe(
    name="smiles-lm",
    description="GPT-style SMILES language model on ~15,500 curated molecules shipped in rdkit (NCI, WEHI, ChEMBL)",
    # 104 embedding rows (a multiple of 8, so the embedding splits over tensor-parallel meshes) hold the
    # curated corpus's 24 Kekulé tokens (32 aromatic ones) with room for a larger corpus.
    model_defaults=dict(vocab_size=104, num_layers=4, num_heads=4, embed_dim=128, mlp_dim=384, max_len=128,
                        causal=True),
    train_defaults=dict(steps=1500, batch_size=32, seq_len=64, learning_rate=3e-3, warmup_steps=100,
                        eval_every=300, save_every=300),
    config_class=SmilesLMConfig,
    build_model=lambda config, rngs: Transformer(config, rngs=rngs),
    build_data=build_data,
    loss_fn=causal_lm_loss,
    summarize=summarize,
    batch_axes={"*": ("batch", "seq")},
    pipeline=CAUSAL_LM,
    check=check,
    report=report,
    embed=embed,
    vocabulary=lambda model_cfg: tokenizer_of(model_cfg).tokens,
)
