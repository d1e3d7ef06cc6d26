#!/usr/bin/env bash
# Time from a shard's SIGKILL to the first training step past it (demo: 2 shards, 4 workers, digits MLP),
# checkpoints every 10 steps, shard 1 killed at step 120 and restarted at once with --restore latest.
cd /work/main
date -u
for mode in sync async; do
  for r in 1 2 3 4 5; do
    target/release/parasync demo --json --mode $mode --kill-shard-at 120 --kill-shard 1 | python3 -c "
import json,sys; d=json.load(sys.stdin); k=d['kill']
print('$mode', $r, 'restart_s', round(k['restart_seconds'],4), 'recovery_s', round(k['recovery_seconds'],4), 'restored', k['restored_step'], 'at', k['at_step'], 'acc', round(d['test_accuracy'],4), 'steps/s', round(d['steps_per_second'],1))"
  done
done
date -u
