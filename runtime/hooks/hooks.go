// Package hooks runs a container's OCI hooks on the host, as runc runs them: each hook's path with its args and
// env, the container's state as JSON on standard input, bounded by its timeout. Hooks that would have to run
// inside the container's namespaces (createContainer, startContainer) cannot: those namespaces are in the guest,
// and the hook binaries on the host. Kiln refuses them instead of dropping them.
package hooks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// State is the state hooks are given, the OCI runtime's state of the container.
type State struct {
	ID          string
	Bundle      string
	Annotations map[string]string
	// Pid is a host process in the container's network namespace.
	Pid int
}

// Check refuses a spec whose hooks Kiln cannot run.
func Check(spec *specs.Spec) error {
	if spec.Hooks == nil {
		return nil
	}
	if n := len(spec.Hooks.CreateContainer); n > 0 {
		return refused("createContainer", spec.Hooks.CreateContainer)
	}
	if n := len(spec.Hooks.StartContainer); n > 0 {
		return refused("startContainer", spec.Hooks.StartContainer)
	}
	for _, k := range []struct {
		kind  string
		hooks []specs.Hook
	}{{"prestart", spec.Hooks.Prestart}, {"createRuntime", spec.Hooks.CreateRuntime}, {"poststart", spec.Hooks.Poststart}, {"poststop", spec.Hooks.Poststop}} {
		for _, h := range k.hooks {
			// As runc, which never looks a hook up in its PATH: a relative one would name a program in the shim's
			// PATH or its working directory (the pod's first bundle).
			if !filepath.IsAbs(h.Path) {
				return fmt.Errorf("%w: %s hook %q: the runtime spec wants an absolute path", errdefs.ErrInvalidArgument, k.kind, h.Path)
			}
		}
	}
	return nil
}

func refused(kind string, hs []specs.Hook) error {
	return fmt.Errorf("%w: %s hook %s: it must run in the container's namespaces, which are inside Kiln's VM while the hook is a host binary; use a createRuntime or poststart hook", errdefs.ErrNotImplemented, kind, hs[0].Path)
}

// Any says whether the spec has a hook Kiln runs.
func Any(spec *specs.Spec) bool {
	h := spec.Hooks
	return h != nil && len(h.Prestart)+len(h.CreateRuntime)+len(h.Poststart)+len(h.Poststop) > 0
}

// owedFile, in a bundle, says that its container's create hooks ran and its poststop hooks have not, and which
// process ran them: a shim that dies before it recorded the task leaves it for containerd's `delete` (Owed),
// which then runs them.
const owedFile = "kiln-poststop-owed"

// CreateRuntime runs the spec's prestart and createRuntime hooks, in that order (runc's), with status "creating".
// The first failure is the error. With poststop hooks to undo them, it first marks them owed in st.Bundle, by
// this process; a bundle it cannot write in (a read-only one `kiln run` is given) only goes without the mark.
func CreateRuntime(ctx context.Context, spec *specs.Spec, st State) error {
	if spec.Hooks == nil {
		return nil
	}
	if len(spec.Hooks.Poststop) > 0 && len(spec.Hooks.Prestart)+len(spec.Hooks.CreateRuntime) > 0 {
		_ = os.WriteFile(filepath.Join(st.Bundle, owedFile), []byte(strconv.Itoa(os.Getpid())), 0o600)
	}
	//nolint:staticcheck // prestart is deprecated, but clients (Docker's libnetwork) still use it.
	if err := run(ctx, "prestart", spec.Hooks.Prestart, st, specs.StateCreating); err != nil {
		return err
	}
	return run(ctx, "createRuntime", spec.Hooks.CreateRuntime, st, specs.StateCreating)
}

// Poststart runs the poststart hooks with status "running".
func Poststart(ctx context.Context, spec *specs.Spec, st State) error {
	if spec.Hooks == nil {
		return nil
	}
	return run(ctx, "poststart", spec.Hooks.Poststart, st, specs.StateRunning)
}

// Poststop runs the poststop hooks with status "stopped". Every hook runs; the errors are joined. They are owed
// no more.
func Poststop(ctx context.Context, spec *specs.Spec, st State) error {
	if spec.Hooks == nil {
		return nil
	}
	var errs []error
	for i := range spec.Hooks.Poststop {
		errs = append(errs, run(ctx, "poststop", spec.Hooks.Poststop[i:i+1], st, specs.StateStopped))
	}
	if err := os.Remove(filepath.Join(st.Bundle, owedFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("note that the poststop hooks ran: %w", err))
	}
	return errors.Join(errs...)
}

// Owed says whether the container of bundle dir had its create hooks run and not yet its poststop hooks, and the
// pid of the process that ran them (0 if it cannot be read).
func Owed(dir string) (by int, owed bool) {
	b, err := os.ReadFile(filepath.Join(dir, owedFile))
	if err != nil {
		return 0, false
	}
	by, _ = strconv.Atoi(string(b))
	return by, true
}

// outputLimit bounds how much of a failed hook's output an error quotes.
const outputLimit = 4096

func run(ctx context.Context, kind string, hs []specs.Hook, st State, status specs.ContainerState) error {
	if len(hs) == 0 {
		return nil
	}
	state, err := json.Marshal(specs.State{
		Version: specs.Version, ID: st.ID, Status: status, Pid: st.Pid, Bundle: st.Bundle, Annotations: st.Annotations,
	})
	if err != nil {
		return fmt.Errorf("encode state for %s hooks: %w", kind, err)
	}
	for i, h := range hs {
		if err := runOne(ctx, h, state); err != nil {
			return fmt.Errorf("%s hook #%d %s: %w", kind, i, h.Path, err)
		}
	}
	return nil
}

func runOne(ctx context.Context, h specs.Hook, state []byte) error {
	if h.Timeout != nil {
		if *h.Timeout <= 0 {
			return fmt.Errorf("timeout %d: must be positive", *h.Timeout)
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(*h.Timeout)*time.Second)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, h.Path)
	// As execv (the spec's words): args include argv[0]; the environment is only what the hook names.
	if len(h.Args) > 0 {
		cmd.Args = h.Args
	}
	cmd.Env = h.Env
	if cmd.Env == nil {
		cmd.Env = []string{}
	}
	cmd.Stdin = bytes.NewReader(state)
	var out bytes.Buffer
	cmd.Stdout = &limited{w: &out, n: outputLimit}
	cmd.Stderr = cmd.Stdout
	cmd.WaitDelay = time.Second
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		if o := strings.TrimSpace(out.String()); o != "" {
			return fmt.Errorf("%w: %s", err, o)
		}
		return err
	}
	return nil
}

// limited keeps the first n bytes written and drops the rest.
type limited struct {
	w *bytes.Buffer
	n int
}

func (l *limited) Write(p []byte) (int, error) {
	if room := l.n - l.w.Len(); room > 0 {
		l.w.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}
