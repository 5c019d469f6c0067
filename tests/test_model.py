"""model.py: causality, KV-cache equivalence, batching, GQA, sampling, parameter counts."""
import copy
import math
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import IGNORE_INDEX, ModelConfig, Transformer, sample_next

ROOT = Path(__file__).resolve().parents[1]


def make_model(seed=0, **kw):
    """A tiny model with large random weights, so greedy decoding does not collapse to one token."""
    args = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    args.update(kw)
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**args))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.35 if "tok_embeddings" in name or "output" in name else 0.25)
    return m.eval()


def reference_forward(m, idx):
    """Plain-math Llama forward (explicit repeat_kv, softmax attention, rotate-half RoPE) as HF writes it."""
    cfg = m.cfg
    B, T = idx.shape
    hd, rep = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # (B, H, T, D)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def norm(x, w):
        return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    x = m.tok_embeddings.weight[idx]
    for L in m.layers:
        a = L.attention
        h = norm(x, L.attention_norm.weight)
        q = (h @ a.wq.weight.T).view(B, T, cfg.n_heads, hd).transpose(1, 2)
        k = (h @ a.wk.weight.T).view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        v = (h @ a.wv.weight.T).view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + y @ a.wo.weight.T
        f = L.feed_forward
        h = norm(x, L.ffn_norm.weight)
        x = x + (F.silu(h @ f.w1.weight.T) * (h @ f.w3.weight.T)) @ f.w2.weight.T
    return norm(x, m.norm.weight) @ m.output.weight.T


GQA = [dict(n_kv_heads=1), dict(n_kv_heads=2), dict(n_kv_heads=4),
       dict(n_kv_heads=2, tie_embeddings=False), dict(n_kv_heads=4, tie_embeddings=False, rope_theta=500.0)]


@pytest.mark.parametrize("kw", GQA)
def test_forward_matches_reference_math(kw):
    m = make_model(**kw)
    idx = torch.randint(0, 97, (2, 20))
    logits, _ = m(idx)
    torch.testing.assert_close(logits, reference_forward(m, idx), atol=1e-4, rtol=1e-4)


def test_tied_and_untied_heads():
    tied, untied = make_model(tie_embeddings=True), make_model(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert "output.weight" in untied.state_dict()


def test_causality():
    m = make_model()
    idx = torch.randint(0, 97, (1, 24))
    base, _ = m(idx)
    for t in (0, 7, 23):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 97
        out, _ = m(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_loss_is_mean_cross_entropy_ignoring_index():
    m = make_model()
    idx = torch.randint(0, 97, (2, 12))
    tgt = torch.randint(0, 97, (2, 12))
    tgt[0, :5] = IGNORE_INDEX
    logits, loss = m(idx, tgt)
    keep = tgt != IGNORE_INDEX
    expected = -logits.log_softmax(-1)[keep].gather(1, tgt[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected)
    lp = m.token_logprobs(idx, tgt, temperature=0.7)
    ref = (logits / 0.7).log_softmax(-1).gather(2, tgt.clamp(min=0)[..., None]).squeeze(-1) * keep
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    assert (lp[0, :5] == 0).all()


@pytest.mark.parametrize("kw", GQA)
def test_cached_greedy_equals_full_recompute(kw):
    m = make_model(**kw)
    prompt = torch.randint(0, 97, (1, 9))
    # the cached generator
    got = [int(t) for t, _ in m.generate([prompt[0].tolist()], 64, temperature=0)]
    # re-running the whole sequence every step, and checking the cached logits on the way
    cache = m.new_cache(1)
    cached_logits = m.forward_cached(prompt, cache)
    seq = prompt
    for step in range(64):
        full_logits, _ = m(seq)
        torch.testing.assert_close(cached_logits, full_logits[:, -1].float(), atol=1e-4, rtol=1e-4)
        nxt = full_logits[:, -1].argmax(-1)
        assert int(nxt) == got[step], f"step {step}"
        seq = torch.cat([seq, nxt[:, None]], 1)
        cached_logits = m.forward_cached(nxt[:, None], cache)
    assert len(set(got)) > 3  # a real sequence, not one repeated token


@pytest.mark.parametrize("kw", GQA[:3])
def test_batched_prompts_of_different_lengths_match_alone(kw):
    m = make_model(**kw)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 1, 7)]
    batched = torch.stack([t for t, _ in m.generate(prompts, 20, temperature=0)], 1)
    for i, p in enumerate(prompts):
        alone = torch.stack([t for t, _ in m.generate([p], 20, temperature=0)], 1)
        assert batched[i].tolist() == alone[0].tolist()


@pytest.mark.parametrize("kw", [{}, {"conv_width": 4}])
def test_rows_join_a_running_batch(kw):
    """serve.py's continuous batching: a prompt prefilled into a free row mid-decode gives the same
    greedy tokens as when it runs alone (with the convolutions too: their raw q, k, v live in the cache)."""
    m = make_model(**kw)
    a, b = [5, 6, 7, 8, 9, 10], [40, 41]
    alone_b = [int(t) for t, _ in m.generate([b], 10, temperature=0)]
    cache = m.new_cache(2, 64)
    la = m.forward_cached(torch.tensor([a]), cache, rows=torch.tensor([0]))
    for _ in range(4):  # row 0 decodes alone for a while (row 1 is idle)
        la = m.forward_cached(la.argmax(-1)[:, None], cache, rows=torch.tensor([0]))
    lb = m.forward_cached(torch.tensor([b]), cache, rows=torch.tensor([1]))
    logits, got = torch.cat([la, lb]), []
    for _ in range(10):
        nxt = logits.argmax(-1)
        got.append(int(nxt[1]))
        logits = m.forward_cached(nxt[:, None], cache)
    assert got == alone_b


def test_stop_ids_end_rows_and_generation():
    m = make_model()
    first = [int(t) for t, _ in m.generate([[1, 2, 3]], 30, temperature=0)]
    stop = first[5]
    steps = list(m.generate([[1, 2, 3], [1, 2, 3]], 30, temperature=0, stop_ids=[stop]))
    k = first.index(stop)
    assert len(steps) == k + 1                          # ends when all rows stopped
    assert int(steps[-1][0][0]) == stop and steps[-1][1].all()  # the stop token is yielded, active


def test_packed_documents_equal_separate():
    m = make_model()
    d1, d2 = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 12))
    packed = torch.cat([d1, d2], 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 12])
    out, _ = m(packed, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :7], m(d1)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:], m(d2)[0], atol=1e-5, rtol=1e-5)


