#!/usr/bin/env bash
# max RSS (KiB) of the MR seed 3 fairseq-generate (and any worker it forks), sampled every 2 s
pat="fairseq-generate.*--icl-dataset mr.*--icl-seed 3"
while ! pgrep -f "$pat" >/dev/null; do sleep 2; done
max=0; n=0
while pids=$(pgrep -f "$pat"); do
  for p in $pids; do r=$(awk '/VmRSS/{print $2}' /proc/$p/status 2>/dev/null); [ -n "$r" ] && [ "$r" -gt "$max" ] && max=$r; done
  n=$((n+1)); echo "$(date +%T) samples=$n max_rss_kib=$max" > rss_mr_memory_seed3.txt; sleep 2
done
echo "final $(date +%T) samples=$n max_rss_kib=$max" >> rss_mr_memory_seed3.txt
