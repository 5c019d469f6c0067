"""Move models between AstrAI-nano and the Hugging Face Llama format, both ways, offline.

    python export.py --out_dir=out/sft --to=hf_out [--dtype=bfloat16]   # run dir -> LlamaForCausalLM dir
    python export.py --from_hf=path/to/llama_dir --to=out/imported     # and back, then:
    python sft.py --init_from=out/imported

Export writes config.json, model.safetensors, generation_config.json and a tokenizer (tokenizer.json,
tokenizer_config.json with the ChatML template, tokenizer.model) that transformers, vLLM and llama.cpp (then
Ollama) read with our ids and chat template (docs/serving.md). Import reads config.json, the weights
(safetensors, sharded or not, or pytorch_model.bin) and tokenizer.model into a run dir at step 0 (float32
unless --dtype), appends the control tokens our chat format needs, and refuses with one line what our model
does not compute. Every tensor maps one to one onto LlamaForCausalLM (rotate-half RoPE): renamed, never
permuted. Needs `safetensors` and `tokenizers` (both come with transformers).
"""
import json
import os
import struct
import sys

import torch

import checkpoint
from model import ModelConfig, Transformer
from tokenizer import TIKTOKEN_ENCODINGS, SentencePieceTokenizer

# -- weights: our names <-> LlamaForCausalLM names ---------------------------------------------------
LAYER_KEYS = {  # layers.{i}.<ours> <-> model.layers.{i}.<HF>
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight"}
TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def key_map(cfg):
    """{our key: HF key}. A tied head is not in the file: save_pretrained leaves lm_head.weight out, and
    transformers, vLLM and llama.cpp tie it back to the embedding when they load."""
    keys = {o: h for o, h in TOP_KEYS.items() if not (cfg.tie_embeddings and o == "output.weight")}
    for i in range(cfg.n_layers):
        keys.update({f"layers.{i}.{o}": f"model.layers.{i}.{h}" for o, h in LAYER_KEYS.items()})
    return keys


def load_hf_weights(hf_dir):
    """The tensors of a HF model dir: model.safetensors, or the shards its index names, or the same
    for pytorch_model.bin (read with weights_only=True: tensors, never code)."""
    from safetensors.torch import load_file
    loaders = (("model.safetensors", load_file),
               ("pytorch_model.bin", lambda p: torch.load(p, map_location="cpu", weights_only=True)))
    for name, load in loaders:
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path + ".index.json"):  # sharded: the index maps each tensor to its file
            with open(path + ".index.json") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for file in files for k, v in load(os.path.join(hf_dir, file)).items()}
        if os.path.isfile(path):
            return load(path)
    raise FileNotFoundError(f"{hf_dir} has no model.safetensors or pytorch_model.bin")


