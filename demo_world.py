"""The built-in demo world: a small made-up bilingual world, generated from a seed in a second.

    python prepare_data.py demo --out_dir=data/demo     # writes this world, trains its tokenizer, tokenizes it

People, their pets and towns with fixed facts (town, age, job, favourite colour and food, pet) and small
arithmetic, each stated many times in varied English and Chinese phrasings, so a model of a few million
parameters learns them on a laptop CPU in minutes. It writes corpus/*.txt (pretraining text, reading documents
among it), sft, pairs (with questions about strangers who appear nowhere else), grpo and rag/ files, each with
a held-out *_dev split, refuse_dev.jsonl and pairs_grounded.jsonl; docs/data.md describes them and the splits.
Names are made of syllables with one Chinese character each (ka = 卡, mi = 米: Kami = 卡米), so names translate
too. Chat answers use the first template of each list, so a stage can score a reply by exact match.
"""
import json
import os
import random
import zlib

from data_formats import rag_prompt

SYLLABLES = dict(ba="巴", bo="波", da="达", di="迪", du="杜", fa="法", fi="菲", ga="加", go="戈", ka="卡",
                 ki="基", ko="科", la="拉", le="勒", li="莉", lo="洛", ma="玛", mi="米", mo="莫", na="娜",
                 ni="妮", no="诺", pa="帕", pi="皮", sa="萨", si="思", so="索", ta="塔", ti="蒂", to="托",
                 va="瓦", vi="维", vo="沃", za="扎", zi="兹", zo="佐")
COLOURS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"),
           ("black", "黑色"), ("purple", "紫色"), ("orange", "橙色")]
FOODS = [("noodles", "面条"), ("rice", "米饭"), ("bread", "面包"), ("apples", "苹果"), ("fish", "鱼"),
         ("cheese", "奶酪"), ("dumplings", "饺子"), ("buns", "包子"), ("cake", "蛋糕"), ("eggs", "鸡蛋")]
JOBS = [("teacher", "老师"), ("doctor", "医生"), ("farmer", "农民"), ("baker", "面包师"), ("painter", "画家"),
        ("driver", "司机"), ("cook", "厨师"), ("nurse", "护士"), ("singer", "歌手"), ("engineer", "工程师"),
        ("writer", "作家"), ("fisher", "渔民")]
ANIMALS = [("cat", "猫", "只"), ("dog", "狗", "只"), ("rabbit", "兔子", "只"), ("horse", "马", "匹"),
           ("parrot", "鹦鹉", "只"), ("goat", "山羊", "只"), ("duck", "鸭子", "只"), ("turtle", "乌龟", "只")]
PLACES = [("by the sea", "在海边"), ("in the mountains", "在山里"), ("by a river", "在河边"),
          ("in a forest", "在森林里"), ("by a lake", "在湖边"), ("on a wide plain", "在平原上")]
ITEMS = [("apples", "苹果", "个"), ("books", "书", "本"), ("pens", "笔", "支"), ("coins", "硬币", "枚"),
         ("eggs", "鸡蛋", "个"), ("cards", "卡片", "张")]
ATTRS = ("town", "age", "job", "colour", "food", "pet")
N_PEOPLE = 80  # the world's size: a 3M model answers 80% of held-out facts about 80 people, 59% about 150

