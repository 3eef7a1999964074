fairseq-eval-lm $D/bin --user-dir $UD --task longmem_lm --gen-subset test --tokens-per-sample 256 --batch-size 2 --num-workers 0 --cpu --path $SM/checkpoint.pt
