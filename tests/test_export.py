"""export.py: our runs <-> Hugging Face LlamaForCausalLM, checked against transformers itself.

Random-weight models and tokenizers trained here in tmp dirs; nothing is downloaded."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

import checkpoint  # noqa: E402
import export  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import TIKTOKEN_ENCODINGS, Tokenizer, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

EN = ("the model reads and writes tokens while a small network learns to answer every question "
      "about python code data training and the world").split()
ZH = ["我们", "今天", "学习", "语言", "模型", "训练", "数据", "你好", "世界", "问题", "回答", "中文", "的", "是", "了"]


def corpus(seed=0, lines=600):
    """Bilingual prose, indented code, tabs and markdown lists, so the vocabulary holds pieces such
    as "\\n-" or "\\n\\t" that join a newline to what follows it."""
    r = random.Random(seed)
    out = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            out.append(" ".join(r.choice(EN) for _ in range(r.randint(4, 12))).capitalize() + ".")
        elif kind == 1:
            out.append("".join(r.choice(ZH) for _ in range(r.randint(4, 12))) + "。")
        elif kind == 2:
            out.append(f"def f{r.randint(0, 99)}(x):\n    return x * {r.randint(0, 999)}\n\t# {r.choice(ZH)}")
        else:
            out.append("\n".join(f"- {r.choice(EN)} {r.choice(ZH)}" for _ in range(3)))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([corpus()], 400, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def make_model(vocab_size, seed=0, **kw):
    """A tiny model with large random weights, so logits are far from ties and greedy decoding varies."""
    args = dict(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128)
    args.update(kw)
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**args))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0, 0.35 if "tok_embeddings" in name or "output" in name else 0.25)
            if p.dim() == 1:
                p.add_(1.0)  # RMSNorm gains around 1, but not exactly 1
    return m.eval()


def write_run(out_dir, model, tok):
    """A run dir as the stages leave it (ckpt.pt + tokenizer.model + config.json)."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(out_dir)
    checkpoint.write_json(os.path.join(out_dir, "config.json"), model.cfg.to_dict())
    checkpoint.save_checkpoint(out_dir, {"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                                     "config": {}, "step": 7}, keep_last=1)


def greedy_ours(model, prompt, n):
    return [int(t[0]) for t, _ in model.generate([prompt], n, temperature=0)]


def greedy_hf(hf, prompt, n):
    hf.generation_config.eos_token_id = None  # run all n steps, as ours does without stop ids
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ---- ours -> Hugging Face ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(tie_embeddings=True, n_kv_heads=2),
                                dict(tie_embeddings=False, n_kv_heads=1, rope_theta=500000.0)],
                         ids=["tied-gqa", "untied-mqa-theta5e5"])
def test_export_matches_transformers(tmp_path, tok, kw):
    model = make_model(tok.vocab_size, **kw)
    write_run(tmp_path / "run", model, tok)
    export.export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
    files = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= files
    assert ("lm_head.weight" in load_file(tmp_path / "hf" / "model.safetensors")) != kw["tie_embeddings"]
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.im_end_id, tok.eos_id]

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()  # float32, as config.json says
    assert hf.config.tie_word_embeddings == kw["tie_embeddings"]
    idx = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.abs().mean() > 1.0  # logits that are not all ~0, so the comparison means something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    prompt = [tok.bos_id] + tok.encode("Hello 模型")
    tokens = greedy_ours(model, prompt, 32)
    assert len(set(tokens)) > 4
    assert greedy_hf(hf, prompt, 32) == tokens


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("hf_tok")
    export.write_tokenizer(tok, str(d), 128)
    return AutoTokenizer.from_pretrained(d)


TEXTS = [
    "AstrAI-nano 是一个中英双语模型。It answers in English and 中文, 也会写 code!",
    "emoji 😀🚀 👍🏽 🇨🇳 ❤️ 你好👋世界",
    "  two leading spaces", " one", "trailing spaces   ", "a    b     c", "\ttabs\tand\t\ttabs\t",
    "\n\nnewlines\n\n\nand more\n", "windows\r\nline\r\nends", "\u3000全角空格\u3000", " \t \n \t ",
    "def f(x):\n    return x * 2  # 注释\n\t\tdeep\n", "- item one\n- 项目二\n\n1. first", "",
]


