package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf/proto"
	"github.com/containerd/containerd/v2/pkg/shim"
)

// containerd 2.3 changed how it runs a shim's `start` command: it writes a bootstrap message (the task's id,
// namespace and containerd's addresses) to the shim's stdin and reads a protobuf result. containerd before 2.3
// (2.2 is the line many Kubernetes nodes run) writes the runtime options there instead, or nothing, and reads
// JSON. pkg/shim of containerd 2.4 serves only the first and fails the second with "shim was started through
// the deprecated API". This file serves the old `start` itself; every other command, and a `start` with a
// bootstrap message, goes to pkg/shim unchanged.

// maxStartInput bounds what `start` reads from stdin, as pkg/shim does.
const maxStartInput = 10 << 20

// shimArgs are the command-line flags containerd passes a shim, and its command.
type shimArgs struct {
	action, id, namespace, address, bundle string
	debug, version, info                   bool
}

// parseShimArgs reads the flags pkg/shim defines, without touching the process's flag set (pkg/shim parses
// that one itself). ok is false when they do not parse: pkg/shim then reports it.
func parseShimArgs(args []string) (a shimArgs, ok bool) {
	fs := flag.NewFlagSet("shim", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.BoolVar(&a.debug, "debug", false, "")
	fs.BoolVar(&a.version, "v", false, "")
	fs.BoolVar(&a.version, "version", false, "")
	fs.BoolVar(&a.info, "info", false, "")
	fs.StringVar(&a.namespace, "namespace", "", "")
	fs.StringVar(&a.id, "id", "", "")
	fs.String("socket", "", "")
	fs.String("debug-socket", "", "")
	fs.StringVar(&a.bundle, "bundle", "", "")
	fs.StringVar(&a.address, "address", "", "")
	fs.String("publish-binary", "", "")
	if err := fs.Parse(args); err != nil {
		return a, false
	}
	a.action = fs.Arg(0)
	return a, true
}

// isBootstrap says whether input is the bootstrap message of containerd 2.3 or later for this task: runtime
// options from an older containerd can decode as one too, so its identity must match the command line.
func isBootstrap(input []byte, id, namespace string) bool {
	var p bootapi.BootstrapParams
	if len(input) == 0 || proto.Unmarshal(input, &p) != nil {
		return false
	}
	return p.GetInstanceID() == id && p.GetNamespace() == namespace
}

// legacyStarter is the part of the shim manager an old-style `start` calls.
type legacyStarter interface {
	Start(ctx context.Context, id string, opts shim.StartOpts) (shim.BootstrapParams, error)
}

// startLegacy runs `start` for containerd before 2.3 when that is what args and stdin hold, and reports whether
// it did. Otherwise it leaves the command to pkg/shim, with whatever it read from stdin put back in
// os.Stdin.
func startLegacy(ctx context.Context, m legacyStarter, args []string, stdout io.Writer) (bool, error) {
	a, ok := parseShimArgs(args)
	if !ok || a.action != "start" || a.version || a.info || a.namespace == "" {
		return false, nil
	}
	input, err := io.ReadAll(io.LimitReader(os.Stdin, maxStartInput))
	if err != nil {
		return false, fmt.Errorf("read start parameters from stdin: %w", err)
	}
	if isBootstrap(input, a.id, a.namespace) {
		if err := replayStdin(input); err != nil {
			return false, err
		}
		return false, nil
	}
	return true, legacyStart(ctx, m, a, os.Getenv("TTRPC_ADDRESS"), stdout)
}

// legacyStart starts (or joins) the task's shim server the way pkg/shim did before containerd 2.3 and writes
// its address as the JSON containerd reads.
func legacyStart(ctx context.Context, m legacyStarter, a shimArgs, ttrpcAddress string, stdout io.Writer) error {
	ctx = namespaces.WithNamespace(ctx, a.namespace)
	ctx = context.WithValue(ctx, shim.OptsKey{}, shim.Opts{BundlePath: a.bundle, Debug: a.debug})
	params, err := m.Start(ctx, a.id, shim.StartOpts{Address: a.address, TTRPCAddress: ttrpcAddress, Debug: a.debug})
	if err != nil {
		return err
	}
	b, err := json.Marshal(params)
	if err != nil {
		return fmt.Errorf("encode start result: %w", err)
	}
	if _, err := stdout.Write(b); err != nil {
		return fmt.Errorf("write start result: %w", err)
	}
	return nil
}

// replayStdin makes os.Stdin yield input again, for pkg/shim to read.
func replayStdin(input []byte) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("replay stdin: %w", err)
	}
	go func() {
		_, _ = w.Write(input)
		w.Close()
	}()
	os.Stdin = r
	return nil
}
