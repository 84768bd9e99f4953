#!/usr/bin/env bash
# The README's "your own data" steps, end to end, offline and small, in a scratch directory:
# a corpus -> latents (packaged MiniLM) -> RWKV World tokens -> training with Hydra overrides
# on a local BlinkDL-layout .pth -> stopped at step 20 -> resumed to step 40.
#
#   bash eval/walkthrough.sh [WORK_DIR]        (default /tmp/rwkv_walkthrough; run from the repo root)
#
# The .pth is a small random RWKV-7 in the real rwkv7-g1 file layout (65536-token vocabulary),
# standing in for BlinkDL/rwkv7-g1 on a machine without Hub access. With network access, drop
# model.rwkv_name and the weights come from the Hub.
set -euo pipefail
W=${1:-/tmp/rwkv_walkthrough}
PY=${PYTHON:-python}
# progress bars (carriage-return lines) are left out of the output, which the README quotes
quiet() { "$@" 2>&1 | tr '\r' '\n' | grep -v -e '%|' -e '^$'; }
rm -rf "$W"; mkdir -p "$W"

echo "\$ head -n 2 $W/my_corpus.jsonl"
$PY - "$W/my_corpus.jsonl" <<'EOF'
import json, sys
from rwkv_diffusion_rnn.data.demo_corpus import make_corpus
with open(sys.argv[1], "w") as f:
    for s in make_corpus(600, seed=7):
        f.write(json.dumps({"text": s.text}) + "\n")
EOF
head -n 2 "$W/my_corpus.jsonl"

echo; echo "\$ python -m rwkv_diffusion_rnn.prepare_latents --input $W/my_corpus.jsonl --name my_32d --output_root $W/preprocessed_data --latent_dim 32"
quiet $PY -m rwkv_diffusion_rnn.prepare_latents --input "$W/my_corpus.jsonl" --name my_32d \
    --output_root "$W/preprocessed_data" --latent_dim 32

for split in train val; do
  echo; echo "\$ python -m rwkv_diffusion_rnn.preprocess_tokenize_text --json_path $W/preprocessed_data/my_32d/${split}_data.json --output_dir $W/preprocessed_data/rwkv_tokens --tokenizer BlinkDL/rwkv7-g1 --max_length 64"
  quiet $PY -m rwkv_diffusion_rnn.preprocess_tokenize_text --json_path "$W/preprocessed_data/my_32d/${split}_data.json" \
      --output_dir "$W/preprocessed_data/rwkv_tokens" --tokenizer BlinkDL/rwkv7-g1 --max_length 64
done

echo; echo "\$ python -c 'save_random_blinkdl_checkpoint(\"$W/rwkv7-tiny.pth\", ...)'   # stand-in for rwkv7-g1"
$PY -c "from rwkv_diffusion_rnn.weights.pretrained_rwkv import save_random_blinkdl_checkpoint as s; \
print(s('$W/rwkv7-tiny.pth', n_layer=2, n_embd=64, head_size=32, vocab_size=65536))"

TRAIN=(model.rwkv_name="$W/rwkv7-tiny.pth" tokenizer.name=BlinkDL/rwkv7-g1
       data.json_path="$W/preprocessed_data/my_32d/train_data.json"
       data.token_dir="$W/preprocessed_data/rwkv_tokens/train"
       data.latent_dir="$W/preprocessed_data/my_32d/latents/train"
       data.val_json_path="$W/preprocessed_data/my_32d/val_data.json"
       data.val_token_dir="$W/preprocessed_data/rwkv_tokens/val"
       data.val_latent_dir="$W/preprocessed_data/my_32d/latents/val"
       data.seq_len=64 training.train_batch_size=16 training.max_steps=40 training.num_epochs=null
       optimizer.lr=1e-3 optimizer.warmup_steps=5 logging.log_freq=10 logging.eval_freq=20
       logging.save_every=20 logging.progress_bar=false logging.save_dir="$W/run")

echo; echo "\$ python -m rwkv_diffusion_rnn.train_rwkv ${TRAIN[*]} training.stop_at_step=20"
$PY -m rwkv_diffusion_rnn.train_rwkv "${TRAIN[@]}" training.stop_at_step=20 2>&1

echo; echo "\$ ls $W/run"
ls "$W/run"

echo; echo "\$ python -m rwkv_diffusion_rnn.train_rwkv <same overrides> training.resume=latest"
$PY -m rwkv_diffusion_rnn.train_rwkv "${TRAIN[@]}" training.resume=latest 2>&1

echo; echo "\$ cat $W/run/train_log.jsonl"
cat "$W/run/train_log.jsonl"