# (English, Chinese) templates. The first of each list is the canonical answer in chats.
FACTS = {
    "town": [("{n} lives in {town}.", "{n}住在{town}。"), ("{n} is from {town}.", "{n}来自{town}。"),
             ("{n}'s home town is {town}.", "{n}的家乡是{town}。"), ("{n} has a house in {town}.", "{n}在{town}有一座房子。")],
    "age": [("{n} is {age} years old.", "{n}今年{age}岁。"), ("{n}'s age is {age}.", "{n}的年龄是{age}岁。"),
            ("{n} turned {age} this year.", "{n}今年满{age}岁了。")],
    "job": [("{n} is {a_job}.", "{n}是一名{job}。"), ("{n} works as {a_job}.", "{n}的工作是{job}。"),
            ("By trade, {n} is {a_job}.", "{n}以当{job}为生。")],
    "colour": [("{n}'s favourite colour is {colour}.", "{n}最喜欢的颜色是{colour}。"),
               ("{n} likes the colour {colour} best.", "{n}最喜欢{colour}。"),
               ("The colour {n} loves most is {colour}.", "{colour}是{n}最爱的颜色。")],
    "food": [("{n}'s favourite food is {food}.", "{n}最喜欢的食物是{food}。"), ("{n} loves to eat {food}.", "{n}最爱吃{food}。"),
             ("More than anything, {n} likes eating {food}.", "{n}特别喜欢吃{food}。")],
    "pet": [("{n} has a {pet} called {pet_name}.", "{n}有一{m}叫{pet_name}的{pet}。"),
            ("{pet_name} is {n}'s {pet}.", "{pet_name}是{n}的{pet}。"),
            ("{n} keeps a {pet} named {pet_name}.", "{n}养了一{m}{pet}，名叫{pet_name}。")],
}
QUESTIONS = {
    "town": [("Where does {n} live?", "{n}住在哪里？"), ("Which town is {n} from?", "{n}来自哪个小镇？")],
    "age": [("How old is {n}?", "{n}今年多大？"), ("What is {n}'s age?", "{n}几岁了？")],
    "job": [("What does {n} do for a living?", "{n}是做什么工作的？"), ("What is {n}'s job?", "{n}的工作是什么？")],
    "colour": [("What is {n}'s favourite colour?", "{n}最喜欢什么颜色？"),
               ("Which colour does {n} like best?", "{n}最喜欢哪种颜色？")],
    "food": [("What is {n}'s favourite food?", "{n}最喜欢吃什么？"), ("What food does {n} love?", "{n}最喜欢的食物是什么？")],
    "pet": [("What pet does {n} have?", "{n}养了什么宠物？"), ("Does {n} have a pet?", "{n}有宠物吗？")],
}
FOLLOW_UP = ("What about {n}?", "那{n}呢？")
TRANSLATE = ("Translate into Chinese: {s}", "把这句话翻译成英文：{s}")  # English -> Chinese, Chinese -> English
SYSTEM = ("You are a helpful assistant.", "你是一个乐于助人的助手。")
DONT_KNOW = ("I don't know.", "我不知道。")
EXTRA_WRONG = 4  # wrong values per fact beyond the two that may go to dev, train-only preference pairs
# arithmetic: (English, Chinese) for a question and its canonical answer; op is +, - or ×
OPS = {"+": ("plus", "加"), "-": ("minus", "减"), "×": ("times", "乘以")}
ARITH_Q = ("What is {a} {op} {b}?", "{a}{zop}{b}等于多少？")
ARITH_A = ("{a} {op} {b} = {c}.", "{a}{zop}{b}等于{c}。")
STORY = {  # word problems: (question, answer sentence) per language; {x} item, {m} Chinese measure word
    "+": [("{n} has {a} {x}. {n2} gives {n} {b} more. How many {x} does {n} have now?", "{n} has {c} {x} now."),
          ("{n}有{a}{m}{x}。{n2}又给了{n}{b}{m}。现在{n}有多少{m}{x}？", "现在{n}有{c}{m}{x}。")],
    "-": [("{n} has {a} {x} and gives {b} of them to {n2}. How many {x} does {n} have left?", "{n} has {c} {x} left."),
          ("{n}有{a}{m}{x}，给了{n2}{b}{m}。{n}还剩多少{m}{x}？", "{n}还剩{c}{m}{x}。")],
    "×": [("{n} has {a} boxes with {b} {x} in each box. How many {x} does {n} have in total?",
           "{n} has {c} {x} in total."),
          ("{n}有{a}个盒子，每个盒子里有{b}{m}{x}。{n}一共有多少{m}{x}？", "{n}一共有{c}{m}{x}。")],
}


def bucket(*key):
    """A stable number in [0, 1) for a key: decides train/dev (Python's hash() changes per run)."""
    return zlib.crc32(repr(key).encode()) / 2**32


