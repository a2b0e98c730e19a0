for r in 0 1 2 3 4 5 6 7; do
  if [ $((r % 2)) = 0 ]; then order="base main"; else order="main base"; fi
  for t in $order; do
    d=/work/wt/base; [ $t = main ] && d=/work/main
    PYTHONPATH=$d/src OMP_NUM_THREADS=1 /work/main/.venv/bin/python $d/benchmarks/engine_throughput.py esolm-small --requests 32 --batches 8,1 --threads 1 --out /tmp/et_${t}_$r >/dev/null 2>&1
    python3 -c "import json; d=json.load(open('/tmp/et_${t}_$r.json')); print('$t', $r, ' '.join(f\"b{x['max_batch']}={x['seconds']:.3f}\" for x in d['rows']))"
  done
done
