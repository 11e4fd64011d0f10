#!/usr/bin/env bash
# Build the Go CLIs the deployment checks need (helm, kubeconform, promtool) with
# `go install` from the Go module proxy, into a cache outside the checkout, so a
# fresh clone on the same machine (CI) reuses them. Later runs are no-ops.
# Usage: tools/go_tools.sh [BIN_DIR [TOOL...]]
#   BIN_DIR defaults to $SLUICE_GO_BIN or ~/.cache/sluice/bin; TOOL to all of them.
# First build on 2 busy cores: helm 21.6 min, kubeconform 1.3 min, promtool 77 min (docs/operations.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR="$(realpath -m "${1:-${SLUICE_GO_BIN:-$HOME/.cache/sluice/bin}}")"
shift || true
mkdir -p "$BIN_DIR"
command -v go >/dev/null || { echo "go not found: install Go 1.24+ (apt-get install golang-go, or go.dev/dl)" >&2; exit 1; }

# name -> module-path@version (pinned; bump here only)
declare -A MODULES=(
  [helm]=helm.sh/helm/v3/cmd/helm@v3.22.0
  [kubeconform]=github.com/yannh/kubeconform/cmd/kubeconform@v0.7.0
  [promtool]=github.com/prometheus/prometheus/cmd/promtool@v0.316.0
)
WANTED=("$@")
[[ ${#WANTED[@]} -gt 0 ]] || WANTED=(helm kubeconform promtool)

for name in "${WANTED[@]}"; do
  module="${MODULES[$name]:?unknown tool $name (one of: ${!MODULES[*]})}"
  stamp="$BIN_DIR/.$name.version"
  if [[ -x "$BIN_DIR/$name" && "$(cat "$stamp" 2>/dev/null)" == "$module" ]]; then
    continue
  fi
  echo "building $name ($module) into $BIN_DIR ..." >&2
  started=$SECONDS
  GOBIN="$BIN_DIR" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 go install -ldflags="-s -w" "$module"
  echo "$module" >"$stamp"
  echo "built $name in $((SECONDS - started))s" >&2
done
