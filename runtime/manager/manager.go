// Package manager owns the shim's `start` and `delete` commands (containerd's shim.Manager): `start` groups
// tasks, one shim and one VM per group (the CRI sandbox id when the spec carries one, otherwise one per
// container), and starts the shim server or points containerd at the group's running one; `delete` cleans up
// after a shim that is gone (its VM, its shared directory and its state) and reports the task's exit. It knows
// the on-disk task record that runtime/task writes, and nothing of the task API itself.
package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	goruntime "runtime"
	"syscall"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"

	// Registers the runtime-spec types (features.Features among them) with typeurl.
	_ "github.com/containerd/containerd/v2/core/runtime"

	"github.com/kiln-runtime/kiln/proto/features"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/hooks"
	"github.com/kiln-runtime/kiln/runtime/spare"
	"github.com/kiln-runtime/kiln/runtime/task"
)

// RuntimeName is the runtime type containerd knows Kiln by.
const RuntimeName = "io.containerd.kiln.v2"

// spareHandOverTimeout bounds handing a task to a spare shim; a spare that does not answer in time is passed
// over, and `start` starts the server itself.
const spareHandOverTimeout = 5 * time.Second

// spareHoldTimeout bounds holding the spares that still boot; one that does not answer at once is not held.
const spareHoldTimeout = time.Second

// Manager implements containerd's shim.Shim for Kiln.
type Manager struct {
	version string
}

var _ shim.Shim = (*Manager)(nil)

// New returns the manager; version is reported by Info.
func New(version string) *Manager { return &Manager{version: version} }

// Name is the runtime type.
func (m *Manager) Name() string { return RuntimeName }

// Group is the shim group of a container: its pod's sandbox id when CRI set one, otherwise its own id.
func Group(id string, annotations map[string]string) string {
	if g := annotations[bundle.SandboxAnnotation]; g != "" {
		return g
	}
	return id
}

// Start starts the group's shim server, or returns the address of the one already serving the group.
func (m *Manager) Start(ctx context.Context, p *bootapi.BootstrapParams) (_ *bootapi.BootstrapResult, retErr error) {
	id := p.GetInstanceID()
	params := &bootapi.BootstrapResult{Version: 3, Protocol: "ttrpc"}
	cwd, err := os.Getwd()
	if err != nil {
		return nil, fmt.Errorf("start shim for %s: %w", id, err)
	}
	annotations, err := bundle.Annotations(cwd)
	if err != nil {
		return nil, err
	}
	group := Group(id, annotations)
	// containerd's shim package linked the socket directory containerd passed in the bundle before calling Start.
	address, err := shim.CreateSocketAddress(ctx, task.SocketDir(cwd), p.GetContainerdGrpcAddress(), group, false)
	if err != nil {
		return nil, fmt.Errorf("shim socket address for group %s: %w", group, err)
	}
	socket, err := shim.NewSocket(address)
	if err != nil {
		if !shim.SocketEaddrinuse(err) {
			return nil, fmt.Errorf("create shim socket %s: %w", address, err)
		}
		if shim.CanConnect(address) {
			// The group's shim is running: the task joins its VM.
			params.Address = address
			return params, nil
		}
		// Left by a shim that died: take it over.
		if err := shim.RemoveSocket(address); err != nil {
			return nil, fmt.Errorf("remove stale shim socket %s: %w", address, err)
		}
		if socket, err = shim.NewSocket(address); err != nil {
			return nil, fmt.Errorf("create shim socket %s: %w", address, err)
		}
	}
	defer func() {
		if retErr != nil {
			_ = socket.Close()
			_ = shim.RemoveSocket(address)
		}
	}()
	f, err := socket.File()
	if err != nil {
		return nil, fmt.Errorf("shim socket %s: %w", address, err)
	}
	defer f.Close()
	debug := p.GetLogLevel() <= bootapi.LogLevel_LOG_LEVEL_DEBUG
	cmd, err := serverCommand(ctx, id, group, p.GetContainerdGrpcAddress(), debug)
	if err != nil {
		return nil, err
	}
	cmd.ExtraFiles = []*os.File{f}
	// A spare shim of this containerd, when one waits, becomes the server (runtime/spare). Nothing may be logged
	// on this path: `start`'s output is containerd's bootstrap channel.
	actx, cancel := context.WithTimeout(ctx, spareHandOverTimeout)
	req := spare.Request{Version: spare.Build(m.version), Args: cmd.Args, Env: cmd.Env, Dir: cmd.Dir, Task: spareTask(id, p)}
	pid, err := spare.Adopt(actx, p.GetContainerdGrpcAddress(), req, f)
	cancel()
	if err == nil {
		_ = shim.AdjustOOMScore(pid)
		params.Address = address
		return params, nil
	}
	// The spares still booting stand still while the server starts the task beside them; the holds go with the
	// server, which lets go once its task has started (runtime/spare).
	hctx, cancel := context.WithTimeout(ctx, spareHoldTimeout)
	holds := spare.Hold(hctx, p.GetContainerdGrpcAddress())
	cancel()
	defer func() {
		for _, h := range holds {
			_ = h.Close()
		}
	}()
	spare.PassHolds(cmd, holds)
	// Pdeathsig-style options are not used: the server must outlive this short-lived `start` process.
	goruntime.LockOSThread()
	err = cmd.Start()
	goruntime.UnlockOSThread()
	if err != nil {
		return nil, fmt.Errorf("start shim server for group %s: %w", group, err)
	}
	go func() { _ = cmd.Wait() }()
	if err := shim.AdjustOOMScore(cmd.Process.Pid); err != nil {
		log.G(ctx).WithError(err).Debug("adjust shim OOM score")
	}
	params.Address = address
	return params, nil
}

