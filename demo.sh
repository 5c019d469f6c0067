#!/usr/bin/env bash
# The whole pipeline on the built-in demo world, on 2 CPU cores: 47 minutes in float32 (AVX2), less with native bf16:
#   prepare data + tokenizer -> pretrain -> SFT -> reward model -> DPO -> GRPO -> RAG -> a sample chat,
# then report.md: one line per stage with its wall time and the metric that shows it worked.
#
#   bash demo.sh              # the full demo (out/, data/demo/)
#   QUICK=1 bash demo.sh      # the same code paths with few steps (what CI runs, ~3 minutes)
#   OUT=/tmp/o DATA=/tmp/d bash demo.sh   # somewhere else than out/ and data/demo
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
OUT=${OUT:-out}
DATA=${DATA:-data/demo}

if [ "${QUICK:-0}" = 1 ]; then   # few steps per stage: checks the plumbing, not the quality
  PT="--max_steps=120 --eval_interval=60 --warmup_steps=10 --sample_tokens=0 --compile=False"
  SFT="--max_steps=60 --eval_interval=30 --eval_answers=64"
  RM="--max_steps=40 --eval_interval=20"
  DPO="--max_steps=30 --eval_interval=15 --eval_answers=64 --self_play=0"  # self-play: tests/test_dpo.py
  GRPO="--max_steps=6 --eval_interval=3"
  RAG="--limit=48"
else
  PT="" SFT="" RM="" DPO="" GRPO="" RAG=""
fi

mkdir -p "$OUT"
: > "$OUT/timings.tsv"
T_START=$(date +%s)
stage() {  # stage NAME COMMAND...: run it, print progress, record its wall time
  local name=$1; shift
  echo; echo "=== [$name] $*"
  local t0; t0=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - t0 ))" >> "$OUT/timings.tsv"
  echo "=== [$name] done in $(( $(date +%s) - t0 )) s"
}
GRPO_CONFIG=$([ -f config/grpo_tiny.py ] && echo config/grpo_tiny.py || true)

stage data     $PY prepare_data.py demo --out_dir="$DATA"
stage pretrain $PY pretrain.py config/tiny.py --data_dir="$DATA/pretrain" --out_dir="$OUT/pretrain" $PT
stage sft      $PY sft.py --init_from="$OUT/pretrain" --out_dir="$OUT/sft" --data="$DATA/sft.jsonl" \
                 --dev_data="$DATA/sft_dev.jsonl" $SFT
stage rm       $PY rm.py  --init_from="$OUT/sft" --out_dir="$OUT/rm" --data="$DATA/pairs.jsonl" \
                 --dev_data="$DATA/pairs_dev.jsonl" $RM
stage dpo      $PY dpo.py --init_from="$OUT/sft" --out_dir="$OUT/dpo" --data="$DATA/pairs.jsonl,$DATA/pairs_grounded.jsonl" \
                 --dev_data="$DATA/pairs_dev.jsonl" --answer_data="$DATA/sft_dev.jsonl" \
                 --refusal_data="$DATA/refuse_dev.jsonl" $DPO
stage grpo     $PY grpo.py $GRPO_CONFIG --init_from="$OUT/dpo" --out_dir="$OUT/grpo" --data="$DATA/grpo.jsonl" \
                 --eval_data="$DATA/grpo_dev.jsonl" $GRPO
stage rag      bash -c "$PY rag.py index --docs=$DATA/rag/docs --tokenizer=$DATA/tokenizer.model --out_dir=$OUT/rag && \
                        $PY rag.py eval --index=$OUT/rag --model=$OUT/grpo --qa=$DATA/rag/qa.jsonl \
                          --results=$OUT/rag/eval.json $RAG"
stage chat     $PY sample.py --out_dir="$OUT/grpo" --prompt="What is 7 + 8?" --temperature=0 --max_new_tokens=32
echo "total $(( $(date +%s) - T_START ))" >> "$OUT/timings.tsv"

echo
$PY report.py --out="$OUT"