class World:
    def __init__(self, seed=1337, n_people=N_PEOPLE, n_towns=20, n_rag=30):
        self.rng = rng = random.Random(seed)
        self.names = []  # every name so far, (en, zh); a new one may not contain or be inside another
        self.towns = [dict(en=en, zh=zh, place=rng.choice(PLACES)) for en, zh in (self.name(3) for _ in range(n_towns))]
        self.people = [self.person() for _ in range(n_people)]
        self.rag_people = [self.person() for _ in range(n_rag)]  # only ever in rag/: new to the model

    def name(self, syllables):
        while True:
            s = self.rng.sample(sorted(SYLLABLES), syllables)
            en, zh = "".join(s).capitalize(), "".join(SYLLABLES[x] for x in s)
            if not any(a in b or b in a for old in self.names for a, b in ((en.lower(), old[0].lower()), (zh, old[1]))):
                self.names.append((en, zh))
                return en, zh

    def person(self, names=None, r=None):
        """A person with random facts; names ((en, zh), pet's (en, zh)) and r (the rng) default to new ones."""
        r = r or self.rng
        (en, zh), (pet_en, pet_zh) = names or (self.name(2), self.name(2))
        town = r.choice(self.towns)
        job, colour, food, animal = r.choice(JOBS), r.choice(COLOURS), r.choice(FOODS), r.choice(ANIMALS)
        age = r.randint(18, 80)
        return {  # the format fields of FACTS/QUESTIONS, per language
            "en": dict(n=en, town=town["en"], age=age, job=job[0], colour=colour[0], food=food[0],
                       pet=animal[0], pet_name=pet_en),
            "zh": dict(n=zh, town=town["zh"], age=age, job=job[1], colour=colour[1], food=food[1],
                       pet=animal[1], m=animal[2], pet_name=pet_zh)}


def fact(p, attr, lang, k=0, **override):
    """Sentence k about attribute attr of person p in lang ("en"/"zh"); fact(o, .., n=name) gives o's value."""
    f = {**p[lang], **override}
    return FACTS[attr][k][lang == "zh"].format(a_job=("an " if f["job"][0] in "aeiou" else "a ") + f["job"], **f)


def question(p, attr, lang, k=0):
    return QUESTIONS[attr][k][lang == "zh"].format(**p[lang])


def arith(rng):
    """A random small problem (op, a, b, c): + and - of 0..10, x from the 1..9 tables; c >= 0. Small on purpose:
    a tiny model learns these few hundred facts (not carrying), so GRPO starts from a sometimes-right policy."""
    op = rng.choice("++--×")
    if op == "×":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return op, a, b, a * b
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    if op == "-" and b > a:
        a, b = b, a
    return op, a, b, a + b if op == "+" else a - b


def arith_text(op, a, b, c, lang, form):
    zop = OPS[op][1]
    if form == "q":
        return ARITH_Q[lang == "zh"].format(a=a, b=b, op=op, zop=zop)
    if form == "a":
        return ARITH_A[lang == "zh"].format(a=a, b=b, c=c, op=op, zop=zop)
    return f"{a} {OPS[op][0]} {b} equals {c}." if lang == "en" else f"{a}{zop}{b}等于{c}。"  # form "words"


def story(w, op, a, b, c, lang):
    """(question, answer sentence) of a word problem about two random people."""
    n, n2 = (p[lang]["n"] for p in w.rng.sample(w.people, 2))
    x = w.rng.choice(ITEMS)
    q, ans = STORY[op][lang == "zh"]
    f = dict(n=n, n2=n2, a=a, b=b, c=c, x=x[0] if lang == "en" else x[1], m=x[2])
    return q.format(**f), ans.format(**f)


def story_numbers(rng):
    op = rng.choice("+-×")
    a, b = (rng.randint(2, 9), rng.randint(2, 9)) if op == "×" else (rng.randint(2, 10), rng.randint(2, 10))
    if op == "-":
        a, b = max(a, b) + 2, min(a, b)  # at least 2 left: "has 1 apples" reads badly
    return op, a, b, {"+": a + b, "-": a - b, "×": a * b}[op]


