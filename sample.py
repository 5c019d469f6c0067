"""Sample from a trained model: one prompt, a chat in the terminal, or a file of prompts.

    python sample.py --out_dir=out/pretrain --prompt="Once upon a time"     # raw completion, streamed
    python sample.py --out_dir=out/sft --prompt="什么是光合作用？"              # chat checkpoint: ChatML
    python sample.py --out_dir=out/sft --chat                                 # multi-turn REPL: /reset, /quit
    python sample.py --out_dir=out/sft --file=prompts.txt --batch_size=16     # one prompt a line, in batches
    python sample.py --out_dir=out/sft --prompt="hi" --num_samples=3 --temperature=1.0 --top_p=0.9 --seed=7
    python sample.py --out_dir=out/sft --chat --compile                       # compiled decode: faster on CPU

A chat checkpoint (sft, dpo, grpo) gets each prompt as a user message in the ChatML template
(tokenizer.render_chat with the assistant generation prompt) and stops at <|im_end|>; a pretraining
checkpoint continues the raw text from BOS and stops at EOS. --mode=chat|completion overrides the
detection. A single answer is printed token by token as it is sampled; tokenizer.StreamDecoder holds
back the bytes of a character until it is complete, so Chinese characters appear whole. Several
samples (--num_samples) or prompts (--file) are generated together, one batch row each, and printed
when the batch is done.
"""
import os
import sys

import torch

from common import die, load_model
from configurator import configure
from tokenizer import StreamDecoder

# -- config (python sample.py --key=value) -------------------------------------------------------
out_dir = "out/sft"       # a run dir: ckpt.pt + tokenizer + config.json
prompt = ""               # the text to continue (completion) or to answer (chat)
chat = False              # multi-turn chat in the terminal (/reset starts over, /quit leaves)
file = ""                 # a text file with one prompt per line (blank lines skipped)
mode = "auto"             # auto (from the checkpoint) | chat | completion
system = ""               # chat: an optional system message
num_samples = 1           # answers per prompt
max_new_tokens = 256
temperature = 0.8         # 0: greedy
top_k = 0                 # keep the k most likely tokens (0: off)
top_p = 0.95              # nucleus sampling (1.0: off)
seed = 1337
batch_size = 8            # --file: prompts per batch
device = "auto"           # auto | cpu | cuda | cuda:N | mps
dtype = "float32"         # float32 | bfloat16 (weights and KV cache)
compile = False           # torch.compile the decode step (model.compile_for_decode): 2.3-3.3x tokens/s for one
                          # answer on a CPU, after compiling (~10-55 s; README "Benchmarks")


def is_chat_checkpoint(ckpt):
    """Chat stages (sft, dpo, grpo) are trained on jsonl conversations; pretraining reads token memmaps.
    A checkpoint that names its stage says so; otherwise a run config that read a .jsonl file is a chat stage."""
    run = ckpt.get("config") or {}
    stage = ckpt.get("stage") or run.get("stage")
    if stage:
        return stage != "pretrain"
    return any(isinstance(v, str) and v.endswith(".jsonl") for v in run.values())


def chat_ids(tok, messages):
    """Messages -> prompt ids ending in the assistant generation prompt (ChatML)."""
    return tok.render_chat(messages, add_generation_prompt=True)[0]


def generate_texts(model, tok, prompts, generator):
    """Sample num_samples answers for each prompt (lists of ids) in one batch; row r answers prompt
    r // num_samples. Returns the decoded answers (stop tokens are not part of them)."""
    rows = [[] for _ in range(len(prompts) * num_samples)]
    for tokens, active in model.generate(prompts, max_new_tokens, temperature, top_k or None, top_p,
                                         stop_ids=tok.stop_ids, num_samples=num_samples, generator=generator):
        for r, (t, a) in enumerate(zip(tokens.tolist(), active.tolist())):
            if a and t not in tok.stop_ids:
                rows[r].append(t)
    return [tok.decode(r) for r in rows]


def stream_text(model, tok, prompt_ids, generator):
    """Print one answer as it is sampled and return it. Ctrl-C stops this answer (not the program)."""
    decoder, text = StreamDecoder(tok), ""
    try:
        for tokens, _ in model.generate([prompt_ids], max_new_tokens, temperature, top_k or None, top_p,
                                        stop_ids=tok.stop_ids, generator=generator):
            t = int(tokens[0])
            if t in tok.stop_ids:
                break
            piece = decoder.push(t)
            text += piece
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [interrupted]", end="")
    rest = decoder.flush()
    print(rest, flush=True)
    return text + rest


