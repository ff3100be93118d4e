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
	"google.golang.org/protobuf/types/known/anypb"
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

// starter is the part of the shim an old-style `start` calls.
type starter interface {
	Start(ctx context.Context, params *bootapi.BootstrapParams) (*bootapi.BootstrapResult, error)
}

// startLegacy runs `start` for containerd before 2.3 when that is what args and stdin hold, and reports whether
// it did. Otherwise it leaves the command to pkg/shim, with whatever it read from stdin put back in
// os.Stdin.
func startLegacy(ctx context.Context, m starter, args []string, stdout io.Writer) (bool, error) {
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
	return true, legacyStart(ctx, m, a, os.Getenv("TTRPC_ADDRESS"), input, stdout)
}

// legacyStart starts (or joins) the task's shim server with what containerd before 2.3 passes on the command
// line, in the environment and on stdin (options: the runtime options, as an Any), and writes the result as the
// JSON it reads.
func legacyStart(ctx context.Context, m starter, a shimArgs, ttrpcAddress string, options []byte, stdout io.Writer) error {
	ctx = namespaces.WithNamespace(ctx, a.namespace)
	ctx = context.WithValue(ctx, shim.OptsKey{}, shim.Opts{BundlePath: a.bundle, Debug: a.debug})
	params := &bootapi.BootstrapParams{
		InstanceID:             a.id,
		Namespace:              a.namespace,
		LogLevel:               bootapi.LogLevel_LOG_LEVEL_INFO,
		ContainerdGrpcAddress:  a.address,
		ContainerdTtrpcAddress: ttrpcAddress,
	}
	if a.debug {
		params.LogLevel = bootapi.LogLevel_LOG_LEVEL_DEBUG
	}
	// As the bootstrap protocol carries them: an extension. Only a spare's fit check reads them at `start`;
	// options that do not decode leave it to Create, which reports them.
	var opts anypb.Any
	if len(options) > 0 && proto.Unmarshal(options, &opts) == nil {
		_ = params.AddExtension(&opts)
	}
	res, err := m.Start(ctx, params)
	if err != nil {
		return err
	}
	b, err := json.Marshal(legacyResult{Version: res.GetVersion(), Address: res.GetAddress(), Protocol: res.GetProtocol()})
	if err != nil {
		return fmt.Errorf("encode start result: %w", err)
	}
	if _, err := stdout.Write(b); err != nil {
		return fmt.Errorf("write start result: %w", err)
	}
	return nil
}

// legacyResult is the `start` result containerd before 2.3 reads; a version below 2 (or output that is not
// JSON) would make it take the output for a bare ttrpc address.
type legacyResult struct {
	Version  int32  `json:"version"`
	Address  string `json:"address"`
	Protocol string `json:"protocol"`
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