def test_tokenizer_parity(tok, hf_tok):
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert set(hf_tok("x")) == {"input_ids", "attention_mask"}  # what model.generate(**inputs) accepts
    r = random.Random(0)
    pool = list("ab xyz.,:-()#\n\t\r  ") + ["模型", "你", "😀", "é", "\u3000", "    ", "\n-", "\n\t", "the"]
    fuzz = ["".join(r.choice(pool) for _ in range(r.randint(1, 30))) for _ in range(300)]
    for text in TEXTS + fuzz:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert hf_tok(text)["input_ids"] == [tok.bos_id] + ids, repr(text)  # Llama style: BOS in front
        assert hf_tok.decode(ids) == tok.decode(ids) == text, repr(text)


def fake_tiktoken_file(path, enc):
    """A small BPE in tiktoken's file format (base64 token, rank per line), trained here with
    tiktoken's own reference trainer, named like the encoding whose regex and special ids it takes."""
    import base64
    from tiktoken._educational import bpe_train
    r = random.Random(3)
    numbers = "\n".join("".join(r.choice("123") for _ in range(7)) for _ in range(300))  # digit merges
    ranks = bpe_train(corpus(2, lines=200) + numbers, 330, TIKTOKEN_ENCODINGS["gpt2"][1], visualise=None)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return Tokenizer.load(str(path))


@pytest.mark.parametrize("enc", ["gpt2", "cl100k_base"])
def test_tiktoken_tokenizer_parity(tmp_path, enc):
    tok = fake_tiktoken_file(tmp_path / f"{enc}.tiktoken", enc)
    export.write_tokenizer(tok, str(tmp_path), 128)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    r = random.Random(1)
    pool = list("ab xyz.,:-'()#\n\t\r  ") + ["模型", "😀", "1234567", "'ll", "The", "    ", "\n\n", " 42"]
    for text in TEXTS + ["".join(r.choice(pool) for _ in range(r.randint(1, 30))) for _ in range(200)]:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert hf.decode(ids) == text, repr(text)
    chat = [{"role": "user", "content": "   indented 1234567\n\n- x"}, {"role": "assistant", "content": "\tok 😀"}]
    if enc == "gpt2":  # its regex glues "\n" to the spaces after it; export.ROLE_HEADER must cut there
        assert tok.encode("user\n" + chat[0]["content"]) != tok.encode("user\n") + tok.encode(chat[0]["content"])
    assert hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] \
        == tok.render_chat(chat, add_generation_prompt=True)[0]


def test_chat_template_parity(tok, hf_tok):
    chat = [{"role": "system", "content": "You are AstrAI. 请简洁回答。"},
            {"role": "user", "content": "- list one\n- 列表二"},
            {"role": "assistant", "content": "\tindented\n\n好的 😀"},
            {"role": "user", "content": "  spaced   out  "},
            {"role": "assistant", "content": ""}]
    # the case that needs export.ROLE_HEADER: a content whose first piece would join the header's "\n"
    assert any(tok.encode(m["role"] + "\n" + m["content"]) != tok.encode(m["role"] + "\n") + tok.encode(m["content"])
               for m in chat), "no piece joins a newline to what follows: change corpus() so this case is tested"
    for n in (1, 2, 4, len(chat)):
        for gen in (False, True):
            ids, _ = tok.render_chat(chat[:n], add_generation_prompt=gen)
            theirs = hf_tok.apply_chat_template(chat[:n], add_generation_prompt=gen, tokenize=True, return_dict=True)
            assert theirs["input_ids"] == ids, (n, gen)
    with pytest.raises(Exception, match="role"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ---- Hugging Face -> ours -------------------------------------------------------------------------

def hf_model(vocab_size, seed=0, **kw):
    args = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    args.update(kw)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**args))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    return m.eval()


