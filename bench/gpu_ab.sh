#!/usr/bin/env bash
# A/B of kernel versions in one call of the device machine (it gets a copy of the working tree,
# not the git history). Before the call, put each version's files under bench/variants/<label>/
# at their paths in the repository, e.g. from a branch rebased on main:
#     for file in $(git diff --name-only main BRANCH); do
#         mkdir -p "bench/variants/LABEL/$(dirname "$file")"
#         git show "BRANCH:$file" > "bench/variants/LABEL/$file"
#     done
# (bench/variants/ is git-ignored: name it in the call's carry). Then: bash bench/gpu_ab.sh COMMAND...  runs COMMAND with
# LABEL=base on the tree as it is, then once per variant with its files copied over the tree
# (LABEL=<label>), restoring the tree in between. COMMAND gets $LABEL in its environment.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash bench/gpu_ab.sh COMMAND..."; exit 2; }
backup=$(mktemp -d)
LABEL=base "$@"
for variant in bench/variants/*/; do
    [ -d "$variant" ] || continue
    label=$(basename "$variant")
    files=$(cd "$variant" && find . -type f)
    for file in $files; do
        mkdir -p "$backup/$label/$(dirname "$file")" "$(dirname "$file")"
        [ -f "$file" ] && cp "$file" "$backup/$label/$file"
        cp "$variant/$file" "$file"
    done
    LABEL=$label "$@"
    for file in $files; do  # the tree as it was: the file restored, or removed if it was new
        if [ -f "$backup/$label/$file" ]; then cp "$backup/$label/$file" "$file"; else rm -f "$file"; fi
    done
done
