#!/bin/bash
# Run a command with the engine (every pagedray.* subpackage) imported from another source tree: the
# baseline of an A/B in the same device call, on the same card. The command itself (a benchmark
# script of this tree) stays; only `import pagedray...` resolves to TREE, through a PYTHONPATH
# folder of links that the import system searches before the installed (or editable) package.
#   git archive BASE cluster workers models kernels protos common | tar -x -C .base   # (here)
#   bash benchmarks/base_tree.sh .base python3 benchmarks/throughput.py --shape qwen2.5-0.5b ...
set -eu
tree=$(cd "$1" && pwd); shift
for sub in cluster workers models kernels protos common; do
  [ -d "$tree/$sub" ] || { echo "base_tree.sh: $tree has no $sub/ (not a pagedray source tree)" >&2; exit 2; }
done
ns=$(mktemp -d)
trap 'rm -rf "$ns"' EXIT
mkdir "$ns/pagedray"
for sub in cluster workers models kernels protos common; do ln -s "$tree/$sub" "$ns/pagedray/$sub"; done
export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import pagedray.cluster as c, sys; sys.exit(0 if c.__file__.startswith('$ns') else 1)" \
  || { echo "base_tree.sh: pagedray.cluster does not import from $tree" >&2; exit 2; }
echo "base_tree.sh: pagedray.* from $tree"
"$@"
