#!/usr/bin/env bash
# Builds vendor/ from the Go modules Debian installs under /usr/share/gocode (golang-go,
# golang-google-grpc-dev, golang-google-protobuf-dev and what they depend on), so that the module
# builds and tests offline: GOFLAGS=-mod=vendor, GOPROXY=off. vendor/ holds symlinks only and is
# not committed. The versions in go.mod are those of Debian 12's packages.
set -euo pipefail
cd "$(dirname "$0")"
src=${GOCODE:-/usr/share/gocode/src}
rm -rf vendor
mkdir -p vendor
: > vendor/modules.txt
# module path, version as go.mod requires it, "explicit" marker line
while read -r module version; do
    [ -n "$module" ] || continue
    if [ ! -d "$src/$module" ]; then
        echo "vendor-debian.sh: $src/$module is missing; install the Debian package providing it" >&2
        exit 1
    fi
    mkdir -p "vendor/$(dirname "$module")"
    ln -s "$src/$module" "vendor/$module"
    go_version=$(awk '$1 == "go" {print $2; exit}' "$src/$module/go.mod" 2>/dev/null || true)
    {
        echo "# $module $version"
        echo "## explicit${go_version:+; go $go_version}"
        # Every package of the module: directories holding non-test Go files.
        (cd "$src/$module" && find -L . -name '*.go' ! -name '*_test.go' ! -path '*/testdata/*' \
            ! -path '*/internal/cmd/*' -printf '%h\n' | sort -u | sed -e "s|^\.\$|$module|" -e "s|^\./|$module/|")
    } >> vendor/modules.txt
done < <(awk '/^require|^\t/ && $0 !~ /^require \(/ {sub(/^require /, ""); sub(/\/\/.*/, ""); if (NF == 2) print $1, $2}' go.mod)
