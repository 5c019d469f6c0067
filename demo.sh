#!/usr/bin/env bash
# The whole pipeline on the built-in demo world, on a CPU, in about a quarter of an hour:
#   prepare data + tokenizer -> pretrain -> SFT -> reward model -> DPO -> GRPO -> RAG -> a sample chat,
# then report.md: one line per stage with its wall time and the metric that shows it worked.
#
#   bash demo.sh              # the full demo (out/, data/demo/)
#   QUICK=1 bash demo.sh      # the same code paths with few steps (what CI runs, ~3 minutes)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

if [ "${QUICK:-0}" = 1 ]; then   # few steps per stage: checks the plumbing, not the quality
  PT="--max_steps=120 --eval_interval=60 --warmup_steps=10 --sample_tokens=0"
  SFT="--max_steps=60 --eval_interval=30 --eval_answers=64"
  RM="--max_steps=40 --eval_interval=20"
  DPO="--max_steps=30 --eval_interval=15 --eval_answers=64"
  GRPO="--max_steps=6 --eval_interval=3 --eval_limit=48"
  RAG="--limit=48"
else
  PT="" SFT="" RM="" DPO="" GRPO="" RAG=""
fi

mkdir -p out
: > out/timings.tsv
T_START=$(date +%s)
stage() {  # stage NAME COMMAND...: run it, print progress, record its wall time
  local name=$1; shift
  echo; echo "=== [$name] $*"
  local t0; t0=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - t0 ))" >> out/timings.tsv
  echo "=== [$name] done in $(( $(date +%s) - t0 )) s"
}

stage data     $PY prepare_data.py demo --out_dir=data/demo
stage pretrain $PY pretrain.py config/tiny.py --out_dir=out/pretrain $PT
stage sft      $PY sft.py --init_from=out/pretrain --out_dir=out/sft $SFT
stage rm       $PY rm.py  --init_from=out/sft --out_dir=out/rm $RM
stage dpo      $PY dpo.py --init_from=out/sft --out_dir=out/dpo $DPO
stage grpo     $PY grpo.py config/grpo_tiny.py --init_from=out/dpo --out_dir=out/grpo $GRPO
stage rag      bash -c "$PY rag.py index --docs=data/demo/rag/docs --out_dir=out/rag && \
                        $PY rag.py eval --index=out/rag --model=out/grpo --qa=data/demo/rag/qa.jsonl \
                          --results=out/rag/eval.json $RAG"
stage chat     $PY sample.py --out_dir=out/grpo --prompt="What is 23 + 19?" --temperature=0 --max_new_tokens=32
echo "total $(( $(date +%s) - T_START ))" >> out/timings.tsv

echo
$PY report.py
