"""The demo's report: one table saying whether each stage worked, and a loss-curve plot per stage.

    python report.py                       # after `bash demo.sh`: writes report.md and report/*.png
    python report.py --out=/tmp/o          # the runs of `OUT=/tmp/o bash demo.sh` (report in /tmp/o)
    python report.py --check               # exit 1 if a stage missed its goal
    python report.py plot out/a out/b      # loss curves of several runs in one picture (report/compare.png)

Reads each stage's OUT/<stage>/metrics.jsonl (written by common.MetricsLogger), OUT/timings.tsv
(stage, seconds: demo.sh writes it) and OUT/rag/eval.json (rag.py eval --results). The plots need
matplotlib (`pip install matplotlib`); without it the report says how to get them.
"""
import json
import os
import sys

STAGES = ["pretrain", "sft", "rm", "dpo", "grpo"]  # each writes OUT/<stage>/metrics.jsonl


def read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records, key):
    """(first, last) value of key over the records that have it, or (None, None)."""
    vals = [r[key] for r in records if key in r and r[key] is not None]
    return (vals[0], vals[-1]) if vals else (None, None)


def fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{x:.1%}" if pct else f"{x:.3f}"


def stage_metric(stage, records):
    """The number that shows the stage worked, as text: before -> after where a before exists."""
    if stage == "pretrain":
        a, b = series(records, "val_bpb")
        _, copy = series(records, "copy_probe")
        onset = next((r["step"] for r in records if r.get("copy_probe", 0) >= 0.5), None)
        return (f"val bits/byte {fmt(a)} -> {fmt(b)}; copy probe {fmt(copy, True)} (induction heads: copying "
                + (f"first passes 50% at step {onset})" if onset is not None else "never passes 50%)"))
    if stage == "sft":
        a, b = series(records, "answer_acc")
        return f"dev answer accuracy {fmt(a, True)} (pretrained, same prompts) -> {fmt(b, True)}"
    if stage == "rm":
        a, b = series(records, "dev_accuracy")
        return f"held-out pair accuracy {fmt(a, True)} -> {fmt(b, True)}"
    if stage == "dpo":
        a, b = series(records, "dev_rewards/accuracies")
        la, _ = series(records, "dev_likelihood_acc")
        _, lb = series(records, "dev_likelihood_acc")
        ans_a, ans_b = series(records, "answer_acc")
        ref_a, ref_b = series(records, "refusal_acc")
        return (f"says \"I don't know\" to held-out questions about strangers {fmt(ref_a, True)} (SFT) -> "
                f"{fmt(ref_b, True)}; answer accuracy {fmt(ans_a, True)} -> {fmt(ans_b, True)}; preference accuracy "
                f"(policy prefers chosen) {fmt(la, True)} -> {fmt(lb, True)}")
    if stage == "grpo":
        a, b = series(records, "eval_pass@1")
        return f"held-out arithmetic pass@1 {fmt(a, True)} -> {fmt(b, True)}"
    return "-"


def goals(metrics, rag):
    """(goal, measured value, met) for each stage's goal (README, "The demo"); --check fails if one is missed."""
    def last(stage, key):
        return series(metrics[stage], key)[1]

    def gain(stage, key):
        a, b = series(metrics[stage], key)
        return None if a is None else b - a

    rows = [("pretrain: copy probe >= 90%", last("pretrain", "copy_probe"), 0.90, 1),
            ("SFT: dev answer accuracy >= 70%", last("sft", "answer_acc"), 0.70, 1),
            ("RM: held-out pair accuracy >= 90%", last("rm", "dev_accuracy"), 0.90, 1),
            ("DPO: refusals to held-out strangers, gain >= +5 points", gain("dpo", "refusal_acc"), 0.05, 1),
            ("GRPO: held-out pass@1, gain >= +10 points", gain("grpo", "eval_pass@1"), 0.10, 1),
            ("RAG: answer accuracy with the sources in the prompt >= 70%", rag.get("accuracy_with_retrieval"), 0.70, 1),
            ("RAG: answer accuracy without retrieval <= 10%", rag.get("accuracy_without_retrieval"), 0.10, -1),
            ("RAG: cites the right source >= 70%", rag.get("cites_right_source"), 0.70, 1)]
    return [(what, v, v is not None and sign * (v - goal) >= 0) for what, v, goal, sign in rows]


