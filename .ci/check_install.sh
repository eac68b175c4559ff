#!/usr/bin/env bash
# Install check: a non-editable `pip install "<checkout>[train,deploy]"` into a fresh virtualenv gives a
# package that imports, predicts and trains from outside the checkout (.ci/install_smoke.py).
# Everything lives in a temporary directory that is removed on exit.
#
# pip uses the index / cache configured on the machine (so a warm pip cache works offline). By
# default requirements.txt (CHECK_INSTALL_CONSTRAINTS: another pins file, e.g. requirements-latest.txt
# with PYTHON set to a Python 3.12) is passed as a constraints file: the same pinned versions as `make`,
# reproducibly; the dependency list itself comes only from pyproject.toml, so a dependency it
# lacks still fails here. CHECK_INSTALL_UNPINNED=1 resolves pyproject's ranges alone instead.
set -euo pipefail

checkout="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/ghostnetv2_install.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

# Build from a snapshot of the checkout's files (tracked and not ignored), not the checkout
# itself: setuptools builds in-tree and would leave build/ and *.egg-info behind, and a stale
# build/ from an earlier run could put files in the wheel that the checkout no longer has.
src="$tmp/src"
mkdir -p "$src"
if git -C "$checkout" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$checkout" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done |
        tar --null -T - -cf -) | tar -xf - -C "$src"
else
    tar -C "$checkout" --exclude=./.venv --exclude=./build --exclude='*.egg-info' -cf - . | tar -xf - -C "$src"
fi

"$python" -m venv "$tmp/venv"
pip_args=(--quiet --disable-pip-version-check --no-compile)   # no .pyc for all of TF: faster in and out
if [[ "${CHECK_INSTALL_UNPINNED:-0}" != 1 ]]; then
    pip_args+=(--constraint "${CHECK_INSTALL_CONSTRAINTS:-$checkout/requirements.txt}")
fi
echo "check_install: pip install \"$checkout[train,deploy]\" (non-editable) into a fresh $("$python" -V) venv"
# (the machine's extra file indexes make pip warn once per package they lack: noise, dropped)
"$tmp/venv/bin/python" -m pip install "${pip_args[@]}" "$src[train,deploy]" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "check_install: installed in $((SECONDS - start)) s"

mkdir -p "$tmp/run"
cd "$tmp/run"   # outside the checkout: the import must come from site-packages
env -u PYTHONPATH "$tmp/venv/bin/python" "$checkout/.ci/install_smoke.py" "$checkout" "$tmp/run"
echo "check_install: passed in $((SECONDS - start)) s"
