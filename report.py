"""The demo's report: one table saying whether each stage worked, one of the goals, and a loss-curve plot per stage.

    python report.py                       # after `bash demo.sh`: writes report.md and report/*.png
    python report.py --out=/tmp/o          # the runs of `OUT=/tmp/o bash demo.sh` (report in /tmp/o)
    python report.py --check               # exit 1 if a stage missed its goal
    python report.py plot out/a out/b      # loss curves of several runs in one picture (report/compare.png)

Reads each stage's OUT/<stage>/metrics.jsonl (checkpoint.MetricsLogger), OUT/timings.tsv (stage, seconds: written by
demo.sh) and OUT/rag/eval.json (rag.py eval --results). The plots need matplotlib (`pip install matplotlib`).
"""
import json
import os
import sys

STAGES = ["pretrain", "sft", "rm", "dpo", "grpo"]  # each writes OUT/<stage>/metrics.jsonl
STAGE_METRICS = {
    "sft": ("dev answer accuracy {} (pretrained, same prompts) -> {}", ["answer_acc"]),
    "rm": ("held-out pair accuracy {} -> {}", ["dev_accuracy"]),
    "dpo": ("says \"I don't know\" to held-out questions about strangers {} (SFT) -> {}; answer accuracy {} -> {}; "
            "preference accuracy (policy prefers chosen) {} -> {}",
            ["refusal_acc", "answer_acc", "dev_likelihood_acc"]),
    "grpo": ("held-out arithmetic pass@1 {} -> {}", ["eval_pass@1"]),
}
RAG_METRICS = ("recall@5 {}, recall@1 {}; answer accuracy without retrieval {}, with the sources in the prompt {}; "
               "cites the right source {}")


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
    return "-" if x is None else f"{x:.1%}" if pct else f"{x:.3f}"


def stage_metric(stage, records):
    """The number that shows the stage worked, as text: before -> after where a before exists."""
    if stage == "pretrain":
        a, b = series(records, "val_bpb")
        onset = next((r["step"] for r in records if r.get("copy_probe", 0) >= 0.5), None)
        passes = "never passes 50%" if onset is None else f"first passes 50% at step {onset}"
        return (f"val bits/byte {fmt(a)} -> {fmt(b)}; copy probe {fmt(series(records, 'copy_probe')[1], True)} "
                f"(induction heads: copying {passes})")
    text, keys = STAGE_METRICS[stage]  # each {} -> {}: the first and last value of a key, as a percentage
    return text.format(*(fmt(x, True) for key in keys for x in series(records, key)))


def goals(metrics, rag):
    """(goal, measured value, met) for each stage's goal (README, "The demo"); --check fails if one is missed."""
    def gain(stage, key):
        a, b = series(metrics[stage], key)
        return None if a is None else b - a

    rows = [("pretrain: copy probe >= 90%", series(metrics["pretrain"], "copy_probe")[1], 0.90, 1),
            ("SFT: dev answer accuracy >= 70%", series(metrics["sft"], "answer_acc")[1], 0.70, 1),
            ("RM: held-out pair accuracy >= 90%", series(metrics["rm"], "dev_accuracy")[1], 0.90, 1),
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
    ax.set(xlabel="step", ylabel="loss", title=title)
    handles = [h for a in (ax, probe) if a for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if sys.argv[1:2] == ["plot"]:
        if matplotlib is None:
            sys.exit("plotting needs matplotlib: pip install matplotlib")
        runs = [(d.rstrip("/"), read_metrics(d)) for d in sys.argv[2:]]
        plot(runs, "report/compare.png", " vs ".join(d for d, _ in runs))
        print("wrote report/compare.png")
        return
    out = next((x.split("=", 1)[1] for x in sys.argv[1:] if x.startswith("--out=")), "out")
    report_dir = "." if out == "out" else out  # the default run's report.md goes next to README.md
    tsv, rag_json = os.path.join(out, "timings.tsv"), os.path.join(out, "rag", "eval.json")
    times = {stage: float(secs) for stage, secs in map(str.split, open(tsv))} if os.path.isfile(tsv) else {}
    rag = json.load(open(rag_json)) if os.path.isfile(rag_json) else {}
    metrics = {stage: read_metrics(os.path.join(out, stage)) for stage in STAGES}
    rows = [(stage, times.get(stage), stage_metric(stage, records)) for stage, records in metrics.items()]
    if rag:
        keys = ["recall@5", "recall@1", "accuracy_without_retrieval", "accuracy_with_retrieval", "cites_right_source"]
        rows.append(("rag", times.get("rag"), RAG_METRICS.format(*(fmt(rag.get(k), True) for k in keys))))
    checks = goals(metrics, rag)
    lines = ["# AstrAI-nano demo report", "",
             "| stage | wall time | the metric that shows it worked |", "|---|---|---|"]
    lines += [f"| {stage} | {'-' if secs is None else f'{secs:.0f} s'} | {metric} |" for stage, secs, metric in rows]
    if "total" in times:
        lines.append(f"| **total** | {times['total']:.0f} s | |")
    lines += ["", "| goal (held-out data) | measured | met |", "|---|---|---|"]
    lines += [f"| {what} | {fmt(value, True) if 'gain' not in what or value is None else f'{100 * value:+.1f} points'} "
              f"| {'yes' if ok else '**no**'} |" for what, value, ok in checks]
    lines.append("")
    for stage, records in metrics.items():
        if matplotlib and records:
            plot([(stage, records)], os.path.join(report_dir, "report", f"{stage}.png"), f"{stage} ({out}/{stage})")
            lines.append(f"![{stage}](report/{stage}.png)")
    if matplotlib is None:
        lines.append("Loss-curve plots need matplotlib: `pip install matplotlib && python report.py`.")
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
