"""The demo's report: one table saying whether each stage worked, and a loss-curve plot per stage.

    python report.py                       # after `bash demo.sh`: writes report.md and report/*.png
    python report.py --out=/tmp/o          # the runs of `OUT=/tmp/o bash demo.sh` (report in /tmp/o)
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
        return f"val bits/byte {fmt(a)} -> {fmt(b)}"
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
        return (f"preference accuracy (policy prefers chosen) {fmt(la, True)} (SFT) -> {fmt(lb, True)}; "
                f"implicit-reward accuracy {fmt(b, True)}; answer accuracy {fmt(ans_a, True)} -> {fmt(ans_b, True)}")
    if stage == "grpo":
        a, b = series(records, "eval_pass@1")
        return f"held-out arithmetic pass@1 {fmt(a, True)} -> {fmt(b, True)}"
    return "-"


def plot(runs, path, title):
    """Training loss (and validation/dev loss where logged) of each run against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, records in runs:
        for key, style in (("loss", "-"), ("val_loss", "o--"), ("dev_loss", "o--")):
            pts = [(r["step"], r[key]) for r in records if key in r and "step" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{name} {key}", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
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
                     f"with {fmt(rag.get('accuracy_with_retrieval'), True)}"
                     + (f" (sources in the prompt and their kNN vote; in the prompt alone "
                        f"{fmt(rag['accuracy_sources_in_prompt_only'], True)})"
                        if "accuracy_sources_in_prompt_only" in rag else "")
                     + (f"; the model copies {fmt(rag['copy_probe'], True)} of a repeated random sequence "
                        "(rag.copy_probe)" if "copy_probe" in rag else "")))
    lines = ["# AstrAI-nano demo report", "",
             "| stage | wall time | the metric that shows it worked |", "|---|---|---|"]
    for stage, secs, metric in rows:
        lines.append(f"| {stage} | {'-' if secs is None else f'{secs:.0f} s'} | {metric} |")
    if "total" in times:
        lines.append(f"| **total** | {times['total']:.0f} s | |")
    lines.append("")
    lines += pictures if plots else ["Loss-curve plots need matplotlib: `pip install matplotlib && python report.py`."]
    text = "\n".join(lines) + "\n"
    path = os.path.join(report_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print(text)


if __name__ == "__main__":
    main()
