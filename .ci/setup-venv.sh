# Sourced by .ci/test and .ci/demo: setup_venv DIR [EXTRA PIP REQUIREMENTS...]
# Creates DIR with torch (CPU build from $TORCH_SPEC), this project editable with
# its test, search and lm-eval extras (the search tests run in CI; .ci/demo shares the
# venv), and the extra requirements; re-creates it when pyproject.toml or the
# extras change.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

setup_venv() {
  local venv="$1"; shift
  local stamp
  stamp="$(cat pyproject.toml; echo "$TORCH_SPEC $*")"
  stamp="$(printf '%s' "$stamp" | sha256sum | cut -c1-16)"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.circuit-stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  echo "setting up $venv ..."
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$TORCH_SPEC"
  "$venv/bin/python" -m pip install -q -e ".[test,search,lm-eval]" "$@"
  "$venv/bin/python" -c "import circuit_merge_plugin, mergekit, torch"
  echo "$stamp" > "$venv/.circuit-stamp"
}
