#!/usr/bin/env bash
# Regenerates api/dossierv1 from api/proto/dossier/v1 with protoc, protoc-gen-go and
# protoc-gen-go-grpc (Debian: protobuf-compiler, protoc-gen-go, protoc-gen-go-grpc). The
# generated code is committed, so that the module builds without them; `--check` fails when it
# is out of date.
set -euo pipefail
cd "$(dirname "$0")"
protos=../../api/proto
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
protoc -I "$protos" \
    --go_out="$out" --go_opt=module=dossier.internal/go \
    --go-grpc_out="$out" --go-grpc_opt=module=dossier.internal/go \
    "$protos"/dossier/v1/*.proto
if [ "${1:-}" = --check ]; then
    if ! diff -r "$out/api/dossierv1" api/dossierv1 >/dev/null; then
        echo "clients/go/api/dossierv1 is out of date with api/proto: run clients/go/generate.sh" >&2
        diff -r "$out/api/dossierv1" api/dossierv1 | head -20 >&2
        exit 1
    fi
    exit 0
fi
rm -rf api/dossierv1
mkdir -p api
cp -r "$out/api/dossierv1" api/
