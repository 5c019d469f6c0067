"""The AstrAI-nano model: a Llama-style decoder-only Transformer, and its KV-cache generator.

One file, torch only. Read it top to bottom:

    ModelConfig        the shape of the network (stored in every checkpoint and config.json)
    RMSNorm, RoPE      normalization and rotary position embeddings (rotate-half convention)
    Attention          grouped-query attention: F.scaled_dot_product_attention (plain matmuls on CPU)
    FeedForward        SwiGLU MLP
    Transformer        embedding -> n_layers x [pre-norm attention, pre-norm MLP] -> norm -> LM head
    KVCache            preallocated per-layer key/value buffers with a length per row
    generate           batched, streaming sampling (greedy, temperature, top-k, top-p, stop ids)

Every tensor maps one-to-one onto Hugging Face `LlamaForCausalLM` (export.py only renames keys):
tok_embeddings -> model.embed_tokens, layers.i.attention.wq/wk/wv/wo -> self_attn.q/k/v/o_proj,
layers.i.feed_forward.w1/w3/w2 -> mlp.gate/up/down_proj, attention_norm -> input_layernorm,
ffn_norm -> post_attention_layernorm, norm -> model.norm, output -> lm_head. We use HF's
"rotate-half" RoPE layout (not Meta's interleaved pairs), so no permutation of wq/wk is needed.

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
    smear_keys: bool = False     # mix each key with the previous token's key (Attention.smear)

    def __post_init__(self):
        if self.ffn_dim is None:
            # SwiGLU has three matrices instead of two, so Shazeer (2020) and Llama shrink the hidden
            # size from 4d to 2/3 * 4d to keep the parameter count of a 4d GELU MLP.
            self.ffn_dim = 64 * math.ceil(int(8 * self.dim / 3) / 64)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim ({self.dim}) must divide by n_heads ({self.n_heads}) and n_heads by "
                             f"n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Build from a dict, ignoring keys that are not model fields (run configs hold many more)."""
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


# Under torch.compile on a CPU, full-sequence attention (training, scoring) is written out as two matmuls
# around a float32 softmax: inductor fuses the scale, mask and softmax into one pass between two bf16
# GEMMs, while SDPA's CPU flash kernel works in small blocks at a third of the GEMM speed (it cost a 15M
# model's compiled training step 27% of its time for 9% of its FLOPs; bench.py train, README "Speed on this
# machine"). Eager, the written-out form is slower: every step allocates and frees the (B, H, T, T)
# scores several times over. The scores take B*H*T*T*4 bytes; past this length SDPA (memory linear in T).
CPU_MATH_ATTENTION_MAX_LEN = 1024