def llama2_style_tokenizer(path):
    """A SentencePiece file like Llama 2's: dummy prefix, no pad, no ChatML tokens."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(1).splitlines()), model_writer=buf, model_type="bpe", vocab_size=350,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        pad_id=-1, minloglevel=2)
    Path(path).write_bytes(buf.getvalue())


def test_import_save_pretrained(tmp_path, tok):
    hf = hf_model(tok.vocab_size, rope_theta=20000.0, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded safetensors + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    shutil.copy(tok.path, tmp_path / "hf" / "tokenizer.model")
    assert export.import_run(str(tmp_path / "hf"), str(tmp_path / "run")) == []  # nothing to append
    model, tok2, ckpt = checkpoint.load_model(str(tmp_path / "run"))
    assert ckpt["step"] == 0 and tok2.encode("你好 world") == tok.encode("你好 world")
    idx = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_import_bin_with_llama2_tokenizer(tmp_path):
    """pytorch_model.bin (tied, with the tied lm_head copy in it, as transformers 4 wrote it) and a
    tokenizer without PAD and ChatML tokens: they are appended and the embedding grows by three rows."""
    d = tmp_path / "hf"
    d.mkdir()
    llama2_style_tokenizer(d / "tokenizer.model")
    hf = hf_model(350, tie_word_embeddings=True)
    hf.config.save_pretrained(d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    notes = export.import_run(str(d), str(tmp_path / "run"))
    assert "<pad>, <|im_start|>, <|im_end|>" in notes[0]
    model, tok, _ = checkpoint.load_model(str(tmp_path / "run"))
    assert (tok.vocab_size, model.cfg.vocab_size) == (353, 353)
    assert (tok.pad_id, tok.im_start_id, tok.im_end_id) == (350, 351, 352)
    assert model.output.weight is model.tok_embeddings.weight
    torch.testing.assert_close(model.tok_embeddings.weight[351], hf.model.embed_tokens.weight.mean(0))
    ids, mask = tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    assert ids[:2] == [tok.bos_id, tok.im_start_id] and sum(mask) > 0
    idx = torch.randint(0, 350, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0][..., :350], hf(idx).logits, atol=1e-4, rtol=0)


def test_round_trip_is_bit_identical(tmp_path, tok):
    model = make_model(tok.vocab_size, tie_embeddings=False, rope_theta=123456.0, norm_eps=1e-6)
    write_run(tmp_path / "a", model, tok)
    for args in (["--out_dir=" + str(tmp_path / "a"), "--to=" + str(tmp_path / "hf")],
                 ["--from_hf=" + str(tmp_path / "hf"), "--to=" + str(tmp_path / "b")]):
        r = subprocess.run([sys.executable, "export.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["model_config"] == b["model_config"]
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert v.dtype == b["model"][k].dtype and torch.equal(v, b["model"][k]), k
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()


def test_export_bfloat16(tmp_path, tok):
    model = make_model(tok.vocab_size)
    write_run(tmp_path / "run", model, tok)
    export.export_run(str(tmp_path / "run"), str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.bfloat16}
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf")  # bfloat16 in transformers 5, float32 in 4
    assert torch.equal(hf.model.embed_tokens.weight.bfloat16(), model.tok_embeddings.weight.bfloat16())


# ---- what we do not compute is refused, with one line naming it -------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("hf_ok")
    export.export_hf(make_model(tok.vocab_size), tok, str(d))
    return d


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling of type llama3"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act=gelu"),
    ({"head_dim": 16}, "head_dim=16"),
    ({"num_local_experts": 8, "num_experts_per_tok": 2}, "mixture of experts"),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "MixtralForCausalLM"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
])
def test_unsupported_config_rejected(tmp_path, hf_dir, change, message):
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        export.import_run(str(d), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_unsupported_files_rejected(tmp_path, hf_dir):
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"unsupported tensors .*q_proj\.bias"):
        export.import_run(str(d), str(tmp_path / "run"))
    (d / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="only tokenizer.json"):
        export.import_run(str(d), str(tmp_path / "run"))
    # the command line says it in one line, without a traceback
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    r = subprocess.run([sys.executable, "export.py", f"--from_hf={d}", f"--to={tmp_path / 'run'}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "export.py: unsupported: attention_bias=true (biases on q/k/v/o)"]