// spareTask is the task `start` runs for, as a spare decides by (runtime/spare): its id and the Kiln configuration
// its runtime options name, which containerd passes to `start` as an extension when there are any ("" without:
// the default, as for Create).
func spareTask(id string, p *bootapi.BootstrapParams) *spare.Task {
	t := &spare.Task{ID: id}
	for _, ext := range p.GetExtensions() {
		if ext.GetValue().GetTypeUrl() == "" {
			continue
		}
		if path, err := task.ConfigPath(ext.GetValue()); err == nil {
			t.ConfigPath = path
			break
		}
	}
	return t
}

// serverCommand is this binary run as the shim server for a group, from the current (bundle) directory.
func serverCommand(ctx context.Context, id, group, address string, debug bool) (*exec.Cmd, error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("locate shim binary: %w", err)
	}
	cwd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	args := []string{"-namespace", ns, "-id", id, "-address", address}
	if debug {
		args = append(args, "-debug")
	}
	cmd := exec.Command(self, args...)
	cmd.Dir = cwd
	cmd.Env = append(os.Environ(), "GOMAXPROCS=4", task.GroupEnv+"="+group)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd, nil
}

// deadShimPoststop runs the poststop hooks of the bundle in dir, whose shim is gone: without a pid (the stand-in's
// went with the shim and may be another process's by now). False when the bundle does not load (logged) or has
// no hooks.
func deadShimPoststop(ctx context.Context, l *log.Entry, id, dir string) bool {
	b, err := bundle.Load(dir)
	if err != nil {
		l.WithError(err).Warn("load the bundle for its poststop hooks")
		return false
	}
	if !hooks.Any(b.Spec) {
		return false
	}
	if err := hooks.Poststop(ctx, b.Spec, hooks.State{ID: id, Bundle: dir, Annotations: b.Spec.Annotations}); err != nil {
		l.WithError(err).Warn("poststop hook failed")
	}
	return true
}

// Info describes the runtime to containerd.
func (m *Manager) Info(ctx context.Context, optionsR io.Reader) (*types.RuntimeInfo, error) {
	feat, err := typeurl.MarshalAnyToProto(features.OCI())
	if err != nil {
		return nil, fmt.Errorf("encode runtime features: %w", err)
	}
	return &types.RuntimeInfo{
		Name:     RuntimeName,
		Version:  &types.RuntimeVersion{Version: m.version},
		Features: feat,
	}, nil
}

// stopBudget is how long Stop may take, within containerd's 5 s for the `delete` command.
const stopBudget = 4 * time.Second

// Stop is the `delete` command: containerd runs it in the task's bundle when the shim serving the task is gone
// (crashed, or killed) or never came up. It stops what is left of the VM, removes the share and the VM's state,
// and reports the task as killed.
func (m *Manager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	status := shim.StopStatus{ExitedAt: time.Now(), ExitStatus: 128 + int(syscall.SIGKILL)}
	cwd, err := os.Getwd()
	if err != nil {
		return status, err
	}
	rec, err := task.ReadRecord(cwd)
	if errors.Is(err, os.ErrNotExist) {
		// No task was recorded: the shim died before its create was done, or never came up. If its create hooks
		// had run by then (nerdctl's CNI ADD), the poststop hooks that undo them run now.
		if by, owed := hooks.Owed(cwd); owed {
			if by > 0 && by != os.Getpid() && isShim(by) {
				// Its shim runs on, still creating (containerd gave up on the create): the hooks are its to run.
				log.G(ctx).WithFields(log.Fields{"container": id, "shim": by}).Info("shim still running; leaving its poststop hooks to it")
				return status, nil
			}
			deadShimPoststop(ctx, log.G(ctx).WithField("container", id), id, cwd)
		}
		return status, nil
	}
	if err != nil {
		return status, err
	}
	status.Pid = int(rec.Pid)
	l := log.G(ctx).WithFields(log.Fields{"container": id, "sandbox": rec.VMID})
	if shimAlive(rec) {
		// containerd lost the shim (its connection broke, or it restarted and gave up reconnecting) and forgets
		// the task after this: the shim, which serves its pod's other tasks on, is asked to end this one, as
		// runc's `delete --force` kills the container.
		l = l.WithField("shim", rec.ShimPid)
		if err := stopLiveTask(ctx, rec, id); err != nil {
			l.WithError(err).Warn("shim still running and not answering; the task may run on in its VM")
		} else {
			l.Info("shim still running; it killed and deleted the task")
		}
		return status, nil
	}
	// The shim died with the container, before its poststop hooks ran (nerdctl's CNI DEL, which releases the
	// address its ADD leased): they run now, as runc's delete runs them, and first, whatever the cleanup below
	// meets, since containerd gives this command 5 s.
	if !rec.PoststopRan && deadShimPoststop(ctx, l, id, cwd) {
		rec.PoststopRan = true
		if err := task.WriteRecord(cwd, rec); err != nil {
			l.WithError(err).Warn("record that the poststop hooks ran")
		}
	}
	// containerd kills this command after 5 s (io.containerd.timeout.shim.cleanup), which would leave the share
	// mounted and the VM's state behind: the cleanup's waits end before that, whatever the hooks took.
	cctx, cancel := context.WithDeadline(ctx, status.ExitedAt.Add(stopBudget))
	defer cancel()
	if err := Cleanup(cctx, rec, task.SocketDir(cwd)); err != nil {
		if errdefs.IsFailedPrecondition(err) {
			l.WithError(err).Info("shim still running; leaving its VM to it")
			return status, nil
		}
		return status, err
	}
	if err := task.RemoveRecord(cwd); err != nil {
		l.WithError(err).Warn("remove task record")
	}
	return status, nil
}
