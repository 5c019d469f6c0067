"""The AstrAI-nano model: a Llama-style decoder-only Transformer and its KV-cache generator, torch only.

Read top to bottom: config, RMSNorm, RoPE, attention, SwiGLU, training forward, cached decoding, sampling; skip the
last section, "CPU speed tricks", on a first read. Tensors map one-to-one onto HF LlamaForCausalLM (export.py).

    python -c "import model; print(model.Transformer(model.ModelConfig()).num_params())"
"""
import math
import types
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets equal to this contribute no loss (prompt tokens, padding)


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4          # GQA: n_heads / n_kv_heads query heads share one key/value head
    ffn_dim: int | None = None   # SwiGLU hidden size; None -> 8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    conv_width: int = 0          # > 1: each query, key and value mixes in the conv_width - 1 before it (Attention)

    def __post_init__(self):
        if self.ffn_dim is None:
            # SwiGLU has three matrices, so Shazeer (2020) shrinks 4d to 2/3 * 4d: a 4d GELU MLP's parameters
            self.ffn_dim = 64 * math.ceil(int(8 * self.dim / 3) / 64)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"dim ({self.dim}) must divide by n_heads ({self.n_heads}) into an even head_dim "
                             f"(RoPE rotates pairs), and n_heads by n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):  # ignores keys that are not model fields (run configs hold many more)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019). Computed in float32 like HF Llama."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim, max_len, theta):
    """cos/sin of RoFormer (Su et al. 2021, eq. 34): angle m * theta^(-2i/d) for position m, pair i.
    Rotate-half layout: the pairs are (x[i], x[i + d/2]), so the angles are repeated as [f, f]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, T, H, D); cos, sin: (B, T, 1, D). Rotates each pair (x1, x2) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim)  # Linear: nn.Linear, no bias (CPU speed tricks)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.dropout = cfg.dropout
        # Short convolutions (cf. Allen-Zhu 2025, "Physics of Language Models 4.1", Canon layers): before RoPE, each
        # query, key and value u_j <- u_j + sum_{i=1}^{w-1} c_i * u_{j-i}, learned per channel. A key that carries
        # the tokens before it can be found by a name several tokens back ("Kani's favourite colour is | red"), the
        # lookup a reading model needs; one layer can then copy (at w = 2 a key is the smeared key of Olsson et al.
        # 2022, sec. 3). Keys start as k_j + k_{j-1}, queries and values as plain ones.
        self.conv = None
        if cfg.conv_width > 1:
            c = torch.zeros(cfg.conv_width - 1, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
            c[0, cfg.n_heads * cfg.head_dim:(cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim] = 1.0
            self.conv = nn.Parameter(c)

    def forward(self, x, cos, sin, mask, cache=None):
        """mask: None (causal), bool (B, 1, T, S) or "none" (decode: all cached keys); cache: see KVCache.write."""
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.conv is not None:
            qkv = torch.cat([q, k, v], dim=-1)
            qkv = qkv + (self.conv_full(qkv, mask) if cache is None else self.conv_cached(qkv, *cache[2:]))
            q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if cache is not None:
            K, V, _, span, rows, pos = cache
            k, v = KVCache.write(K, V, span, rows, pos, k, v)     # (B, Hkv, S, D) views of the filled prefix
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = q.transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if (x.device.type == "cpu" and cache is None and T <= CPU_MATH_ATTENTION_MAX_LEN
                and torch.compiler.is_compiling()):
            y = math_attention(q, k, v, mask, dropout_p)  # the same math, faster compiled (CPU speed tricks)
        else:  # GQA: query head h reads kv head h // (n_heads / n_kv_heads), as HF's repeat_kv, without copies
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if isinstance(mask, str) else mask,
                                               is_causal=mask is None, dropout_p=dropout_p,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return F.dropout(self.wo(y), self.dropout, self.training)

    def conv_full(self, u, mask):
        """sum_i c_i * u_{j-i} for every position j of u (B, T, C); with packed documents not across their starts."""
        out = 0
        for i, c in enumerate(self.conv.to(u.dtype), 1):
            prev = F.pad(u, (0, 0, i, 0))[:, :u.shape[1]]                # u_{j-i}, zero before position 0
            if isinstance(mask, torch.Tensor):                           # j sees j - i only in its document
                prev = prev * F.pad(mask[:, 0].diagonal(-i, -2, -1), (i, 0))[..., None]
            out = out + c * prev
        return out

    def conv_cached(self, u, U, span, rows, pos):
        """The same for new tokens at pos: their raw u go into the cache's U, and each reads the w - 1 before it."""
        b, T, _ = u.shape
        r = (torch.arange(b, device=u.device) if rows is None else rows)[:, None]
        p = (pos + torch.arange(T, device=u.device) if isinstance(pos, int) else pos).expand(b, T)
        U[r, p] = u.to(U.dtype)
        back = p[:, :, None] - torch.arange(1, len(self.conv) + 1, device=u.device)  # (b, T, w-1) positions
        prev = U[r[:, :, None], back.clamp(min=0)] * (back >= 0)[..., None]          # zero before position 0
        return (prev * self.conv.to(U.dtype)).sum(2).to(u.dtype)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim)  # gate
        self.w3 = Linear(cfg.dim, cfg.ffn_dim)  # up
        self.w2 = Linear(cfg.ffn_dim, cfg.dim)  # down
        self.dropout = cfg.dropout

    def forward(self, x):
        return F.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class KVCache:
    """Preallocated keys, values (and raw q, k, v for Attention.conv); each row has its own length (no left
    padding), so engine.py can refill a free row."""

    def __init__(self, cfg: ModelConfig, batch_size, max_len, dtype, device):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim  # raw queries, keys, values for Attention.conv
        self.u = [torch.zeros(batch_size, max_len, width, dtype=dtype, device=device) if cfg.conv_width > 1 else None
                  for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    def reset(self, rows):
        self.lengths[rows] = 0

    @staticmethod
    def write(K, V, span, rows, pos, k, v):
        """Write k, v at pos of rows (None: all); return keys, values [0, span). Static: no layer state to guard on."""
        if rows is None and isinstance(pos, int):      # all rows at the same offset: plain slice copy
            K[:, :, pos:pos + k.shape[1]] = k.transpose(1, 2)
            V[:, :, pos:pos + k.shape[1]] = v.transpose(1, 2)
        else:
            r = torch.arange(K.shape[0], device=K.device) if rows is None else rows
            K[r[:, None], :, pos] = k.to(K.dtype)      # advanced indexing: target is (b, T, Hkv, D);
            V[r[:, None], :, pos] = v.to(V.dtype)      # index_put does not cast (autocast gives bf16 k, v)
        r = slice(None) if rows is None else rows
        return K[r, :, :span], V[r, :, :span]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one matrix reads and writes tokens
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # recomputed, never stored
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False  # recompute each block in backward: memory for compute (common.py)
        self._compiled_blocks = None     # the decode step compile_for_decode compiled
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        # GPT-2 (Radford et al. 2019, sec. 2.3): each block adds two projections onto the residual stream; an
        # init std scaled by 1/sqrt(2 * n_layers) keeps the stream's scale independent of depth.
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, PaLM (Chowdhery et al. 2022) app. B: 6N for the weight matmuls (N without an
        untied input embedding, a lookup) plus 12 * n_layers * dim * seq_len for attention scores and values."""
        n = self.num_params() - (0 if self.cfg.tie_embeddings else self.tok_embeddings.weight.numel())
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.dim * seq_len

    def _rope(self, pos):  # cos, sin for positions pos (B, T), shaped (B, T, 1, D) to broadcast over heads
        return self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2)

    def hidden_states(self, idx, doc_ids=None):
        """Final normed hidden states (B, T, dim); doc_ids (B, T) packs documents in a row as if one by one."""
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        ar = torch.arange(T, device=idx.device)
        if doc_ids is None:
            pos, mask = ar.expand(B, T), None
        else:
            starts = torch.ones_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            pos = ar - torch.cummax(torch.where(starts, ar, 0), dim=1).values
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same_doc & (ar[:, None] >= ar[None, :])).unsqueeze(1)
        cos, sin = self._rope(pos)
        x = F.dropout(self.tok_embeddings(idx), self.cfg.dropout, self.training)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def forward(self, idx, targets=None, doc_ids=None):
        """Logits (B, T, vocab) and the mean cross-entropy over targets that are not IGNORE_INDEX (or None)."""
        logits = self.output(self.hidden_states(idx, doc_ids))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def token_logprobs(self, idx, targets, doc_ids=None, temperature=1.0):
        """log p(targets[b, t] | idx[b, :t+1]) under softmax(logits / temperature), (B, T); 0 at IGNORE_INDEX."""
        logits = self(idx, doc_ids=doc_ids)[0].float() / temperature
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return -nll.view(targets.shape)

    # ---- inference with a KV cache ---------------------------------------------------------------
    def new_cache(self, batch_size, max_len=None):  # in the weights' dtype, on their device
        max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        w = self.tok_embeddings.weight
        return KVCache(self.cfg, batch_size, max_len, w.dtype, w.device)

    def compile_for_decode(self):
        """Compile the cached forward; call it again after changing the model: nothing guards its modules (trick 4)."""
        self._compiled_blocks = compile_decode_step(self.tok_embeddings.weight.device)
        return self

    def _cached_blocks(self, x, cos, sin, mask, ks, vs, us, span, rows, where, last):
        """The body of forward_cached: every block over the cache, then the LM head at `last`."""
        for layer, K, V, U in zip(self.layers, ks, vs, us):
            x = layer(x, cos, sin, mask, cache=(K, V, U, span, rows, where))
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return self.output(self.norm(x)).float()

    def forward_cached(self, idx, cache, rows=None, lengths=None):
        """Append idx (b, T; right-padded to `lengths`) to cache rows (None: all); logits of each row's last token."""
        b, T = idx.shape
        start = cache.lengths if rows is None else cache.lengths[rows]
        new_len = start + (T if lengths is None else lengths)
        if int(new_len.max()) > cache.max_len:
            raise ValueError(f"KV cache full: {int(new_len.max())} > {cache.max_len} positions")
        start_host = start.tolist()
        uniform = rows is None and len(set(start_host)) == 1    # every row at the same offset
        s0 = start_host[0]
        span = max(start_host) + T    # the forward reads keys [0, span)
        pos = start[:, None] + torch.arange(T, device=idx.device)  # (b, T) absolute positions
        if uniform and T == 1:
            mask = "none"              # one new token sees every cached key: no mask at all
        elif uniform and s0 == 0:
            mask = None                # fresh prefill: plain causal attention (flash kernels on GPU)
        else:                          # key j is visible to the query at absolute position p iff j <= p
            mask = (torch.arange(span, device=idx.device) <= pos[:, :, None]).unsqueeze(1)
        cos, sin = self._rope(pos)
        blocks = self._compiled_blocks or Transformer._cached_blocks
        logits = blocks(self, self.tok_embeddings(idx), cos, sin, mask, cache.k, cache.v, cache.u, span,
                        rows, s0 if uniform else pos, None if lengths is None else lengths - 1)
        if rows is None:
            cache.lengths = new_len
        else:
            cache.lengths[rows] = new_len
        return logits

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                 num_samples=1, generator=None):
        """Yield (tokens, active) per step; row r continues prompt r // num_samples, inactive after a stop token."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no empty prompt (start with BOS)")
        device = self.tok_embeddings.weight.device
        longest = max(len(p) for p in prompts)
        if longest >= self.cfg.max_seq_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room within max_seq_len {self.cfg.max_seq_len}")
        max_new_tokens = min(max_new_tokens, self.cfg.max_seq_len - longest)
        if max_new_tokens <= 0:
            return
        idx = torch.tensor([list(p) + [0] * (longest - len(p)) for p in prompts], dtype=torch.long, device=device)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        cache = self.new_cache(len(prompts), longest + max_new_tokens)
        logits = self.forward_cached(idx, cache, lengths=None if len(set(lengths.tolist())) == 1 else lengths)
        if num_samples > 1:  # prefill each prompt once, then sample num_samples rows from it
            cache.k = [t.repeat_interleave(num_samples, dim=0) for t in cache.k]
            cache.v = [t.repeat_interleave(num_samples, dim=0) for t in cache.v]
            cache.u = [t if t is None else t.repeat_interleave(num_samples, dim=0) for t in cache.u]
            cache.lengths = cache.lengths.repeat_interleave(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        active = torch.ones(logits.shape[0], dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            yield tok, active.clone()
            active &= ~torch.isin(tok, stop)
            if step == max_new_tokens - 1 or not active.any():
                return
            logits = self.forward_cached(tok[:, None], cache)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (N, vocab); temperature 0 (or None) is greedy. top_k keeps the k likeliest
    tokens; top_p (nucleus, Holtzman et al. 2020) the smallest likeliest set whose mass reaches p."""
    if not temperature:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = torch.sort(F.softmax(logits, dim=-1), dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs          # mass of the tokens ranked above each one
        drop = mass_before >= top_p                         # the set already reached p without it
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


# ==== CPU speed tricks (skip on a first read): each acts only under torch.compile and computes the same math ====
# Gains measured on the 2-core AMD EPYC with `python bench.py train` and `decode` (docs/benchmarks.md).
# 1. Compiled CPU attention as two matmuls around a float32 softmax, which inductor fuses (SDPA's flash kernel
#    took 27% of the step for 9% of its FLOPs): 15M bf16 train step, 51% -> 65% MFU. Longer: SDPA (less memory).
CPU_MATH_ATTENTION_MAX_LEN = 1024


def math_attention(q, k, v, mask, dropout_p=0.0):
    """softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017, eq. 1) as SDPA, in matmuls, float32 scores."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # GQA: repeat each key/value head for its group of query heads (HF's repeat_kv)
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    if mask is None:  # causal: query t (the last T of S positions) sees keys up to its own position
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    att = F.dropout(scores.softmax(dim=-1), dropout_p)
    return att.to(v.dtype) @ v


class Linear(nn.Linear):
    """2. nn.Linear without a bias; a compiled CPU one-row product (batch-1 decode) is a threaded multiply-sum (56 GB/s,
    not MKL's one-core GEMV at 17 GB/s): 100M fp32 decode 37 -> 95 tokens/s. Eager and GEMMs keep F.linear."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if (x.device.type == "cpu" and torch.compiler.is_compiling() and x.shape[:-1].numel() == 1
                and x.dtype == self.weight.dtype):
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight)


def compile_decode_step(device):
    """3. The whole cached forward as one graph, dynamic shapes (fewer guard checks, less Python): 6-10% faster.
    4. No guards on modules or weights (the inputs' catch a cast or move of the model): 0.42 -> 0.14 ms a token;
       so each call compiles its own copy of the function, which takes the model as an argument.
    5. cpp_wrapper on a CPU (kernels called from C++): ~0.3 ms a token faster, ~10 s more to compile."""
    f = Transformer._cached_blocks
    step = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
    options = {"guard_filter_fn": skip} if skip else {}
    if device.type == "cpu":
        options["cpp_wrapper"] = True
    return torch.compile(step, dynamic=True, options=options)
