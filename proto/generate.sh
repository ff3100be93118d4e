#!/usr/bin/env bash
# Regenerates the Go code of the agent API from proto/agent/v1/agent.proto.
# Installs the pinned protoc plugins under _output/tools/bin when missing;
# protoc itself comes from Debian's protobuf-compiler package.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${root}/_output/tools/bin"
protoc_gen_go_version=v1.36.12
protoc_gen_go_ttrpc_version=v1.2.10

mkdir -p "${bin}"
if [[ ! -x "${bin}/protoc-gen-go" ]]; then
	GOBIN="${bin}" go install "google.golang.org/protobuf/cmd/protoc-gen-go@${protoc_gen_go_version}"
fi
if [[ ! -x "${bin}/protoc-gen-go-ttrpc" ]]; then
	GOBIN="${bin}" go install "github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc@${protoc_gen_go_ttrpc_version}"
fi

cd "${root}/proto"
protoc \
	--plugin=protoc-gen-go="${bin}/protoc-gen-go" \
	--plugin=protoc-gen-go-ttrpc="${bin}/protoc-gen-go-ttrpc" \
	-I . \
	--go_out=paths=source_relative:. \
	--go-ttrpc_out=paths=source_relative:. \
	agent/v1/agent.proto agent/v1/container.proto agent/v1/network.proto