# -- pretraining corpus ---------------------------------------------------------------------------
def corpus(w, bios=20):
    """{file name: [documents]}: bios, towns, Q&A, parallel sentences, arithmetic."""
    r, docs = w.rng, {"people.txt": [], "towns.txt": [], "qa.txt": [], "parallel.txt": [], "arithmetic.txt": []}
    for p in w.people:
        for lang in ("en", "zh"):
            for _ in range(bios):  # all six facts, shuffled, each in a random phrasing
                attrs = r.sample(ATTRS, len(ATTRS))
                docs["people.txt"].append((" " if lang == "en" else "").join(
                    fact(p, a, lang, r.randrange(len(FACTS[a]))) for a in attrs))
            pet = ("{pet_name} is a {pet}. {pet_name} lives with {n} in {town}." if lang == "en"
                   else "{pet_name}是一{m}{pet}。{pet_name}和{n}一起住在{town}。").format(**p[lang])
            docs["people.txt"] += [pet] * 2
    for t in w.towns:
        folk = [p for p in w.people if p["en"]["town"] == t["en"]]
        for _ in range(6):
            r.shuffle(folk)
            en = " ".join([f"{t['en']} is a town {t['place'][0]}."] + [fact(p, "town", "en") for p in folk])
            zh = "".join([f"{t['zh']}是一个{t['place'][1]}的小镇。"] + [fact(p, "town", "zh") for p in folk])
            docs["towns.txt"] += [en, zh]
    qa_lines = [(f"Q: {question(p, a, 'en', r.randrange(2))}\nA: {fact(p, a, 'en')}",
                 f"问：{question(p, a, 'zh', r.randrange(2))}\n答：{fact(p, a, 'zh')}")
                for p in w.people for a in ATTRS for _ in range(4)]
    for lines in (list(x) for x in zip(*qa_lines)):  # English Q&A docs, then Chinese
        r.shuffle(lines)
        docs["qa.txt"] += ["\n".join(lines[i:i + 6]) for i in range(0, len(lines), 6)]
    for _ in range(len(w.people) * 6):
        p = r.choice(w.people)
        pairs = [(fact(p, a, "en", k), fact(p, a, "zh", k))
                 for a in r.sample(ATTRS, 3) for k in [r.randrange(len(FACTS[a]))]]
        form = r.randrange(3)  # side by side, or as translation requests in either direction
        docs["parallel.txt"].append("\n".join(
            f"English: {en}\nChinese: {zh}" if form == 0 else
            f"{TRANSLATE[0].format(s=en)}\n{zh}" if form == 1 else f"{TRANSLATE[1].format(s=zh)}\n{en}"
            for en, zh in pairs))
    for _ in range(len(w.people) * 30):  # arithmetic needs many more repetitions than a fact about a person
        lang = r.choice(("en", "zh"))
        kind = r.randrange(4)
        if kind == 3:  # questions and answers, as a chat asks them
            qa = [(arith_text(*p, lang, "q"), arith_text(*p, lang, "a")) for p in (arith(r) for _ in range(6))]
            docs["arithmetic.txt"].append("\n".join(f"Q: {q}\nA: {a}" if lang == "en" else f"问：{q}\n答：{a}"
                                                     for q, a in qa))
        elif kind == 0:
            docs["arithmetic.txt"].append("\n".join(arith_text(*arith(r), lang, "a") for _ in range(10)))
        elif kind == 1:
            sep = " " if lang == "en" else ""
            docs["arithmetic.txt"].append(sep.join(arith_text(*arith(r), lang, "words") for _ in range(6)))
        else:
            docs["arithmetic.txt"].append(" ".join(" ".join(story(w, *story_numbers(r), lang)) for _ in range(3)))
    for d in docs.values():
        r.shuffle(d)
    return docs


