#!/usr/bin/env bash
# Prepare what benchmarks/gpu.sh needs on the lent GPU machine, which reaches no package registry and gets only the
# repository's working tree: run this in the repository root on a machine with pip and ../shared, then pass
# `carry: [".whl", ".gpu_data"]` to the device call (see benchmarks/README.md, "GPU").
#
#   .whl/       wheels of what the GPU image lacks (its package list: datasets and torch-pruning are missing; of
#               their dependencies only dill and multiprocess), one version each, for python 3.12 manylinux x86_64
#   .gpu_data/  a 1,024 + 512 image CIFAR-10 subset for quality.py's GPU smoke run, and the git commit of this tree
#               (the device's copy of the tree has no .git)
#
# Both folders are git-ignored (.git/info/exclude); nothing here is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exclude=$(git rev-parse --git-path info/exclude)
for folder in /.whl/ /.gpu_data/; do
    grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >> "$exclude"
done

# The versions the CPU machines and the earlier GPU run used; datasets 5.2.0 needs dill<0.4.2, multiprocess<0.70.20.
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 torch-pruning==1.6.1)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl

DATA=${CIFAR10_DIR:-../shared/data/cifar10}
mkdir -p .gpu_data/cifar10
"$PY" - "$DATA" .gpu_data/cifar10 <<'EOF'
import sys
from pathlib import Path

import pyarrow.parquet as pq

source, target = Path(sys.argv[1]), Path(sys.argv[2])
for split, rows in (("train", 1024), ("test", 512)):
    shard = sorted(source.glob(f"{split}-*.parquet"))[0]
    table = pq.read_table(shard).slice(0, rows)
    pq.write_table(table, target / f"{split}-00000-of-00001.parquet")
    print(f"{target}/{split}-00000-of-00001.parquet: {table.num_rows} rows from {shard}")
EOF
git rev-parse --short HEAD > .gpu_data/git_commit
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then echo "+ local changes" >> .gpu_data/git_commit; fi
echo "recorded commit: $(tr '\n' ' ' < .gpu_data/git_commit)"
du -sh .whl .gpu_data
