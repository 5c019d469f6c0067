"""EXPERIMENT (#19): the reading probe. A pretrained model's greedy line after "Answer:" for 200 fresh grounded
questions (3 numbered sources, demo_world.reading's format, facts drawn anew): right sentence, right citation
(chance 33%), and the right sentence by question language, sources in the same language or the other.

    python reading_probe.py out/pretrain
"""
import re
import sys
from collections import Counter

import torch

import demo_world
from checkpoint import load_model

model, tok, _ = load_model(sys.argv[1])
w = demo_world.World()
demo_world.chats(w), demo_world.rag(w), demo_world.rag_chats(w), demo_world.strangers(w)  # take every name
docs = demo_world.reading(w, 200, n_questions=1, seed=99)
right, seen = Counter(), Counter()
for d in docs:
    z = "答案：" in d
    prompt, answer = d.rsplit("答案：" if z else "Answer: ", 1)
    prompt += "答案：" if z else "Answer:"
    ids, gen = [tok.bos_id] + tok.encode(prompt), []
    with torch.no_grad():
        while len(gen) < 40 and "\n" not in tok.decode(gen):
            gen.append(int(model(torch.tensor([ids + gen]))[0][0, -1].argmax()))  # full forward: no cache
    line = tok.decode(gen).split("\n")[0]
    sentence = line.rsplit("[", 1)[0].strip() == answer.rsplit("[", 1)[0].strip()
    source = re.sub(r"^\[\d\] [A-Za-z]+ / \S+ ", "", prompt.split("\n")[1])[:12]  # first source, title dropped
    kind = ("zh" if z else "en") + ("-same" if bool(re.search(r"[\u4e00-\u9fff]", source)) == z else "-cross")
    right.update({"sentence": sentence, "citation": re.findall(r"\[\d\]", line)[-1:] == re.findall(r"\[\d\]", answer),
                  kind: sentence})
    seen.update({"sentence": 1, "citation": 1, kind: 1})
print(sys.argv[1] + ": " + ", ".join(f"{k} {100 * right[k] / seen[k]:.1f}% of {seen[k]}" for k in sorted(seen)))
