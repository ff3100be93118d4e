// Package agentv1 is the generated Go code of the Kiln agent API version 1
// (agent.proto): message types, ttrpc service interfaces, their clients and
// registration helpers. Regenerate with proto/generate.sh; never edit the
// *.pb.go files by hand. It knows the wire contract only, not who serves it.
package agentv1