# -- chats, pairs, prompts ------------------------------------------------------------------------
def chat(rng, turns, lang):
    msgs = [{"role": "system", "content": SYSTEM[lang == "zh"]}] if rng.random() < 0.2 else []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def chats(w, dev_frac=0.1):
    """(train, dev) SFT chats, (train, dev) preference pairs, (train, dev) GRPO prompts."""
    r = w.rng
    out = {k: ([], []) for k in ("sft", "pairs", "grpo")}
    more_pairs = []  # the train-only extra wrong values, mixed in at the end (r's sequence stays as it was)
    is_dev = lambda *key: bucket(*key) < dev_frac  # noqa: E731

    for p in w.people:  # one question per fact and language
        for a in ATTRS:
            for lang in ("en", "zh"):
                dev = is_dev("fact", p["en"]["n"], a, lang)
                q, ans = question(p, a, lang, r.randrange(2)), fact(p, a, lang)
                out["sft"][dev].append(chat(r, [(q, ans)], lang))
                if dev:
                    continue
                # Pairs only about facts SFT taught (else they test memory, not preference). Four rejected
                # answers (two other people's values, "I don't know", a true fact not asked for), each to
                # train or dev on its own: a dev pair is a new (prompt, rejected) combination. Then EXTRA_WRONG
                # more, train only, from their own generator (the world does not move): like InstructGPT's
                # K ranked replies per prompt, several negatives show that only one value is right.
                more = random.Random(f"{p['en']['n']}/{a}/{lang}")
                pool = sorted({o[lang][a] for o in w.people} - {p[lang][a]})
                others = r.sample(pool, 2)
                others += more.sample([v for v in pool if v not in others], min(EXTRA_WRONG, len(pool) - 2))
                wrong = [fact(p, a, lang, **{a: v}) for v in others]
                if a == "pet":  # a pet is (kind, name): take other people's whole pets
                    pool = [o for o in w.people if o[lang]["pet_name"] != p[lang]["pet_name"]]
                    other = r.sample(pool, 2)
                    other += more.sample([o for o in pool if o not in other], EXTRA_WRONG)
                    wrong = [fact(o, a, lang, n=p[lang]["n"]) for o in other]
                off_topic = fact(p, r.choice([x for x in ATTRS if x != a]), lang)  # true, but not what was asked
                for i, bad in enumerate(wrong[:2] + [DONT_KNOW[lang == "zh"], off_topic]):
                    out["pairs"][is_dev("pair", p["en"]["n"], a, lang, i)].append(
                        {"prompt": question(p, a, lang, r.randrange(2)), "chosen": ans, "rejected": bad})
                more_pairs.extend({"prompt": question(p, a, lang, more.randrange(2)), "chosen": ans, "rejected": bad}
                                       for bad in wrong[2:])
    for _ in range(len(w.people) * 2):  # multi-turn: the same question about a second person
        lang, a = r.choice(("en", "zh")), r.choice(ATTRS)
        p1, p2 = r.sample(w.people, 2)
        keys = [("fact", p["en"]["n"], a, lang) for p in (p1, p2)]
        if is_dev(*keys[0]):
            continue  # earlier turns only use train facts; the split follows the last answer
        turns = [(question(p1, a, lang, r.randrange(2)), fact(p1, a, lang)),
                 (FOLLOW_UP[lang == "zh"].format(n=p2[lang]["n"]), fact(p2, a, lang))]
        out["sft"][is_dev(*keys[1])].append(chat(r, turns, lang))
    for _ in range(len(w.people) * 3):  # translation, both directions
        p, a, en_to_zh = r.choice(w.people), r.choice(ATTRS), r.random() < 0.5
        k = r.randrange(len(FACTS[a]))
        src, dst = ("en", "zh") if en_to_zh else ("zh", "en")
        turn = (TRANSLATE[not en_to_zh].format(s=fact(p, a, src, k)), fact(p, a, dst, k))
        out["sft"][is_dev("fact", p["en"]["n"], a, dst)].append(chat(r, [turn], src))  # split by the fact it answers
    seen = set()
    for _ in range(len(w.people) * 20):  # arithmetic: bare questions and word problems
        lang = r.choice(("en", "zh"))
        if r.random() < 0.5:
            op, a, b, c = arith(r)
            q, ans = arith_text(op, a, b, c, lang, "q"), arith_text(op, a, b, c, lang, "a")
        else:
            op, a, b, c = story_numbers(r)
            q, ans = story(w, op, a, b, c, lang)
        if q in seen:
            continue
        seen.add(q)
        dev = bucket("arith", op, a, b, lang) < 2 * dev_frac  # a dev problem's numbers appear in no train file
        if r.random() < 0.4:  # SFT teaches the answer format; the rest are GRPO prompts
            out["sft"][dev].append(chat(r, [(q, ans)], lang))
        else:
            out["grpo"][dev].append({"prompt": q, "answer": str(c)})
    for train, dev in out.values():
        r.shuffle(train)
        r.shuffle(dev)
    out["pairs"][0].extend(more_pairs)
    random.Random(dev_frac).shuffle(out["pairs"][0])
    return out