def repl(model, tok, generator):
    """Multi-turn chat. The whole conversation is the prompt of every turn; when it no longer fits the
    context (leaving room for an answer), the oldest exchanges are dropped."""
    print("chat: type a message; /reset starts a new conversation, /quit (or Ctrl-D) leaves", flush=True)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    room = model.cfg.max_seq_len - min(max_new_tokens, model.cfg.max_seq_len // 2)
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        line = line.strip()
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages = list(start)
            print("(new conversation)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = chat_ids(tok, messages)
        while len(ids) > room and len(messages) > len(start) + 1:
            del messages[len(start):len(start) + 2]  # the oldest user message and its answer
            ids = chat_ids(tok, messages)
            print("(dropped the oldest exchange to fit the context)")
        if len(ids) >= model.cfg.max_seq_len:
            print(f"(that message is {len(ids)} tokens; the context is {model.cfg.max_seq_len}: say less)")
            messages.pop()
            continue
        answer = stream_text(model, tok, ids, generator)
        messages.append({"role": "assistant", "content": answer})


def main():
    configure(globals(), verbose=False)  # stdout carries only the generated text
    # bytes of a command line that are not UTF-8 arrive as lone surrogates: the tokenizer reads them as
    # U+FFFD (tokenizer.SURROGATE), and echoing the prompt shows them escaped instead of crashing
    if hasattr(sys.stdout, "reconfigure"):  # (not when a test captures stdout in a StringIO)
        sys.stdout.reconfigure(errors="backslashreplace")
    if sum(map(bool, (prompt, chat, file))) != 1:
        die("give exactly one of --prompt=TEXT, --chat, --file=PROMPTS.txt")
    if mode not in ("auto", "chat", "completion"):
        die(f"mode must be auto, chat or completion, not {mode!r}")
    dev = device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in ("float32", "bfloat16"):
        die(f"dtype must be float32 or bfloat16, not {dtype!r}")
    model, tok, ckpt = load_model(out_dir, device=dev)
    model.to(getattr(torch, dtype))
    if compile:
        model.compile_for_decode()
    as_chat = chat or (is_chat_checkpoint(ckpt) if mode == "auto" else mode == "chat")
    print(f"{out_dir}: {model.num_params() / 1e6:.1f}M params, step {ckpt.get('step')}, "
          f"{'chat (ChatML)' if as_chat else 'raw completion'}", file=sys.stderr, flush=True)
    generator = torch.Generator(device=dev).manual_seed(seed)

    def encode(text):
        if as_chat:
            return chat_ids(tok, ([{"role": "system", "content": system}] if system else [])
                            + [{"role": "user", "content": text}])
        return tok.encode(text, bos=True)

    def check(ids, what):
        if len(ids) >= model.cfg.max_seq_len:
            die(f"{what} is {len(ids)} tokens; the model's context is {model.cfg.max_seq_len}: shorten it")
        return ids

    if chat:
        repl(model, tok, generator)
    elif prompt:
        ids = check(encode(prompt), "the prompt")
        if num_samples == 1:
            if not as_chat:
                print(prompt, end="", flush=True)  # a completion continues the prompt on the same line
            stream_text(model, tok, ids, generator)
        else:
            for i, text in enumerate(generate_texts(model, tok, [ids], generator)):
                print(f"--- sample {i + 1}/{num_samples}\n{'' if as_chat else prompt}{text}", flush=True)
    else:
        if not os.path.isfile(file):
            die(f"--file={file}: no such file")
        with open(file, encoding="utf-8") as f:
            lines = [(n, ln.rstrip("\n")) for n, ln in enumerate(f, 1)]
        todo = [(n, ln) for n, ln in lines if ln.strip()]
        if len(todo) < len(lines):
            print(f"{file}: {len(todo)} prompts ({len(lines) - len(todo)} blank lines skipped)", file=sys.stderr)
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            texts = generate_texts(model, tok, [check(encode(p), f"{file}:{n}") for n, p in batch], generator)
            for r, text in enumerate(texts):
                n, p = batch[r // num_samples]
                tag = f" sample {r % num_samples + 1}/{num_samples}" if num_samples > 1 else ""
                print(f"### {file}:{n}{tag}: {p}\n{text}\n", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