def plot(runs, path, title):
    """Training loss (and validation/dev loss where logged) of each run against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    probe = None
    for name, records in runs:
        for key, style in (("loss", "-"), ("val_loss", "o--"), ("dev_loss", "o--"), ("copy_probe", "s-")):
            pts = [(r["step"], r[key]) for r in records if key in r and "step" in r]
            if pts and key == "copy_probe":  # a share, on its own axis at the right
                probe = probe or ax.twinx()
                probe.plot(*zip(*pts), style, color="tab:red", label=f"{name} {key}", markersize=3)
                probe.set_ylabel("copy probe (share copied)", color="tab:red")
                probe.set_ylim(0, 1)
            elif pts:
                ax.plot(*zip(*pts), style, label=f"{name} {key}", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    handles = [h for a in (ax, probe) if a for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def main():
    if sys.argv[1:2] == ["plot"]:
        runs = [(d.rstrip("/"), read_metrics(d)) for d in sys.argv[2:]]
        if not have_matplotlib():
            sys.exit("plotting needs matplotlib: pip install matplotlib")
        plot(runs, "report/compare.png", " vs ".join(d for d, _ in runs))
        print("wrote report/compare.png")
        return
    out = next((x.split("=", 1)[1] for x in sys.argv[1:] if x.startswith("--out=")), "out")
    # the default run writes report.md next to README.md; another OUT gets its report inside it
    report_dir = "." if out == "out" else out
    times = {}
    if os.path.isfile(os.path.join(out, "timings.tsv")):
        for line in open(os.path.join(out, "timings.tsv")):
            stage, secs = line.split()
            times[stage] = float(secs)
    rows, pictures = [], []
    plots = have_matplotlib()
    for stage in STAGES:
        records = read_metrics(os.path.join(out, stage))
        rows.append((stage, times.get(stage), stage_metric(stage, records)))
        if plots and records:
            plot([(stage, records)], os.path.join(report_dir, "report", f"{stage}.png"), f"{stage} ({out}/{stage})")
            pictures.append(f"![{stage}](report/{stage}.png)")
    rag_json = os.path.join(out, "rag", "eval.json")
    rag = json.load(open(rag_json)) if os.path.isfile(rag_json) else {}
    if rag:
        rows.append(("rag", times.get("rag"),
                     f"recall@5 {fmt(rag.get('recall@5'), True)}, recall@1 {fmt(rag.get('recall@1'), True)}; "
                     f"answer accuracy without retrieval {fmt(rag.get('accuracy_without_retrieval'), True)}, "
                     f"with the sources in the prompt {fmt(rag.get('accuracy_with_retrieval'), True)}; "
                     f"cites the right source {fmt(rag.get('cites_right_source'), True)}"))
    checks = goals({stage: read_metrics(os.path.join(out, stage)) for stage in STAGES}, rag)
    lines = ["# AstrAI-nano demo report", "",
             "| stage | wall time | the metric that shows it worked |", "|---|---|---|"]
    for stage, secs, metric in rows:
        lines.append(f"| {stage} | {'-' if secs is None else f'{secs:.0f} s'} | {metric} |")
    if "total" in times:
        lines.append(f"| **total** | {times['total']:.0f} s | |")
    lines += ["", "| goal (held-out data) | measured | met |", "|---|---|---|"]
    lines += [f"| {what} | {fmt(value, True) if 'gain' not in what or value is None else f'{100 * value:+.1f} points'} "
              f"| {'yes' if ok else '**no**'} |" for what, value, ok in checks]
    lines.append("")
    lines += pictures if plots else ["Loss-curve plots need matplotlib: `pip install matplotlib && python report.py`."]
    text = "\n".join(lines) + "\n"
    path = os.path.join(report_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print(text)
    if "--check" in sys.argv and not all(ok for _, _, ok in checks):
        sys.exit("report.py --check: goals missed: " + ", ".join(what for what, _, ok in checks if not ok))


if __name__ == "__main__":
    main()