# -- RAG: fact sheets about people the model has never seen ----------------------------------------
def rag(w, dev_frac=0.34):
    """{file name: text} fact sheets (English and Chinese in each) and (train, dev) questions."""
    sheets, qa = {}, ([], [])
    for k, p in enumerate(w.rag_people):
        en, zh = p["en"]["n"], p["zh"]["n"]
        fname = en.lower() + (".md" if k % 2 == 0 else ".txt")
        head = f"# {en} ({zh})\n\n" if fname.endswith(".md") else f"{en} / {zh}\n\n"
        en_facts, zh_facts = " ".join(fact(p, a, "en") for a in ATTRS), "".join(fact(p, a, "zh") for a in ATTRS)
        sheets[fname] = f"{head}{en_facts}\n\n{zh_facts}\n"
        for a in ATTRS:
            for lang in ("en", "zh"):
                answer = str(p[lang][a])  # a short value: "Lotavi", "34", "dog"
                qa[bucket("rag", en, a, lang) < dev_frac].append(
                    {"question": question(p, a, lang), "answer": answer, "doc": "docs/" + fname, "lang": lang})
    return sheets, qa


def chunk(r, p, lang, must=None):
    """(text, attributes): a run of consecutive facts of p in sheet order (containing attribute `must`, if given)."""
    n = r.randint(2, 4)
    lo = r.randint(0, len(ATTRS) - n) if must is None else \
        r.randint(max(0, ATTRS.index(must) - n + 1), min(ATTRS.index(must), len(ATTRS) - n))
    text = (" " if lang == "en" else "").join(fact(p, a, lang) for a in ATTRS[lo:lo + n])
    if lo == 0 and r.random() < 0.5:  # the first chunk of a sheet starts with its title (its line
        text = f"{p['en']['n']} / {p['zh']['n']} {text}"  # breaks become spaces, as in ground_messages)
    return text, ATTRS[lo:lo + n]


def grounded(r, p, pool, a, lang, n_sources=3, no_answer=0.1):
    """(prompt, reply): a question about attribute a of p with n_sources numbered sources, as rag.py asks it
    (data_formats.rag_prompt). A source is like a retrieved chunk of a fact sheet in the question's language: one
    about each of n_sources people from pool, the first replaced by one about p with the answer, except in a
    no_answer share of prompts, whose reply is "I don't know."."""
    z = lang == "zh"
    sources = [chunk(r, o, lang)[0] for o in r.sample([o for o in pool if o is not p], n_sources)]
    answerable = r.random() >= no_answer
    if answerable:
        sources[0] = chunk(r, p, lang, must=a)[0]
    r.shuffle(sources)
    prompt = rag_prompt(question(p, a, lang, r.randrange(2)), sources)
    if not answerable:
        return prompt, DONT_KNOW[z]
    n = next(n for n, s in enumerate(sources, 1) if p[lang]["n"] in s)
    return prompt, cite(fact(p, a, lang), n)


def cite(sentence, n):
    """A sentence followed by its source's marker, as data_formats.numbered writes it in the sources."""
    return sentence + ("" if sentence.endswith("。") else " ") + f"[{n}]"


def rag_chats(w, n_people=200, n_dev=8):
    """(train, dev, pairs): SFT chats that teach answering from numbered sources and citing [n] (grounded), about
    people made here: the answer can only come from the sources. The last n_dev people are dev (200 people, not
    40: docs/benchmarks.md, "The retrieval chats"). pairs, for DPO: on each train prompt whose sources hold the
    answer, the cited answer chosen over "I don't know.", so that the strangers' pairs teach to abstain when
    nothing says who someone is, not to stop reading about people the model has never seen."""
    r, people = w.rng, [w.person() for _ in range(n_people)]
    out = ([], [], [])
    for i, p in enumerate(people):
        for a in ATTRS:
            for lang in ("en", "zh"):
                prompt, reply = grounded(r, p, people, a, lang)
                dev, idk = i >= n_people - n_dev, DONT_KNOW[lang == "zh"]
                out[dev].append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
                if not dev and reply != idk:
                    out[2].append({"prompt": prompt, "chosen": reply, "rejected": idk})
    return out


