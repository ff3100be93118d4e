// Package agentv1 is the generated Go code of the Kiln agent API version 1
// (agent.proto): message types, ttrpc service interfaces, their clients and
// registration helpers. Regenerate with proto/generate.sh; never edit the
// *.pb.go files by hand. It knows the wire contract only, not who serves it.
// The hand-written files hold what lies beside the messages: contract.go the
// ports and paths both sides agree on, portforward.go the framing of
// port-forward connections, which both ends import so they cannot drift.
package agentv1