# -- config.json: ModelConfig <-> LlamaConfig ----------------------------------------------------------
def hf_config(cfg, tok, dtype):
    """config.json for LlamaForCausalLM; rope_theta both the transformers 4 way (top level, which
    llama.cpp's converter reads) and the transformers 5 way (rope_parameters)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
            "torch_dtype": str(dtype).removeprefix("torch.")}


def model_config_from_hf(c):
    """ModelConfig from a config.json dict; ValueError naming the first thing our model does not compute."""
    arch = c.get("architectures") or ["LlamaForCausalLM"]  # a bare LlamaConfig saves none
    if c.get("model_type") != "llama" or arch != ["LlamaForCausalLM"]:
        raise ValueError(f"unsupported architecture {'/'.join(map(str, arch))} (model_type "
                         f"{c.get('model_type')}): only LlamaForCausalLM imports")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in c]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}  # transformers 4 / 5 spelling
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    for bad, what in [
        (c.get("hidden_act", "silu") != "silu", f"hidden_act={c.get('hidden_act')} (only silu: SwiGLU)"),
        (c.get("attention_bias"), "attention_bias=true (biases on q/k/v/o)"),
        (c.get("mlp_bias"), "mlp_bias=true (biases in the MLP)"),
        (rope_type != "default", f"rope scaling of type {rope_type} (only plain RoPE)"),
        (any(c.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")),
         "mixture of experts"),
        (c.get("head_dim") not in (None, dim // heads),
         f"head_dim={c.get('head_dim')} (must be hidden_size / num_attention_heads = {dim // heads})"),
        ("quantization_config" in c, "quantized weights (quantization_config)"),
    ]:
        if bad:
            raise ValueError(f"unsupported: {what}")
    return ModelConfig(  # a ValueError of its own for head counts our attention cannot split
        vocab_size=c["vocab_size"], dim=dim, n_layers=c["num_hidden_layers"], n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads, ffn_dim=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=bool(c.get("tie_word_embeddings", False)))


# -- SentencePiece model files, read and extended without the protobuf package ----------------------
# A .model file is a protobuf ModelProto: field 1 = the pieces (each: 1 piece, 2 score, 3 type),
# 2 = TrainerSpec, 3 = NormalizerSpec. Repeated fields concatenate, so appending a piece appends bytes.
def _varint(buf, i):
    n = shift = 0
    while buf[i] >= 0x80:  # 7 bits a byte, least significant first; the high bit says "more follow"
        n, i, shift = n | (buf[i] & 0x7F) << shift, i + 1, shift + 7
    return n | buf[i] << shift, i + 1


def _fields(buf):
    """{field number: last value} of one protobuf message (int for varints, bytes otherwise)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7  # 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32
        if wire == 0:
            out[key >> 3], i = _varint(buf, i)
        elif wire in (1, 2, 5):
            n, i = _varint(buf, i) if wire == 2 else (8 if wire == 1 else 4, i)
            out[key >> 3], i = buf[i:i + n], i + n
        else:
            raise ValueError("not a SentencePiece model file")
    return out


def sp_settings(proto):
    """The SentencePiece settings that decide how text is cut, with protobuf's defaults."""
    top = _fields(proto)
    trainer, norm = _fields(top.get(2, b"")), _fields(top.get(3, b""))
    return {"model_type": {1: "unigram", 2: "bpe", 3: "word", 4: "char"}[trainer.get(3, 1)],
            "normalization": norm.get(1, b"nmt_nfkc").decode(), "charsmap": bool(norm.get(2)),
            "add_dummy_prefix": bool(norm.get(3, 1)), "remove_extra_whitespaces": bool(norm.get(4, 1)),
            "whitespace_as_suffix": bool(trainer.get(24, 0)),
            "bos": trainer.get(46, b"<s>").decode(), "eos": trainer.get(47, b"</s>").decode(),
            "pad": trainer.get(48, b"<pad>").decode()}


