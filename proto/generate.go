// Package proto holds the agent API definitions (.proto files) and their
// generated Go code in versioned subpackages (agentv1). It owns the wire
// contract between host and guest and must not know how either side serves or
// calls it.
package proto

//go:generate bash generate.sh
