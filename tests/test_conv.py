"""Short convolutions over queries, keys and values (model.Attention.conv), and copy drills (pretrain.py)."""
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer, apply_rope
from test_model import make_model
from test_pretrain import TINY, data_dir, pretrain, records  # noqa: F401 (data_dir: a fixture)


def test_conv_is_the_formula():
    """One attention layer against the formula: u'_j = u_j + sum_{i=1}^{w-1} c_i u_{j-i} for u = q, k, v, then RoPE."""
    m = make_model(n_layers=1, conv_width=4)  # make_model draws every 2-D weight at random, conv included
    att, h, T = m.layers[0].attention, torch.randn(1, 9, 32), 9
    cos, sin = m._rope(torch.arange(T)[None])
    u = torch.cat([att.wq(h), att.wk(h), att.wv(h)], -1)[0]                  # (T, C)
    mixed = torch.stack([u[j] + sum(att.conv[i - 1] * u[j - i] for i in range(1, 4) if j >= i) for j in range(T)])
    q, k, v = mixed[None].split([32, 16, 16], -1)
    q = apply_rope(q.view(1, T, 4, 8), cos, sin).transpose(1, 2)
    k = apply_rope(k.view(1, T, 2, 8), cos, sin).transpose(1, 2)
    v = v.view(1, T, 2, 8).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(att(h, cos, sin, None), att.wo(y.transpose(1, 2).reshape(1, T, 32)))


def test_zero_conv_is_a_plain_model_and_keys_start_smeared():
    """c = 0 gives the plain model's outputs; a new model's keys start as k_j + k_{j-1}, queries and values plain."""
    plain, conv = make_model(), make_model(conv_width=3)
    c = Transformer(ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, conv_width=3)).layers[0]
    assert c.attention.conv[0].tolist() == [0.0] * 32 + [1.0] * 16 + [0.0] * 16 and not c.attention.conv[1].any()
    conv.load_state_dict({**plain.state_dict(), **{k: torch.zeros_like(v) for k, v in conv.state_dict().items()
                                                   if k.endswith("conv")}})
    x = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(conv(x)[0], plain(x)[0])


def test_cached_decode_equals_full_forward_with_conv():
    """The cache keeps each layer's raw queries, keys and values for the window: prompts of different lengths
    prefilled together, then token by token, give the full forward's argmax at every step; two rows per prompt
    (generate copies the cache) decode the same."""
    m = make_model(conv_width=4)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (2, 9, 5)]
    out = [list(p) for p in prompts for _ in range(2)]
    for toks, _ in m.generate(prompts, 12, temperature=0, num_samples=2):
        for o, t in zip(out, toks.tolist()):
            o.append(t)
    assert out[0::2] == out[1::2]
    for o in out[0::2]:
        for t in range(len(o) - 12, len(o)):   # greedy: each token is the argmax of the full forward before it
            assert m(torch.tensor([o[:t]]))[0][0, -1].argmax().item() == o[t]


def test_packed_documents_equal_separate_with_conv():
    """A document's first tokens mix in nothing from the document before it, packed or alone."""
    m = make_model(conv_width=4)
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 11))
    packed, _ = m(torch.cat([a, b], 1), doc_ids=torch.tensor([[0] * 7 + [1] * 11]))
    torch.testing.assert_close(packed[:, :7], m(a)[0])
    torch.testing.assert_close(packed[:, 7:], m(b)[0])


def test_export_refuses_conv(tmp_path):
    export = pytest.importorskip("export")
    from tokenizer import Tokenizer
    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, conv_width=4))
    with pytest.raises(ValueError, match="conv_width=4"):
        export.export_hf(m, Tokenizer.__new__(Tokenizer), str(tmp_path))


@pytest.mark.slow
def test_copy_drills_teach_a_conv_model_to_copy(tmp_path, data_dir):
    """300 steps of copy drills take a 2-layer model with convolved keys from copying nothing to copying
    most of a repeated random sequence (the copy probe pretrain.py logs); without them the same steps
    teach it nothing (a plain transformer must first grow a previous-token head)."""
    probes = {}
    for width in ("4", "0"):
        out = str(tmp_path / width)
        pretrain(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", f"--conv_width={width}", "--dim=64",
                         "--batch_size=16", "--max_seq_len=64", "--lr=1e-2", "--warmup_steps=10", "--copy_start=0",
                         "--copy_end=300", "--max_steps=300", "--eval_interval=300", "--sample_tokens=0"])
        probes[width] = [p for _, p in records(out, "copy_probe")]
    assert probes["4"][0] < 0.05 and probes["4"][-1] > 0.5, probes
    assert probes["0"][-1] < 0.1, probes
