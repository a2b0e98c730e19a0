#!/usr/bin/env bash
# The offline lm-eval task pack on four models trained with one budget (cpu-tiny architecture, 300 steps of
# 16 x 32 tokens): AR, MDLM, Eso-LM (B) alpha0 = 0.25 and 0.5. Diffusion baselines use mc_num=32.
#   bash benchmarks/lm_eval_pack.sh [OUT_DIR]        (uses `esolm` from PATH, e.g. after `source .venv/bin/activate`)
set -euo pipefail
OUT=${1:-runs/lm_eval_pack}
mkdir -p "$OUT"
TASKS_DIR=$(esolm lm-eval --tasks-dir)
COMMON="trainer.max_steps=300 trainer.global_batch=16 trainer.val_every=0 trainer.ckpt_every=300 trainer.logger=none data.max_documents=2000"
for spec in "ar:method.name=ar" "mdlm:method.name=mdlm" "eso_a025:method.alpha0=0.25" "eso_a05:method.alpha0=0.5"; do
  name=${spec%%:*}; override=${spec#*:}
  # shellcheck disable=SC2086
  esolm train cpu-tiny trainer.out_dir="$OUT/runs/$name" "$override" $COMMON > "$OUT/$name.train.log" 2>&1
  esolm export "$OUT/runs/$name/checkpoints/last.ckpt" "$OUT/models/$name" > /dev/null
  esolm lm-eval --model esolm --model_args "pretrained=$OUT/models/$name,mc_num=32" \
    --tasks esolm_wiki_ppl,esolm_wiki_choice,esolm_wiki_next --include_path "$TASKS_DIR" \
    --metadata '{"num_docs": 64}' --device cpu --batch_size 16 > "$OUT/$name.lmeval.log" 2>&1
  echo "== $name"; grep -E "^\|" "$OUT/$name.lmeval.log"
done
