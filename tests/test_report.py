"""report.py: the goals table reads each stage's metrics and says which goals are met; --check fails on a miss."""
import json
import subprocess
import sys
from pathlib import Path

import report

ROOT = Path(__file__).resolve().parents[1]
METRICS = {
    "pretrain": [{"step": 0, "copy_probe": 0.0}, {"step": 500, "copy_probe": 0.6}, {"step": 1100, "copy_probe": 0.95}],
    "sft": [{"step": 0, "answer_acc": 0.0}, {"step": 300, "answer_acc": 0.72}],
    "rm": [{"step": 0, "dev_accuracy": 0.5}, {"step": 1600, "dev_accuracy": 0.89}],
    "dpo": [{"step": 0, "refusal_acc": 0.0}, {"step": 150, "refusal_acc": 0.08}],
    "grpo": [{"step": 0, "eval_pass@1": 0.30}, {"step": 200, "eval_pass@1": 0.35}],
}
RAG = {"accuracy_with_retrieval": 0.75, "accuracy_without_retrieval": 0.12, "cites_right_source": 0.7}


def test_goals_compare_each_stage_with_its_target():
    got = [(round(v, 4), ok) for _, v, ok in report.goals(METRICS, RAG)]
    assert got == [(0.95, True), (0.72, True), (0.89, False), (0.08, True), (0.05, False),
                                  (0.75, True), (0.12, False), (0.7, True)]
    assert not any(ok for _, _, ok in report.goals({k: [] for k in METRICS}, {}))  # nothing measured: nothing met


def test_check_exits_1_naming_the_missed_goals(tmp_path):
    for stage, rows in METRICS.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rag").mkdir()
    (tmp_path / "rag" / "eval.json").write_text(json.dumps(RAG))
    p = subprocess.run([sys.executable, "report.py", f"--out={tmp_path}", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "RM: held-out pair accuracy" in p.stderr and "GRPO" in p.stderr, p.stderr
    table = (tmp_path / "report.md").read_text()
    assert "| DPO: refusals to held-out strangers, gain >= +5 points | +8.0 points | yes |" in table
    assert "copying first passes 50% at step 500" in table