def test_seeded_sampling_reproducible_and_topk1_is_greedy():
    m = make_model()
    p = [[3, 1, 4, 1, 5]]

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([t for t, _ in m.generate(p, 25, num_samples=3, generator=g, **kw)], 1)

    a, b, c = run(7, temperature=1.0), run(7, temperature=1.0), run(8, temperature=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = torch.stack([t for t, _ in m.generate(p, 25, temperature=0)], 1)
    assert torch.equal(run(9, temperature=1.3, top_k=1), greedy.expand(3, -1))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    for p, allowed in [(0.5, {0}), (0.6, {0, 1}), (0.7, {0, 1}), (0.71, {0, 1, 2}), (0.99, {0, 1, 2, 3, 4})]:
        g = torch.Generator().manual_seed(0)
        seen = {int(sample_next(logits.expand(400, -1), 1.0, None, p, g)[i]) for i in range(400)}
        assert seen == allowed, (p, seen)


def test_config_round_trips_through_dict():
    cfg = ModelConfig(vocab_size=123, dim=64, n_heads=4, n_kv_heads=1, rope_theta=5e5, tie_embeddings=False)
    d = cfg.to_dict()
    assert ModelConfig.from_dict({**d, "learning_rate": 1.0}) == cfg
    assert d["ffn_dim"] == 192  # 8/3 * 64 = 170 -> next multiple of 64
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_1b_config_parameter_count_on_meta_device():
    g = runpy.run_path(str(ROOT / "config" / "1b.py"))
    cfg = ModelConfig.from_dict(g)
    with torch.device("meta"):
        m = Transformer(cfg)
    n = m.num_params()
    assert 0.9e9 <= n <= 1.2e9, n
    assert all(p.device.type == "meta" for p in m.parameters())
    assert cfg.max_seq_len == 2048
    # PaLM: 6N + 12 * n_layers * dim * T (tied head: N includes it once)
    assert m.flops_per_token(2048) == 6 * n + 12 * 20 * 2048 * 2048


def test_tiny_config_is_small():
    d = runpy.run_path(str(ROOT / "config" / "tiny.py"))
    assert d["vocab_size"] is None  # the data's: the demo tokenizer's 1024
    cfg = ModelConfig.from_dict({**d, "vocab_size": 1024})
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    assert 1e6 <= n <= 2e7, n


def test_cached_rows_under_bf16_autocast():
    """Prompts of different lengths write the cache by index; under CPU autocast k, v are bf16 while the
    cache is float32, and the write must cast (index_put does not)."""
    m = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = [int(t[0]) for t, _ in m.generate([[1, 2, 3], [4, 5, 6, 7, 8]], 8, temperature=0)]
    assert len(out) == 8


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_cpu_math_attention_equals_sdpa(n_kv_heads):
    """The CPU path (plain matmuls, float32 softmax) computes what SDPA computes: causal, with a packed-
    documents mask, and with fewer queries than keys (the last T of S positions); gradients too."""
    from model import math_attention
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 7, 8
    q = torch.randn(B, H, T, D, requires_grad=True)
    k, v = (torch.randn(B, n_kv_heads, T, D, requires_grad=True) for _ in range(2))
    gqa = n_kv_heads != H
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    out = math_attention(q, k, v, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
    mask = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()).unsqueeze(1)
    torch.testing.assert_close(math_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa),
                               atol=1e-5, rtol=1e-5)
    q3 = q[:, :, -3:]  # 3 queries at positions 4..6 over 7 keys
    causal = torch.ones(T, T, dtype=torch.bool).tril()[-3:]
    torch.testing.assert_close(math_attention(q3, k, v, None),
                               F.scaled_dot_product_attention(q3, k, v, attn_mask=causal, enable_gqa=gqa),
                               atol=1e-5, rtol=1e-5)


