"""Writes ``tests/data/esm2_tiny/``: a small randomly initialised ESM-2 in Hugging Face's layout
(config.json, model.safetensors, vocab.txt) and what Hugging Face's own ``EsmForMaskedLM``
computes with it (expected.npz), the reference ``tests/test_esm.py`` checks the import against.

Run by hand in an environment with torch and transformers (not a dependency of sciscale_jax):

    python -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors numpy
    /tmp/hf/bin/python tests/data/make_esm2_fixture.py            # everything
    /tmp/hf/bin/python tests/data/make_esm2_fixture.py contacts   # expected_contacts.npz alone

The weights are random but not small (normal draws, norms and biases away from 1 and 0), so
every part of the network moves the logits; the inputs hold padding, mask tokens (ESM-2's
token dropout rescales the embeddings by their share) and the rare residues B Z U O X.
"""

import json
import pathlib

import numpy as np
import torch
import transformers

OUT = pathlib.Path(__file__).parent / "esm2_tiny"
ESM_ALPHABET = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
# sciscale_jax's ProteinTokenizer tokens by id, written out so the fixture does not import the code it checks
OURS = ["<pad>", "<mask>", "<cls>", "<eos>", *"ACDEFGHIKLMNPQRSTVWY", *"XBZUO"]
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ<mask>AKEIWN<mask>BZ", "PEPTIDEUOX<mask>LL"]


def main():
    torch.manual_seed(0)
    config = transformers.EsmConfig(
        vocab_size=len(ESM_ALPHABET), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=1026, position_embedding_type="rotary",
        token_dropout=True, emb_layer_norm_before=False, mask_token_id=32, pad_token_id=1,
        layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        tie_word_embeddings=True)
    model = transformers.EsmForMaskedLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight") or "emb_layer_norm" in name \
                    and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    OUT.mkdir(exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    (OUT / "vocab.txt").write_text("\n".join(ESM_ALPHABET) + "\n")

    def tokens(seq):
        out, i = ["<cls>"], 0
        while i < len(seq):
            j = seq.find(">", i) + 1 if seq[i] == "<" else i + 1
            out.append(seq[i:j])
            i = j
        return out + ["<eos>"]

    rows = [tokens(s) for s in SEQUENCES]
    seq_len = max(map(len, rows))
    rows = [r + ["<pad>"] * (seq_len - len(r)) for r in rows]
    esm_ids = torch.tensor([[ESM_ALPHABET.index(t) for t in r] for r in rows])
    our_ids = np.array([[OURS.index(t) for t in r] for r in rows], np.int32)
    mask = (esm_ids != 1).long()
    out = model(input_ids=esm_ids, attention_mask=mask, output_hidden_states=True)
    # Hugging Face's masked-LM loss (cross-entropy over its 33 tokens) on random targets at random
    # real positions, and its gradient for parts of every kind the import maps
    rng = np.random.default_rng(0)
    targets = rng.integers(4, len(OURS), size=our_ids.shape).astype(np.int32)  # our residue ids
    weights = ((rng.random(our_ids.shape) < 0.5) & (our_ids != 0)).astype(np.float32)
    esm_targets = torch.tensor([[ESM_ALPHABET.index(OURS[t]) for t in row] for row in targets])
    logp = torch.log_softmax(out.logits, dim=-1)
    nll = -torch.gather(logp, -1, esm_targets[..., None])[..., 0]
    loss = (nll * torch.tensor(weights)).sum()
    loss.backward()
    esm = model.esm
    np.savez(
        OUT / "expected.npz", our_ids=our_ids, esm_ids=esm_ids.numpy().astype(np.int32),
        mask=mask.numpy().astype(bool), logits=out.logits.detach().numpy(),
        hidden=out.hidden_states[-1].detach().numpy(), targets=targets, weights=weights,
        loss=np.float32(loss.item()),
        grad_embed=esm.embeddings.word_embeddings.weight.grad.numpy(),
        grad_query0=esm.encoder.layer[0].attention.self.query.weight.grad.numpy(),
        grad_query_bias1=esm.encoder.layer[1].attention.self.query.bias.grad.numpy(),
        grad_head_norm=model.lm_head.layer_norm.weight.grad.numpy(),
        grad_head_bias=model.lm_head.bias.grad.numpy())
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                      "files": sorted(p.name for p in OUT.iterdir())}))


def contacts():
    """``expected_contacts.npz``: what Hugging Face's ``EsmForMaskedLM.predict_contacts`` (ESM's
    contact head: attention maps of every layer and head, symmetrised, APC-corrected, logistic
    regression) gives on the fixture's inputs, as a batch with padding (``batched``, over the
    positions between cls and the last column) and each protein alone without padding
    (``alone_<i>``, residue by residue), with the attention probabilities of the batch."""
    model = transformers.EsmForMaskedLM.from_pretrained(OUT, attn_implementation="eager").eval()
    ref = np.load(OUT / "expected.npz")
    ids, mask = torch.tensor(ref["esm_ids"], dtype=torch.long), torch.tensor(ref["mask"], dtype=torch.long)
    with torch.no_grad():
        batched = model.predict_contacts(ids, attention_mask=mask)
        attentions = torch.stack(model.esm(ids, attention_mask=mask, output_attentions=True).attentions, dim=1)
        alone = {}
        for i in range(len(ids)):
            n = int(mask[i].sum())
            alone[f"alone_{i}"] = model.predict_contacts(ids[i:i + 1, :n], attention_mask=mask[i:i + 1, :n])[0].numpy()
    np.savez(OUT / "expected_contacts.npz", batched=batched.numpy(), attentions=attentions.numpy(), **alone)


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["contacts"]:  # the contact reference alone, from the fixture as saved
        contacts()
    else:
        main()
        contacts()