def append_control_pieces(proto, pieces):
    """The model file with `pieces` appended as CONTROL symbols (type 3, score 0): new last ids."""
    def field1(data):  # tag of field 1, length-delimited (0x0A), varint length, bytes
        n, length = len(data), b""
        while n >= 0x80:
            length, n = length + bytes([n & 0x7F | 0x80]), n >> 7
        return b"\x0a" + length + bytes([n]) + data
    for p in pieces:
        proto += field1(field1(p.encode()) + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x03")
    return proto


# -- tokenizer export: tokenizer.json + tokenizer_config.json with the ChatML template --------------
# render_chat encodes the header "user\n" apart from the content; apply_chat_template renders one string, where
# a piece like "\n-" would join them: so the pre-tokenizer splits off each segment's leading "<role>\n" first.
ROLE_HEADER = r"\A(?:system|user|assistant)\n"
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
                 "{{ raise_exception('role must be system, user or assistant') }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def sentencepiece_pipeline(tok, settings):
    """(`tokenizers` Tokenizer, special tokens) giving the ids of our SentencePiece BPE. SentencePiece stores no
    merges: it joins the adjacent pair whose joined piece scores highest (ties: leftmost), so every (left, right)
    split of every piece, in order of score, makes a `tokenizers` BPE join the same pairs in the same order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    s = settings
    problem = (f"its model type is {s['model_type']}" if s["model_type"] != "bpe" else
               f"it normalizes text ({s['normalization']})" if s["charsmap"] else
               "it squeezes whitespace (remove_extra_whitespaces)" if s["remove_extra_whitespaces"] else
               "it treats whitespace as a suffix" if s["whitespace_as_suffix"] else None)
    if problem:
        raise ValueError(f"{tok.path}: cannot rebuild this SentencePiece model for Hugging Face: {problem}")
    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    normal = {p: i for p, i in vocab.items() if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = sorted((-sp.get_score(i), i, p[:k], p[k:])
                    for p, i in normal.items() for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[m[2:] for m in merges], unk_token=sp.id_to_piece(sp.unk_id()),
                             byte_fallback=True, fuse_unk=True))
    dummy = s["add_dummy_prefix"]  # Llama 2 style: a space in front of every text encoded
    t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * dummy
                                        + [normalizers.Replace(" ", "\u2581")])
    t.pre_tokenizer = pre_tokenizers.Split(Regex(ROLE_HEADER.replace(r"\A", r"\A" + "\u2581?" * dummy)), "isolated")
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                  + [decoders.Strip(" ", 1, 0)] * dummy)
    return t, [p for p, i in vocab.items() if sp.is_control(i) or sp.is_unknown(i)]


def tiktoken_pipeline(tok):
    """The same for tiktoken (a byte-level BPE, as Llama 3 ships). A .tiktoken file has ranks, not merges: BPE on
    a token's own bytes with only lower ranks allowed stops at the two parts it is merged from."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    _, pattern, specials = TIKTOKEN_ENCODINGS[tok.name.removeprefix("tiktoken:")]
    ranks = {tok.token_bytes(i): i for i in range(tok.vocab_size) if tok.token_bytes(i)}
    # GPT-2's printable stand-ins for the 256 bytes: printable Latin-1 as itself, the rest from U+0100 on
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    char = {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}

    def text(b):
        return "".join(char[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[k:k + 1] for k in range(len(token))]
        while len(parts) > 2:
            best, k = min((ranks.get(a + b, rank), k) for k, (a, b) in enumerate(zip(parts, parts[1:])))
            if best >= rank:
                raise ValueError(f"{tok.path}: token {rank} cannot be built from lower-ranked tokens")
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        if len(parts) == 2:
            merges.append((text(parts[0]), text(parts[1])))
    # ignore_merges: tiktoken takes a pre-token that is itself in the vocabulary as one token.
    t = Tokenizer(models.BPE(vocab={**{text(b): i for b, i in ranks.items()}, **specials}, merges=merges,
                             ignore_merges=True))
    # Oniguruma (tokenizers' regex engine) reads "{1,3}+" as "one or more of {1,3}", not as the
    # possessive quantifier tiktoken means; the possessive ?+ ++ *+ it reads as tiktoken does.
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(ROLE_HEADER), "isolated"),
                                               pre_tokenizers.Split(Regex(pattern.replace("}+", "}")), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    return t, list(specials)


def write_tokenizer(tok, to, max_len):
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and tokenizer.model) into `to`."""
    from tokenizers import AddedToken, processors
    is_sp = isinstance(tok, SentencePieceTokenizer)
    if is_sp:
        settings = sp_settings(tok.sp.serialized_model_proto())
        t, specials = sentencepiece_pipeline(tok, settings)
        tok.save(to)  # tokenizer.model, which llama.cpp reads
    else:
        t, specials = tiktoken_pipeline(tok)
    # Control tokens become special added tokens: matched in the text, which apply_chat_template needs.
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    name = t.id_to_token
    bos = name(tok.bos_id)  # tok("text") puts BOS in front, as our pretraining documents have it
    t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                     special_tokens=[(bos, tok.bos_id)])
    special = {"bos_token": bos, "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id),
               "additional_special_tokens": [name(tok.im_start_id), name(tok.im_end_id)],
               **({"unk_token": name(tok.sp.unk_id())} if is_sp else {})}
    config = {
        # The generic class loads tokenizer.json exactly as written, in transformers 4 and 5; a
        # model-specific class (LlamaTokenizer) would rebuild parts of it from its own defaults.
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        # llama.cpp's converter copies add_prefix_space; without it llama.cpp puts a space before every prompt
        **({"add_prefix_space": settings["add_dummy_prefix"]} if is_sp else {}),
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_len, "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids
        "chat_template": CHAT_TEMPLATE}
    _write(os.path.join(to, "tokenizer.json"), t.to_str(pretty=True))
    checkpoint.write_json(os.path.join(to, "tokenizer_config.json"), config)
    checkpoint.write_json(os.path.join(to, "special_tokens_map.json"), special)


def import_tokenizer(hf_dir):
    """(tokenizer.model bytes our Tokenizer loads, pieces appended, old vocab size, notes). Ours needs byte fallback
    and BOS, EOS, PAD, <|im_start|>, <|im_end|> as control symbols; Llama's usually lacks the last three."""
    import sentencepiece as spm
    path = os.path.join(hf_dir, "tokenizer.model")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
            raise ValueError(f"{hf_dir} has only tokenizer.json: AstrAI-nano's tokenizer reads SentencePiece "
                             "tokenizer.model files and cannot represent a Hugging Face tokenizers BPE")
        raise FileNotFoundError(f"{hf_dir} has no tokenizer.model")
    with open(path, "rb") as f:
        proto = f.read()
    sp, s = spm.SentencePieceProcessor(model_proto=proto), sp_settings(proto)
    if sum(sp.is_byte(i) for i in range(sp.vocab_size())) != 256:
        raise ValueError(f"{path}: no byte fallback (<0x00>..<0xFF> pieces), which AstrAI-nano's tokenizer needs")
    added = []
    for piece in (s["bos"], s["eos"], s["pad"], "<|im_start|>", "<|im_end|>"):
        i = sp.piece_to_id(piece)
        if sp.id_to_piece(i) != piece:  # not in the vocabulary (piece_to_id answered the unk id)
            added.append(piece)
        elif not sp.is_control(i):
            raise ValueError(f"{path}: {piece} is an ordinary piece (id {i}); AstrAI-nano needs it as a control symbol")
    notes = [f"note: {path} normalizes text ({s['normalization']}, remove_extra_whitespaces="
             f"{s['remove_extra_whitespaces']}), so decode(encode(text)) may differ from text"
             ] if s["charsmap"] or s["remove_extra_whitespaces"] else []
    return append_control_pieces(proto, added), added, sp.vocab_size(), notes


# -- the two directions ------------------------------------------------------------------------------
def export_hf(model, tok, to, dtype=None):
    """Write `model` (a Transformer) and `tok` (our Tokenizer) as the Hugging Face Llama dir `to`."""
    from safetensors.torch import save_file
    cfg = model.cfg
    if cfg.conv_width > 1:
        raise ValueError(f"the model has short convolutions (conv_width={cfg.conv_width}, as config/tiny.py trains), "
                         "which Hugging Face's Llama lacks; export a model trained with conv_width=0")
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size} embedding rows")
    if os.path.exists(os.path.join(to, "ckpt.pt")):
        raise ValueError(f"{to} holds an AstrAI-nano checkpoint (ckpt.pt); export into another directory")
    os.makedirs(to, exist_ok=True)
    sd = model.state_dict()  # contiguous, as safetensors wants them
    tensors = {h: sd[o].detach().to(dtype or sd[o].dtype).contiguous() for o, h in key_map(cfg).items()}
    save_file(tensors, os.path.join(to, "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(to, "model.safetensors.tmp"), os.path.join(to, "model.safetensors"))
    checkpoint.write_json(os.path.join(to, "config.json"), hf_config(cfg, tok, tensors["model.norm.weight"].dtype))
    checkpoint.write_json(os.path.join(to, "generation_config.json"),
                      {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id})
    write_tokenizer(tok, to, cfg.max_seq_len)


def export_run(out_dir, to, dtype=None):
    """python export.py --out_dir=RUN --to=HF_DIR (export_hf refuses a dir holding ckpt.pt); returns the model."""
    model, tok, _ = checkpoint.load_model(out_dir, device="cpu")
    export_hf(model, tok, to, dtype)
    return model


def import_run(from_hf, to, dtype=torch.float32):
    """python export.py --from_hf=HF_DIR --to=RUN: a run dir (ckpt.pt at step 0, tokenizer.model,
    config.json) that later stages take as init_from. Returns notes to print."""
    if os.path.exists(os.path.join(to, "ckpt.pt")):
        raise ValueError(f"{to} already holds a checkpoint; import into a new directory")
    path = os.path.join(from_hf, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{from_hf} has no config.json: not a Hugging Face model dir")
    with open(path) as f:
        cfg = model_config_from_hf(json.load(f))
    proto, added, n_old, notes = import_tokenizer(from_hf)  # before the weights: the cheaper failure first
    hf = {k: v for k, v in load_hf_weights(from_hf).items() if not k.endswith("rotary_emb.inv_freq")}  # old .bin
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # transformers 4 .bin files hold the tied copy too
    keys = key_map(cfg)
    extra, missing = sorted(set(hf) - set(keys.values())), [h for h in keys.values() if h not in hf]
    if extra:
        raise ValueError(f"unsupported tensors in the checkpoint (e.g. {', '.join(extra[:3])}): "
                         "AstrAI-nano's Llama has no biases and no other weights")
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors of a Llama model, e.g. {', '.join(missing[:3])}")
    state_dict = {o: hf[h] for o, h in keys.items()}
    if n_old > cfg.vocab_size:
        raise ValueError(f"tokenizer.model has {n_old} pieces but the model only {cfg.vocab_size} embedding rows")
    if added:
        # New tokens get ids n_old.. (rows past the tokenizer, if the matrix was padded, or new rows),
        # starting at the mean row: no token is favoured before fine-tuning teaches them.
        n_new = n_old + len(added)
        grow = max(0, n_new - cfg.vocab_size)
        cfg.vocab_size += grow
        for k in ["tok_embeddings.weight"] + ["output.weight"] * (not cfg.tie_embeddings):
            w = torch.cat([state_dict[k], state_dict[k].new_zeros(grow, cfg.dim)])
            w[n_old:n_new] = w[:n_old].float().mean(0).to(w.dtype)
            state_dict[k] = w
        notes.append(f"appended {', '.join(added)} to the tokenizer (ids {n_old}..{n_new - 1}); their "
                     f"embedding rows start at the mean row")
    if cfg.tie_embeddings:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    model = Transformer(cfg)
    try:
        model.load_state_dict(state_dict)  # checks every shape against config.json
    except RuntimeError as e:
        raise ValueError(f"weights do not match config.json: {str(e).splitlines()[-1].strip()}") from None
    model = model.to(dtype)
    os.makedirs(to, exist_ok=True)
    config = {"from_hf": os.path.abspath(from_hf), **model.cfg.to_dict()}
    _write(os.path.join(to, "tokenizer.model"), proto)
    checkpoint.write_json(os.path.join(to, "config.json"), config)
    checkpoint.save_checkpoint(to, {"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                                "config": config, "step": 0, "tokenizer": "tokenizer.model"}, keep_last=1)
    return notes


def _write(path, data):
    """Atomic write (temp file, then rename): nobody ever reads half a file."""
    with open(path + ".tmp", "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(path + ".tmp", path)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

if __name__ == "__main__":
    from configurator import configure
    out_dir = ""   # export: our run dir (ckpt.pt, tokenizer)
    from_hf = ""   # import: a Hugging Face Llama dir
    to = ""        # where to write: a new HF dir (export) or a new run dir (import)
    dtype = "float32"  # float32 | bfloat16 | float16 of the written weights
    configure(globals())
    try:
        if bool(out_dir) == bool(from_hf) or not to:
            raise ValueError("give --out_dir=RUN --to=HF_DIR (export) or --from_hf=HF_DIR --to=RUN (import)")
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
        if out_dir:
            model = export_run(out_dir, to, DTYPES[dtype])
            print(f"wrote {to}: LlamaForCausalLM, {model.num_params():,} parameters, {dtype}; try "
                  f"transformers.AutoModelForCausalLM.from_pretrained({to!r})")
        else:
            notes = import_run(from_hf, to, DTYPES[dtype])
            print("\n".join(notes + [f"wrote {to}; fine-tune it with: python sft.py --init_from={to}"]))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export.py: {e}")