def math_attention(q, k, v, mask, dropout_p=0.0):
    """softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017, eq. 1), what SDPA computes, as plain matmuls
    with the scores and softmax in float32. q (B, H, T, D); k, v (B, Hkv, S, D); mask as in Attention."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # GQA: repeat each key/value head for its group of query heads (HF's repeat_kv)
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    if mask is None:  # causal: query t (the last T of S positions) sees keys up to its own position
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if not isinstance(mask, str):
        scores = scores.masked_fill(~mask, float("-inf"))
    att = F.dropout(scores.softmax(dim=-1), dropout_p)
    return att.to(v.dtype) @ v


class Linear(nn.Linear):
    """nn.Linear without a bias, plus one fast path. Batch-1 decode multiplies ONE row by every weight
    matrix, so it is bound by reading the weights from memory. On a CPU, PyTorch hands that product to
    MKL's GEMV, which runs on a single core and streams ~17 GB/s on this project's 2-core AMD machine,
    where a plain sum reads 57 GB/s. Written as a multiply and a sum over the input dimension, inductor
    compiles it to one vectorized, multi-threaded reduction that reads the matrix once at memory speed
    (56 GB/s; README "Benchmarks"). Eager, that form would first write the whole product
    out, so it is used only while compiling; every other case keeps F.linear (GEMM for many rows)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if (x.device.type == "cpu" and torch.compiler.is_compiling() and x.shape[:-1].numel() == 1
                and x.dtype == self.weight.dtype):
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.dropout = cfg.dropout
        # Smeared keys (Olsson et al. 2022, "In-context Learning and Induction Heads", sec. 3, argument 2):
        # key j becomes s * k_j + (1 - s) * k_{j-1}, s = sigmoid(smear), one learned s per key/value head.
        # An induction head looks for the earlier token that followed the current one; a plain
        # transformer must first build a previous-token head in one layer to find it, which a small model
        # on little data learns late or never (the demo: no copying after 600 steps). With the previous
        # token folded into each key, one layer can do it: copying appears in ~150 steps of copy drills.
        self.smear = nn.Parameter(torch.zeros(cfg.n_kv_heads, 1, 1)) if cfg.smear_keys else None

    def forward(self, x, cos, sin, mask, cache=None):
        """mask: None (plain causal), a bool (B, 1, T, S) tensor (True = may attend), or "none" when every
        query may see every cached key (one-token decode). cache: (K, V, span, rows, pos), this layer's
        slice of a KVCache and where to write (KVCache.write), or None."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = KVCache.write(*cache, k, v)                   # (B, Hkv, S, D) views of the filled prefix
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.smear is not None:
            prev = F.pad(k, (0, 0, 1, 0))[:, :, :-1]               # k_{j-1}; zero before position 0
            if cache is None and isinstance(mask, torch.Tensor):  # packed documents: at a document's first
                sees_prev = mask[:, :, 1:, :-1].diagonal(dim1=-2, dim2=-1)  # token j may not see j - 1
                prev = prev * F.pad(sees_prev, (1, 0))[..., None]
            s = torch.sigmoid(self.smear).to(k.dtype)  # (the cache keeps raw keys; each row starts at 0)
            k = s * k + (1 - s) * prev
        q = q.transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if (x.device.type == "cpu" and cache is None and T <= CPU_MATH_ATTENTION_MAX_LEN
                and torch.compiler.is_compiling()):
            y = math_attention(q, k, v, mask, dropout_p)
        else:
            # GQA: query head h reads key/value head h // (n_heads / n_kv_heads), the same grouping as
            # HF's repeat_kv; SDPA does it without materializing the repeated keys.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if isinstance(mask, str) else mask, is_causal=mask is None,
                dropout_p=dropout_p, enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return F.dropout(self.wo(y), self.dropout, self.training)


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
    """Keys and values of every layer, preallocated once: (B, n_kv_heads, max_len, head_dim) each.

    Each row has its own length, so prompts of different lengths share one batch without left padding:
    row b's next token sits at position lengths[b] and attends to keys [0, lengths[b]]. We chose per-row
    positions over left padding because RoPE positions then stay 0..n-1 for every row (left padding
    shifts them unless positions are corrected by hand) and because a server can put a new request into
    a free row while the others keep decoding (serve.py)."""

    def __init__(self, cfg: ModelConfig, batch_size, max_len, dtype, device):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.span = 0  # keys [0, span) are read by the current forward (set by forward_cached)

    @property
    def batch_size(self):
        return self.lengths.shape[0]

    def reset(self, rows):
        self.lengths[rows] = 0

    @staticmethod
    def write(K, V, span, rows, pos, k, v):
        """Write new k, v (b, T, Hkv, D) into one layer's K, V at positions pos (b, T) of `rows` (None = all
        rows; an int pos = all rows at that offset); return the keys and values attended to, the first
        `span` positions: (b, Hkv, span, D). A static method of plain tensors and ints: no per-layer state
        for torch.compile to specialize on."""
        if rows is None and isinstance(pos, int):      # all rows at the same offset: plain slice copy
            K[:, :, pos:pos + k.shape[1]] = k.transpose(1, 2)
            V[:, :, pos:pos + k.shape[1]] = v.transpose(1, 2)
            return K[:, :, :span], V[:, :, :span]
        r = torch.arange(K.shape[0], device=K.device) if rows is None else rows
        K[r[:, None], :, pos] = k.to(K.dtype)          # advanced indexing: target is (b, T, Hkv, D);
        V[r[:, None], :, pos] = v.to(V.dtype)          # index_put does not cast (autocast gives bf16 k, v)
        if rows is None:
            return K[:, :, :span], V[:, :, :span]
        return K[rows, :, :span], V[rows, :, :span]

    def repeat_interleave(self, n):
        """Each row repeated n times (prefill a prompt once, then sample n completions from it)."""
        out = object.__new__(KVCache)
        out.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        out.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        out.lengths, out.max_len, out.span = self.lengths.repeat_interleave(n), self.max_len, self.span
        return out


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
        self.apply(self._init_weights)
        # GPT-2 (Radford et al. 2019, sec. 2.3) / nanoGPT: every block adds two projections onto the
        # residual stream, so its variance grows with depth; scaling the init std of those projections
        # by 1/sqrt(2 * n_layers) keeps the stream's scale independent of depth at initialization.
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM (Chowdhery et al. 2022) appendix B:
        6N for the weight matmuls plus 12 * n_layers * dim * T for attention scores and values.
        N counts the LM head but not an untied input embedding, which is a lookup, not a matmul."""
        T = seq_len or self.cfg.max_seq_len
        n = self.num_params() - (0 if self.cfg.tie_embeddings else self.tok_embeddings.weight.numel())
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.dim * T

    def _rope(self, pos):
        """cos, sin for positions pos (B, T), shaped (B, T, 1, D) to broadcast over heads."""
        return self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2)

    def hidden_states(self, idx, doc_ids=None):
        """Final (normalized) hidden states (B, T, dim): what the LM head, reward head and RAG embedder read.

        doc_ids (B, T), optional: several documents packed in one row. Attention is then block-diagonal
        causal (no token sees another document) and RoPE positions restart at 0 for each document, so a
        packed row computes exactly what its documents would compute one by one."""
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
        """Logits (B, T, vocab) and, given targets, the mean next-token cross-entropy over positions
        whose target is not IGNORE_INDEX (None otherwise)."""
        logits = self.output(self.hidden_states(idx, doc_ids))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def token_logprobs(self, idx, targets, doc_ids=None, temperature=1.0):
        """log p(targets[b, t] | idx[b, :t+1]) under softmax(logits / temperature), (B, T) float32;
        0 where targets == IGNORE_INDEX. SFT, DPO and GRPO sum or average these over completion tokens."""
        logits, _ = self(idx, doc_ids=doc_ids)
        logits = logits.float() / temperature
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return -nll.view(targets.shape)

    # ---- inference with a KV cache ---------------------------------------------------------------

    def new_cache(self, batch_size, max_len=None, dtype=None, device=None):
        max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        w = self.tok_embeddings.weight
        return KVCache(self.cfg, batch_size, max_len, dtype or w.dtype, device or w.device)

    def compile_for_decode(self):
        """torch.compile the cached forward (every block, the final norm and the LM head: one graph per
        token, not one per block) with dynamic shapes (the cache grows each step, prompts vary), for
        sample.py --compile and bench.py decode. On a CPU this turns Linear's one-row products into
        memory-speed reductions. One graph for the whole step, rather than one compiled module per block,
        saves their per-call guard checks and Python: 6-10% of a 100M model's decode step here (README
        "Benchmarks"). The first tokens of each new shape pay for compilation.

        Two cuts to the per-token overhead that batch-1 decode of a small model feels (0.7 ms of a 100M
        model's ~8 ms step on a 2-core CPU; README "Benchmarks"). Dynamo skips its guards on the model's
        modules and weights (~100 weight tensors and ~1,200 module attributes, checked before every token:
        0.42 ms, 0.14 ms without them); the guards on the inputs stay and catch a cast or move of the
        whole model, since the embeddings and the cache follow it. And on a CPU inductor calls the kernels
        from C++, not Python (cpp_wrapper: ~0.3 ms a token, ~10 s more to compile). Without those guards
        a graph must never be reused for another model or a changed one, so each call compiles its own
        copy of the step's code: dynamo keeps its graphs per code object, and a copy starts with none.
        So after changing the model other than as a whole (one layer cast or swapped, a hook added,
        train() for dropout), call this again."""
        # The plain function is compiled and the model passed in (not a bound method holding one model),
        # so its weights are inputs of the graph and a copy (copy.deepcopy) runs its own weights.
        f = Transformer._cached_blocks
        step = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
        options = {"guard_filter_fn": skip} if skip else {}
        if self.tok_embeddings.weight.device.type == "cpu":
            options["cpp_wrapper"] = True
        self._compiled_blocks = torch.compile(step, dynamic=True, options=options)
        return self

    _compiled_blocks = None

    def _cached_blocks(self, x, cos, sin, mask, ks, vs, span, rows, where, last):
        """The body of forward_cached: every block over the cache, then the LM head at `last`."""
        for layer, K, V in zip(self.layers, ks, vs):
            x = layer(x, cos, sin, mask, cache=(K, V, span, rows, where))
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return self.output(self.norm(x)).float()

    def forward_cached(self, idx, cache, rows=None, lengths=None):
        """Append idx (b, T) to the cache rows `rows` (LongTensor of row ids; None = all rows, in order)
        and return the logits (b, vocab) of each row's last real token.

        Prefill: T = prompt length, rows right-padded to T, `lengths` (b,) the real lengths. Padding
        tokens sit after every real token, so the causal mask alone keeps real tokens from seeing them,
        and the row's length is set to its real length so the next token overwrites them.
        Decode: T = 1, one new token per row."""
        b, T = idx.shape
        start = cache.lengths if rows is None else cache.lengths[rows]
        new_len = start + (T if lengths is None else lengths)
        if int(new_len.max()) > cache.max_len:
            raise ValueError(f"KV cache full: {int(new_len.max())} > {cache.max_len} positions")
        start_host = start.tolist()
        uniform = rows is None and len(set(start_host)) == 1    # every row at the same offset
        s0 = start_host[0]
        cache.span = max(start_host) + T
        pos = start[:, None] + torch.arange(T, device=idx.device)  # (b, T) absolute positions
        if uniform and T == 1:
            mask = "none"              # one new token sees every cached key: no mask at all
        elif uniform and s0 == 0:
            mask = None                # fresh prefill: plain causal attention (flash kernels on GPU)
        else:                          # key j is visible to the query at absolute position p iff j <= p
            mask = (torch.arange(cache.span, device=idx.device) <= pos[:, :, None]).unsqueeze(1)
        cos, sin = self._rope(pos)
        blocks = self._compiled_blocks or Transformer._cached_blocks
        logits = blocks(self, self.tok_embeddings(idx), cos, sin, mask, cache.k, cache.v, cache.span,
                        rows, s0 if uniform else pos, None if lengths is None else lengths - 1)
        if rows is None:
            cache.lengths = new_len
        else:
            cache.lengths[rows] = new_len
        return logits

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                 num_samples=1, generator=None):
        """Sample continuations of a batch of prompts (lists of token ids), yielding step by step.

        Rows are the prompts each repeated num_samples times (row r continues prompt r // num_samples).
        Each step yields (tokens (N,), active (N,) bool): active[r] is False once row r has stopped (its
        token is then meaningless). A stop token is yielded (active) and ends its row. temperature 0 is
        greedy. The prompt is run once (prefill); each step then feeds one token per row."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no empty prompt (start with BOS)")
        device = self.tok_embeddings.weight.device
        longest = max(len(p) for p in prompts)
        if longest >= self.cfg.max_seq_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room within max_seq_len {self.cfg.max_seq_len}")
        max_new_tokens = min(max_new_tokens, self.cfg.max_seq_len - longest)
        if max_new_tokens <= 0:
            return
        idx = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        cache = self.new_cache(len(prompts), longest + max_new_tokens)
        logits = self.forward_cached(idx, cache, lengths=None if len(set(lengths.tolist())) == 1 else lengths)
        if num_samples > 1:
            cache = cache.repeat_interleave(num_samples)
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
    """One token per row from logits (N, vocab). temperature 0 (or None) is greedy (argmax).
    top_k keeps the k most likely tokens; top_p (nucleus, Holtzman et al. 2020) keeps the smallest set
    of most likely tokens whose probability mass reaches p."""
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
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
