#!/usr/bin/env bash
# The test command (README "Test"; .ci/run runs it): the Rust workspace's tests, then the wire
# contract's lint and breaking-change check, then the Go and TypeScript clients' conformance
# tests against real dossier-node processes. Needs a Rust toolchain, Go 1.19+ with Debian's
# grpc/protobuf packages, protoc with the Go plugins, and Node.js 18+ with npm; it says what is
# missing. Everything it starts stops by itself and leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v cargo >/dev/null || missing+=("cargo (a Rust toolchain, 1.90 or later)")
command -v go >/dev/null || missing+=("go (apt-get install golang-go)")
[ -d /usr/share/gocode/src/google.golang.org/grpc ] || missing+=("grpc-go (apt-get install golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev)")
command -v protoc >/dev/null || missing+=("protoc (apt-get install protobuf-compiler)")
command -v protoc-gen-go >/dev/null || missing+=("protoc-gen-go (apt-get install protoc-gen-go)")
command -v protoc-gen-go-grpc >/dev/null || missing+=("protoc-gen-go-grpc (apt-get install protoc-gen-go-grpc)")
command -v npm >/dev/null || missing+=("npm (Node.js 18 or later)")
if [ ${#missing[@]} -gt 0 ]; then
    printf 'test.sh: missing: %s\n' "${missing[@]}" >&2
    echo "test.sh: .ci/run installs all of them on Debian 12" >&2
    exit 2
fi

echo "== Rust: cargo test --workspace"
cargo test --workspace --locked
cargo build --locked -p dossier-node -p dossier-cli
export DOSSIER_NODE_BIN="$PWD/target/debug/dossier-node"

echo "== wire contract: buf lint, buf breaking against api/released.binpb"
(cd clients/web && npm ci --no-audit --no-fund --loglevel=error)
clients/web/node_modules/.bin/buf lint
clients/web/node_modules/.bin/buf breaking --against api/released.binpb

echo "== Go client: generated code up to date, vet, conformance against 3 real nodes"
(
    cd clients/go
    ./generate.sh --check
    ./vendor-debian.sh
    trap 'rm -rf vendor' EXIT
    export GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local
    go vet ./...
    go test -count=1 ./...
)

echo "== TypeScript client: gRPC-Web conformance against 3 real nodes"
(cd clients/web && npm test)
echo "test.sh: all passed"
