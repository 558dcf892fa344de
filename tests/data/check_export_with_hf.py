"""Checks ``sciscale export`` against Hugging Face's own code (transformers, peft), which are not
dependencies of sciscale_jax: run by hand, in two environments.

In sciscale_jax's environment, the run's logits on the fixture's inputs (``expected.npz``):

    python tests/data/check_export_with_hf.py ours RUN_DIR ours.npz

In an environment with torch, transformers and peft (``pip install torch transformers peft``), the
logits of the exported folder (``merged``: ``sciscale export RUN --out FOLDER``) or of the adapters
on their base (``peft``: ``sciscale export RUN --out FOLDER --adapters``) against the run's:

    python tests/data/check_export_with_hf.py merged ours.npz FOLDER
    python tests/data/check_export_with_hf.py peft ours.npz FOLDER BASE
"""

import pathlib
import sys

import numpy as np

REF = pathlib.Path(__file__).parent / "esm2_tiny" / "expected.npz"


def ours(run_dir, out):
    import jax.numpy as jnp

    from sciscale_jax.data import ProteinTokenizer
    from sciscale_jax.models import esm
    from sciscale_jax.recipes import load_run

    ref = np.load(REF)
    model = load_run(run_dir, log=lambda *_: None).model
    logits = np.asarray(model(jnp.asarray(ref["our_ids"]), mask_bs=jnp.asarray(ref["mask"])))
    np.savez(out, logits=logits, rows=esm.rows(ProteinTokenizer().tokens, esm.ESM2_ALPHABET), mask=ref["mask"],
             esm_ids=ref["esm_ids"])


def hugging_face(kind, ours_file, folder, base=None):
    import torch
    import transformers

    o = np.load(ours_file)

    def logits(model):
        with torch.no_grad():
            out = model.eval()(input_ids=torch.tensor(o["esm_ids"], dtype=torch.long),
                               attention_mask=torch.tensor(o["mask"], dtype=torch.long)).logits
        return out.float().numpy()[..., o["rows"]]  # Hugging Face's columns in the run's row order

    if kind == "merged":
        model = transformers.EsmForMaskedLM.from_pretrained(folder)
    else:
        import peft
        model = peft.PeftModel.from_pretrained(transformers.EsmForMaskedLM.from_pretrained(base), folder)
    m, n = o["mask"], min(o["logits"].shape[-1], len(o["rows"]))
    theirs = logits(model)
    print(f"{kind}: max |run - Hugging Face| = {np.abs(o['logits'][m][:, :n] - theirs[m][:, :n]).max():.3g} "
          f"(largest logit {np.abs(theirs[m][:, :n]).max():.3g})")
    if kind == "peft":
        plain = logits(transformers.EsmForMaskedLM.from_pretrained(base))
        print(f"  the base alone: max |run - base| = {np.abs(o['logits'][m][:, :n] - plain[m][:, :n]).max():.3g}")


if __name__ == "__main__":
    if sys.argv[1] == "ours":
        ours(*sys.argv[2:4])
    else:
        hugging_face(*sys.argv[1:])
