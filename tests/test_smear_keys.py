"""Smeared keys (model.Attention.smear) and the copy drills that teach copying (pretrain.copy_drills)."""
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer, apply_rope
from test_model import make_model
from test_pretrain import TINY, data_dir, pretrain, records  # noqa: F401 (data_dir: a fixture)



def smeared_model(**kw):
    m = make_model(smear_keys=True, **kw)
    with torch.no_grad():
        for layer in m.layers:
            layer.attention.smear.normal_(0, 2.0)  # a different mix per head, far from the init's 1/2
    return m


def test_smear_is_the_previous_key_mixed_in():
    """One attention layer against the formula: k'_j = s k_j + (1 - s) k_{j-1}, k'_0 = s k_0, s per kv head."""
    m = smeared_model(n_layers=1)
    att, h = m.layers[0].attention, torch.randn(1, 6, 32)
    cos, sin = m._rope(torch.arange(6)[None])
    q = apply_rope(att.wq(h).view(1, 6, 4, 8), cos, sin).transpose(1, 2)   # (1, H, T, D)
    k = apply_rope(att.wk(h).view(1, 6, 2, 8), cos, sin).transpose(1, 2)   # (1, Hkv, T, D)
    v = att.wv(h).view(1, 6, 2, 8).transpose(1, 2)
    s = torch.sigmoid(att.smear)
    k = s * k + (1 - s) * torch.cat([torch.zeros_like(k[:, :, :1]), k[:, :, :-1]], 2)
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(att(h, cos, sin, None), att.wo(y.transpose(1, 2).reshape(1, 6, 32)))


def test_large_smear_is_a_plain_model():
    """s -> 1 leaves each key alone: the same outputs as the model without the parameter."""
    plain, smeared = make_model(), make_model(smear_keys=True)
    smeared.load_state_dict({**plain.state_dict(), **{k: torch.full_like(v, 50.0) for k, v in smeared.state_dict().items()
                                                      if k.endswith("smear")}})
    x = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(smeared(x)[0], plain(x)[0])


def test_cached_decode_equals_full_forward_with_smeared_keys():
    """The cache keeps raw keys and smears the span it reads: prompts of different lengths prefilled
    together, then token by token, give the full forward's logits at every step."""
    m = smeared_model()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 9, 5)]
    out = [list(p) for p in prompts]
    for toks, _ in m.generate(prompts, 12, temperature=0):
        for o, t in zip(out, toks.tolist()):
            o.append(t)
    for o, p in zip(out, prompts):
        for t in range(len(p), len(o)):   # greedy: each token is the argmax of the full forward before it
            assert m(torch.tensor([o[:t]]))[0][0, -1].argmax().item() == o[t]


def test_packed_documents_equal_separate_with_smeared_keys():
    """A document's first key has no previous key, packed or alone."""
    m = smeared_model()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 11))
    packed, _ = m(torch.cat([a, b], 1), doc_ids=torch.tensor([[0] * 7 + [1] * 11]))
    torch.testing.assert_close(packed[:, :7], m(a)[0])
    torch.testing.assert_close(packed[:, 7:], m(b)[0])


def test_export_refuses_smeared_keys(tmp_path):
    export = pytest.importorskip("export")
    from tokenizer import Tokenizer
    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, smear_keys=True))
    with pytest.raises(ValueError, match="smear_keys=True"):
        export.export_hf(m, Tokenizer.__new__(Tokenizer), str(tmp_path))


@pytest.mark.slow
def test_copy_drills_teach_a_smeared_key_model_to_copy(tmp_path, data_dir):
    """300 steps of copy drills take a 2-layer model with smeared keys from copying nothing to copying
    most of a repeated random sequence (the copy probe pretrain.py logs); without smeared keys the same
    steps teach it nothing (a plain transformer must first grow a previous-token head)."""
    probes = {}
    for smear in ("true", "false"):
        out = str(tmp_path / smear)
        pretrain(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", f"--smear_keys={smear}", "--dim=64",
                         "--batch_size=16", "--max_seq_len=64", "--lr=1e-2", "--warmup_steps=10", "--copy_start=0",
                         "--copy_end=300", "--max_steps=300", "--eval_interval=300", "--sample_tokens=0"])
        probes[smear] = [p for _, p in records(out, "copy_probe")]
    assert probes["true"][0] < 0.05 and probes["true"][-1] > 0.5, probes
    assert probes["false"][-1] < 0.1, probes