def test_compiled_decode_equals_eager_and_compiles_once_for_all_layers():
    """compile_for_decode: the one-row multiply-sum (model.Linear) gives eager's logits and greedy tokens,
    batched rows (the GEMM path) too; and the whole step is one graph per kind of call (prefill, decode),
    whatever the depth: a 3-layer model compiles as many graphs as a 1-layer one (each block gets its
    cache slice, not a layer index that dynamo would specialize on)."""
    from torch._dynamo.utils import counters
    from model import Linear
    torch.manual_seed(0)
    lin, x = Linear(24, 40), torch.randn(1, 1, 24)
    fast = torch.compile(lin, fullgraph=True)
    torch.testing.assert_close(fast(x), F.linear(x, lin.weight), atol=1e-5, rtol=1e-5)
    prompts = [torch.randint(0, 97, (9,)).tolist(), torch.randint(0, 97, (4,)).tolist()]
    graphs = {}
    for n_layers in (1, 3):
        torch._dynamo.reset()
        m = make_model(n_layers=n_layers)
        eager = [t.tolist() for t, _ in m.generate(prompts[:1], 24, temperature=0)]
        cache = m.new_cache(1)
        want = [m.forward_cached(torch.tensor([prompts[0]]), cache), m.forward_cached(torch.tensor([[5]]), cache)]
        counters.clear()
        m.compile_for_decode()
        assert [t.tolist() for t, _ in m.generate(prompts[:1], 24, temperature=0)] == eager
        graphs[n_layers] = counters["stats"]["unique_graphs"]
        cache = m.new_cache(1)
        got = [m.forward_cached(torch.tensor([prompts[0]]), cache), m.forward_cached(torch.tensor([[5]]), cache)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert graphs[1] == graphs[3] > 0, graphs
    assert not counters["graph_break"], dict(counters["graph_break"])   # the whole step is one graph
    eager_batch = [t.tolist() for t, _ in make_model(n_layers=3).generate(prompts, 12, temperature=0)]
    assert [t.tolist() for t, _ in m.generate(prompts, 12, temperature=0)] == eager_batch
    twin = copy.deepcopy(m)          # a copy of a compiled model runs its own weights, not the original's
    with torch.no_grad():
        twin.layers[0].feed_forward.w2.weight.mul_(3.0)
    ref = copy.deepcopy(twin)
    ref._compiled_blocks = None      # the same weights, eager
    x = torch.tensor([prompts[0]])
    got, want, orig = (model.forward_cached(x, model.new_cache(1)) for model in (twin, ref, m))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, orig, atol=1e-3)
    torch._dynamo.reset()


def test_compiled_decode_guards_what_can_change():
    """compile_for_decode skips dynamo's guards on the model's modules and weights and keeps those on the
    inputs, and compiles its own copy of the step's code for each model. So two models compiled in one
    process each decode as eager does, including two that differ only in weight shapes no input shows
    (the vocabulary: with one shared graph the second model failed on the first one's sizes) or in their
    head layout; and a model cast to another dtype after compiling recompiles (with no guards at all, the
    float32 graph runs on the bfloat16 tensors and fails)."""
    torch.manual_seed(0)
    models = [make_model(n_layers=1).eval(), make_model(n_layers=1, vocab_size=131).eval(),
              make_model(n_layers=1, n_heads=2, n_kv_heads=1).eval()]
    prompt = [torch.randint(0, 97, (7,)).tolist()]
    eager = [[t.tolist() for t, _ in m.generate(prompt, 8, temperature=0)] for m in models]
    for m in models:
        m.compile_for_decode()
    assert [[t.tolist() for t, _ in m.generate(prompt, 8, temperature=0)] for m in models] == eager
    a = models[0].to(torch.bfloat16)
    ref = copy.deepcopy(a)
    ref._compiled_blocks = None
    cache, ref_cache = a.new_cache(1), ref.new_cache(1)
    for x in (torch.tensor(prompt), torch.tensor([[eager[0][0][0]]])):  # prefill, then one decode step
        torch.testing.assert_close(a.forward_cached(x, cache), ref.forward_cached(x, ref_cache), atol=0.1, rtol=0.05)
    torch._dynamo.reset()
