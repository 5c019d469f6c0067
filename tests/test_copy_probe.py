"""common.copy_probe (pretrain.py logs it): an ideal induction head scores ~1, a model blind to its
context ~0."""
import pytest
import torch

from common import copy_probe
from model import ModelConfig
from tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    # the tokenizer of tests/test_rag.py: 400 ids, special ones among them (the probe must skip those)
    en = ["Kami lives in Lotavi. Kami is 34 years old.", "The quick brown fox jumps over the lazy dog!",
          "What is 12 + 7? It is 19.", "Pi is about 3.14, and e is about 2.72."]
    zh = ["卡米住在洛塔维。卡米今年34岁。", "今天天气很好，我们去公园散步吧！", "十二加七等于多少？等于十九。", "他说：“你好。”然后走了。"]
    lines = [f"{e} {z}" for e in en for z in zh] * 5
    return train_tokenizer(lines, 400, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


class FakeLM(torch.nn.Module):
    """Stands in for a Transformer in copy_probe: with induction=True its logits at each position point at
    the token that followed the latest earlier occurrence of the current token (an ideal induction head),
    else always at one token (a model blind to its context)."""

    def __init__(self, vocab, induction):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, max_seq_len=64)
        self.tok_embeddings = torch.nn.Embedding(vocab, 8)
        self.induction = induction

    def forward(self, x):
        assert x.shape[1] <= self.cfg.max_seq_len
        logits = torch.zeros(*x.shape, self.cfg.vocab_size)
        logits[..., 5] = 1.0
        if self.induction:
            for b, row in enumerate(x.tolist()):
                for p, t in enumerate(row):
                    q = next((q for q in range(p - 1, -1, -1) if row[q] == t), None)
                    if q is not None:
                        logits[b, p, row[q + 1]] = 2.0
        return logits, None


def test_copy_probe_tells_a_copying_model_from_a_blind_one(tok):
    """copy_probe scores an ideal induction head 1 (every token of the second copy after its first, with the
    length capped by max_seq_len 64) and a context-blind model ~0; an off-by-one in the positions would
    score the copier ~0 too. Random tokens can repeat within a sequence, so the copier is not exact there
    - the probe scores 16 x 30 tokens drawn from the ordinary ids of a 400-token vocabulary."""
    copier, blind = FakeLM(tok.vocab_size, True), FakeLM(tok.vocab_size, False)
    assert copy_probe(copier, tok) > 0.9
    assert copy_probe(blind, tok) < 0.05