def reading(w, n_docs, n_sources=3, n_questions=4, seed=0):
    """Pretraining documents that make reading pay: n_sources numbered sources and n_questions questions about
    them with answers that cite [n], about people whose facts are drawn anew for every document, so that an
    answer is in the sources and nowhere else (not in the weights). Their names are in no other file (this runs
    last, when every other name is taken)."""
    r = random.Random(f"reading/{seed}")
    free = [(en, zh) for en, zh in ((a.capitalize() + b, SYLLABLES[a] + SYLLABLES[b]) for a in sorted(SYLLABLES)
                                    for b in sorted(SYLLABLES) if a != b)
            if not any(x.lower() in y.lower() or y.lower() in x.lower() for old in w.names
                       for x, y in ((en, old[0]), (zh, old[1])))]
    docs = []
    for _ in range(n_docs):
        names = r.sample(free, 2 * n_sources)
        people = [w.person(names[i:i + 2], r) for i in range(0, len(names), 2)]
        lang = r.choice(("en", "zh"))
        chunks = [chunk(r, p, lang) for p in people]
        known = [(n, p, a) for n, (p, (_, attrs)) in enumerate(zip(people, chunks), 1) for a in attrs]
        asked = [(question(p, a, lang, r.randrange(2)), cite(fact(p, a, lang), n))
                 for n, p, a in r.sample(known, min(n_questions, len(known)))]
        answer = "\n答案：" if lang == "zh" else "\nAnswer: "  # then more questions, as the prompt writes one
        docs.append(rag_prompt(asked[0][0], [t for t, _ in chunks]) + answer + asked[0][1] + "".join(
            ("\n问题：" if lang == "zh" else "\nQuestion: ") + q + answer + a for q, a in asked[1:]))
    return docs


def strangers(w, n_people=100, dev_frac=0.34, n_rejected=3):
    """Pairs that teach abstaining: about people nobody has heard of, "I don't know." chosen over n_rejected
    made-up answers. SFT never asks about them, so the SFT model answers confidently: what DPO should change.
    Sets w.strangers; returns the train pairs and the dev strangers' questions as chats (refuse_dev.jsonl,
    scored by dpo.py). A dev stranger is in no train file."""
    w.strangers = [w.person() for _ in range(n_people)]
    pairs, dev_chats = [], []
    for p in w.strangers:
        dev = bucket("stranger", p["en"]["n"]) < dev_frac
        for a in ATTRS:
            for lang in ("en", "zh"):
                q, idk = question(p, a, lang, w.rng.randrange(2)), DONT_KNOW[lang == "zh"]
                if dev:
                    dev_chats.append(chat(w.rng, [(q, idk)], lang))
                    continue
                fakes = {fact(o, a, lang, n=p[lang]["n"]) for o in w.rng.sample(w.strangers, n_rejected)}
                pairs += [{"prompt": q, "chosen": idk, "rejected": f} for f in sorted(fakes)]
    return pairs, dev_chats


def write_world(out_dir, seed=1337, n_people=N_PEOPLE, n_towns=20, n_rag=30, bios=20, n_strangers=100,
                n_reading=1200):
    """Write everything listed in the module docstring under out_dir; returns the World."""
    w = World(seed, n_people, n_towns, n_rag)

    def write(path, text):
        path = os.path.join(out_dir, path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def jsonl(rows):
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    for name, docs in corpus(w, bios).items():
        write(os.path.join("corpus", name), "\n\n".join(docs) + "\n")
    data = chats(w)
    sheets, (qa, qa_dev) = rag(w)
    *retrieval, grounded_pairs = rag_chats(w)
    for split, extra in zip(data["sft"], retrieval):  # retrieval chats go with the other chats
        split += extra
        w.rng.shuffle(split)
    pairs, refuse_dev = strangers(w, n_strangers)  # made last: the rest of the world stays as it was
    data["pairs"][0].extend(pairs)
    w.rng.shuffle(data["pairs"][0])
    if n_reading:
        write(os.path.join("corpus", "reading.txt"), "\n\n".join(reading(w, n_reading, seed=seed)) + "\n")
    write("refuse_dev.jsonl", jsonl(refuse_dev))
    write("pairs_grounded.jsonl", jsonl(grounded_pairs))  # DPO's alone: long prompts would slow the reward model
    for kind, (train, dev) in data.items():
        write(f"{kind}.jsonl", jsonl(train))
        write(f"{kind}_dev.jsonl", jsonl(dev))
    for name, text in sheets.items():
        write(os.path.join("rag", "docs", name), text)
    write(os.path.join("rag", "qa.jsonl"), jsonl(qa))
    write(os.path.join("rag", "qa_dev.jsonl"), jsonl(qa_dev))
    return w
