// Package pod owns one Kiln pod on the host: the microVM with its agent connection, the shared directory it
// exports to the guest, and the registry of the pod's containers. New is the only code that boots a VM for
// containers, and Close the only code that tears one down; the shim, `kiln run`, the bench and the integration
// tests all go through it. It knows nothing of containerd's task API: callers hand it loaded bundles.
package pod

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/rlimit"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/guestclock"
	"github.com/kiln-runtime/kiln/runtime/hostcgroup"
	"github.com/kiln-runtime/kiln/runtime/portforward"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/runtime/share"
	"github.com/kiln-runtime/kiln/runtime/standin"
	"github.com/kiln-runtime/kiln/vm"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// Options describe a pod to boot.
type Options struct {
	// ID names the pod's VM. Its state lives in <runtime.state_dir>/<ID> and its share in
	// <runtime.state_dir>/<ID>.share; keep it short, QEMU's sockets live there and Unix socket paths are limited.
	ID     string
	Config config.Config
	// HostVersion is the version of the Kiln binary booting the pod, compared with the guest agent's.
	HostVersion string
	Log         *logrus.Entry
	// OnEvent and OnExit see the containers' events; see container.Options.
	OnEvent func(container.Event)
	OnExit  func(*container.Process, container.Exit)
	// First, when set, is the container the pod is booted for: its network namespace decides the VM's network
	// (see runtime/network) and its prestart and createRuntime hooks run once that namespace exists, before the
	// VM reads it. Without it the guest has no network but its loopback.
	First *First
	// Network, when set, is what a spare's pod prepared for First before it failed (Pod.TakeNetwork): New
	// takes it over instead of running First's hooks again, and undoes it on error.
	Network *Network
	// Background starts the VM's cgroup behind every other for CPU (qemu.Config.Background): a spare's pod, which
	// boots and waits on CPU nothing else wants. Foreground puts it back.
	Background bool
	// Hold, when set, is handed the VM's programs as they start (qemu.Config.Hold): a spare's pod, which a task's
	// start holds while it runs beside it.
	Hold func(qemu.Holdable)
	// StandIns holds the threads the pod's containers' stand-ins run on: one pool per process (a shim's), whose
	// threads never end. Nil gives the pod a pool of its own.
	StandIns *standin.Pool
}

// Pod is a booted microVM with its share and its containers.
type Pod struct {
	id    string
	cfg   config.Config
	log   *logrus.Entry
	share *share.Share
	sb    *sandbox.Sandbox
	ctrs  *container.Manager

	// net is the pod's host network: its namespace's mirror, the holder for hooks, where port forwarding dials.
	net     *hostNetwork
	forward *portforward.Forwarder
	// cgroup is the host cgroup the pod's host processes are accounted to, when its first spec names one. It is set
	// under cgroupMu once the VM runs (a spare's adoption, TakeNetwork), which watchVM reads it under.
	cgroupMu sync.Mutex
	cgroup   *hostcgroup.Group
	// bundles are the pod's containers' bundles, for their later hooks, and standIns their stand-ins.
	bundlesMu sync.Mutex
	bundles   map[string]*bundle.Bundle
	standIns  standIns

	// rlimits are the resource limits the pod's processes get for those their spec does not name (the shim's,
	// as runc's inherit them; rlimit.Inherited).
	rlimits []specs.POSIXRlimit

	// started is set once a container of the pod has started (Started).
	started atomic.Bool

	// closing is closed when Close begins: the VM's end is then expected.
	closing chan struct{}
	// volumes are the host tmpfs volumes whose size the VM's cgroup holds beyond the VM's own memory, by device
	// (allowVolumeMemory); under hostMemMu.
	hostMemMu sync.Mutex
	volumes   map[share.Device]int64
	// limits are the limits of the pod's containers that have any, by id, which a VM that can grow holds beside
	// what it booted with (fit); memMiB and vcpus are the memory and vCPUs its guest confirmed it has (0 until it
	// grows: what it booted with); under growMu.
	growMu sync.Mutex
	limits map[string]containerLimits
	memMiB int
	vcpus  int
	// stopClock ends the sync of the guest's clock (followClock), nil when there is none; under clockMu.
	clockMu   sync.Mutex
	stopClock context.CancelFunc
	closeOnce sync.Once
}

// ShareDir is where a pod's shared directory lives: beside its VM's state directory, not inside it, because
// the VM's is removed recursively when the VM ends and a share holds bind mounts of the user's files.
func ShareDir(stateDir, id string) string { return filepath.Join(stateDir, id+".share") }

// ownerFile, inside a share, names the process that owns the pod, so that a later pod can tell a share whose
// owner was killed from one whose pod is still booting. Not "owner", the name of a VM state directory's: qemu.Sweep
// would take the share for a VM's state and remove it, without the share's lock or undoing its network mirror.
const ownerFile = "pod-owner"

// New boots a pod: it removes what dead pods left in the state directory, creates the share, boots the VM
// exporting it, connects to the agent and starts following the containers' events. On error nothing is left.
func New(ctx context.Context, o Options) (_ *Pod, retErr error) {
	defer func() {
		if retErr != nil {
			// Nil, or taken by the pod, whose Close undid it: otherwise nothing else will.
			_ = o.Network.Close()
		}
	}()
	if o.Log == nil {
		o.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	log := o.Log.WithField("sandbox", o.ID)
	if o.First != nil {
		// Checked before anything boots; CreateContainer would refuse it only once the VM is up.
		if err := share.CheckID(o.First.ID); err != nil {
			return nil, Refuse(fmt.Errorf("boot pod %s: %w: %v", o.ID, errdefs.ErrInvalidArgument, err))
		}
		sized, err := Size(o.Config, o.First)
		if err != nil {
			return nil, Refuse(fmt.Errorf("boot pod %s: %w", o.ID, err))
		}
		o.Config = sized
	}
	stateDir := o.Config.Runtime.StateDir
	if err := os.MkdirAll(stateDir, 0o711); err != nil {
		return nil, fmt.Errorf("create state dir %s: %w", stateDir, err)
	}
	sweep(stateDir, log)
	dir := ShareDir(stateDir, o.ID)
	// A share of the same id whose owner is alive is in the way; sweep removed those whose owner is gone.
	if pid, err := qemu.ReadOwner(filepath.Join(dir, ownerFile)); err == nil && pid != os.Getpid() && qemu.OwnerAlive(pid) {
		return nil, fmt.Errorf("boot pod %s: its share %s belongs to running process %d", o.ID, dir, pid)
	}
	if err := share.Remove(dir); err != nil {
		return nil, fmt.Errorf("boot pod %s: remove stale share: %w", o.ID, err)
	}
	threads := o.StandIns
	if threads == nil {
		var err error
		if threads, err = standin.NewPool(); err != nil {
			return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
		}
	}
	sh, err := share.New(dir)
	if err != nil {
		return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
	}
	// The shim's limits are containerd's, which runc's container processes inherit; so do the pod's.
	rlimits, err := rlimit.Inherited(ctx)
	if err != nil {
		log.WithError(err).Warn("the resource limits the pod's processes inherit are partly the shim's own")
	}
	p := &Pod{id: o.ID, cfg: o.Config, log: log, share: sh, net: &hostNetwork{}, closing: make(chan struct{}), bundles: map[string]*bundle.Bundle{}, standIns: standIns{threads: threads, byID: map[string]*standin.Thread{}}, rlimits: rlimits}
	defer func() {
		if retErr != nil {
			if err := p.Close(context.WithoutCancel(ctx)); err != nil {
				log.WithError(err).Warn("tear down after a failed boot")
			}
		}
	}()
	if o.Network != nil {
		if o.First == nil {
			return nil, fmt.Errorf("boot pod %s: a prepared network without its first container", o.ID)
		}
		net, g, err := o.Network.take(o.First.ID)
		if err != nil {
			return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
		}
		p.net, p.cgroup = net, g
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return nil, fmt.Errorf("boot pod %s: write share owner: %w", o.ID, err)
	}
	if m := p.net.mirror; m != nil {
		// A taken network's record went with the spare's share: kept here at once, for a killed shim's `delete`.
		if err := m.Save(filepath.Join(dir, MirrorFile)); err != nil {
			return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
		}
	}
	qcfg, err := qemu.ConfigFrom(o.Config, o.ID, log)
	if err != nil {
		return nil, Refuse(fmt.Errorf("boot pod %s: %w", o.ID, err))
	}
	qcfg.SharedDir = sh.ExportDir()
	qcfg.Background, qcfg.Hold = o.Background, o.Hold
	if o.First != nil {
		// A taken network came with the cgroup the shim is in already.
		if p.cgroup == nil {
			if err := p.enterCgroup(o.First); err != nil {
				return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
			}
		}
		if qcfg.Nets, err = p.prepareNetwork(ctx, o.First); err != nil {
			return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
		}
	}
	m, err := qemu.New(qcfg)
	if err != nil {
		return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
	}
	sb, err := sandbox.Start(ctx, m, sandbox.OptionsFrom(o.Config, o.HostVersion, log))
	if err != nil {
		return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
	}
	p.sb = sb
	// A VM that can grow boots with the configuration's memory and vCPUs, and its pod's limits are added once it
	// runs (config.Hypervisor.MemoryLayout and CPULayout), so that pods of every size share one template.
	if err := p.grow(ctx); err != nil {
		return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
	}
	if err := p.configureGuestNetwork(ctx); err != nil {
		return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
	}
	p.startPortForward()
	// The Events stream never goes idle; on a connection of its own, Stop can cut it before asking the agent to
	// shut down instead of waiting out the agent's drain timeout.
	events, err := sb.StreamClient(ctx)
	if err != nil {
		return nil, fmt.Errorf("boot pod %s: %w", o.ID, err)
	}
	p.ctrs = container.NewManager(sb.Containers(), m, container.Options{
		Events:    events,
		OnEvent:   o.OnEvent,
		OnExit:    o.OnExit,
		Abandon:   p.stopUnresponsive,
		KillGrace: p.cfg.Agent.RequestTimeout.Std(),
		Rlimits:   p.rlimits,
		Log:       log,
	})
	go p.watchVM(m, sb.HungUp())
	if !o.Background {
		// A spare's starts once a pod adopts it (Adopt), after the reseed, which a sync begun before could undo.
		p.followClock()
	}
	return p, nil
}

// followClock keeps the guest's wall clock on the host's every agent.clock_sync (runtime/guestclock) until Close
// or the end of the agent connection, once. Not under the boot's context, which ends with the request that
// booted the pod.
func (p *Pod) followClock() {
	every := p.cfg.Agent.ClockSync.Std()
	if every <= 0 {
		return
	}
	p.clockMu.Lock()
	defer p.clockMu.Unlock()
	if p.stopClock != nil || p.isClosing() {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.stopClock = cancel
	hungUp := p.sb.HungUp()
	go func() {
		select {
		case <-hungUp:
			cancel()
		case <-ctx.Done():
		}
	}()
	go guestclock.Follow(ctx, p.sb.Agent(), every, p.log)
}

// enterCgroup moves the shim, before it starts QEMU and virtiofsd, into the host cgroup the first container's
// spec names (CRI: the sandbox's, below the pod's cgroup), so that the host accounts the VM to the pod. The
// processes in vm go too, with what they started: a spare's QEMU and virtiofsd, started before it knew its pod.
func (p *Pod) enterCgroup(first *First, vm ...int) error {
	spec := first.Bundle.Spec
	if spec.Linux == nil || spec.Linux.CgroupsPath == "" {
		return nil
	}
	g, err := hostcgroup.Enter(spec.Linux.CgroupsPath, os.Getpid(), vm...)
	if err != nil {
		return fmt.Errorf("container %s: %w", first.ID, err)
	}
	p.cgroupMu.Lock()
	p.cgroup = g
	p.cgroupMu.Unlock()
	return nil
}

// hostOOMKills is how many of the pod's host processes the kernel's OOM killer took in the pod's host cgroup since
// they entered it; false without one. A spare's QEMU and virtiofsd are moved there out of the VM's own cgroup
// (qemu.Machine counts those), so their kills count here.
func (p *Pod) hostOOMKills() (uint64, bool) {
	p.cgroupMu.Lock()
	g := p.cgroup
	p.cgroupMu.Unlock()
	if g == nil {
		return 0, false
	}
	n, err := g.OOMKills()
	if err != nil {
		p.log.WithError(err).Warn("whether the host's OOM killer ended the VM is not known")
		return 0, false
	}
	return n, true
}

// watchVM reports a VM that ends while the pod is open (QEMU killed, a guest panic) as the loss of every
// process in it, so that no task waits for an exit that cannot come. So it does an agent connection that ends
// while the VM runs on (hungUp: the agent hung up, or the guest stopped taking requests): no request reaches
// the guest any more, not even a SIGKILL, so the VM is stopped too.
func (p *Pod) watchVM(m vm.Machine, hungUp <-chan struct{}) {
	select {
	case <-m.Exited():
	case <-hungUp:
		// A VM that ends closes the connection first; its exit, which says why, follows within moments.
		t := time.NewTimer(vmExitAfterHangup)
		defer t.Stop()
		select {
		case <-m.Exited():
		case <-t.C:
			if p.isClosing() {
				return
			}
			err := fmt.Errorf("the agent connection of VM %s closed while the VM ran (the agent hung up, or the guest took no request within agent.request_timeout); the VM is stopped", p.id)
			p.log.WithError(err).Error("the pod's guest stopped answering while the pod was open")
			p.ctrs.Lost(err)
			p.stopVM(m)
			return
		case <-p.closing:
			return
		}
	case <-p.closing:
		return
	}
	if p.isClosing() {
		return
	}
	err := m.ExitError()
	if err == nil {
		err = errors.New("the guest powered off")
	}
	if n, ok := p.hostOOMKills(); ok && n > 0 && !errors.Is(err, vm.ErrOOMKilled) {
		err = fmt.Errorf("%w (%d processes killed in the pod's host cgroup): %w", vm.ErrOOMKilled, n, err)
	}
	err = fmt.Errorf("VM %s ended: %w", p.id, err)
	// Logged here whether or not the end of the agent connection told the containers first: this is why.
	p.log.WithError(err).Error("the pod's VM ended while the pod was open")
	p.ctrs.Lost(err)
}

// vmExitAfterHangup is how long watchVM waits, after the agent connection ended, for the VM's exit before it
// takes the guest for one that stopped answering.
const vmExitAfterHangup = 2 * time.Second

// isClosing says whether Close has begun.
func (p *Pod) isClosing() bool {
	select {
	case <-p.closing:
		return true
	default:
		return false
	}
}

// stopUnresponsive stops the VM of a guest whose agent no longer answers (container.Options.Abandon): QMP quit,
// then SIGKILL after hypervisor.stop_timeout. Close releases the rest as usual.
func (p *Pod) stopUnresponsive(error) { p.stopVM(p.sb.Machine()) }

func (p *Pod) stopVM(m vm.Machine) {
	if err := m.Stop(context.Background()); err != nil {
		p.log.WithError(err).Warn("stop the VM of an unresponsive guest")
	}
}

// ID is the pod's VM id.
func (p *Pod) ID() string { return p.id }

// StateDir is the directory holding the pod's VM state and share (runtime.state_dir).
func (p *Pod) StateDir() string { return p.cfg.Runtime.StateDir }

// ShareDir is the pod's shared directory on the host.
func (p *Pod) ShareDir() string { return ShareDir(p.cfg.Runtime.StateDir, p.id) }

// CgroupPath is the host cgroup the pod's host processes are in, "" when they stayed in the shim's.
func (p *Pod) CgroupPath() string {
	if p.cgroup == nil {
		return ""
	}
	return p.cgroup.Path()
}

// Config is the configuration the pod was booted with.
func (p *Pod) Config() config.Config { return p.cfg }

// Machine is the pod's VM.
func (p *Pod) Machine() vm.Machine { return p.sb.Machine() }

// GuestInfo asks the agent to describe the guest.
func (p *Pod) GuestInfo(ctx context.Context) (*agentv1.GuestInfo, error) { return p.sb.GuestInfo(ctx) }

// Containers is the registry of the pod's containers.
func (p *Pod) Containers() *container.Manager { return p.ctrs }

// Close ends the pod: the containers' waits end, the guest is shut down (its containers die with it), the VM
// stops and the share is unmounted and removed. It is safe to call more than once.
func (p *Pod) Close(ctx context.Context) error {
	p.closeOnce.Do(func() { close(p.closing) })
	p.clockMu.Lock()
	if p.stopClock != nil {
		p.stopClock()
	}
	p.clockMu.Unlock()
	var errs []error
	if p.ctrs != nil {
		_ = p.ctrs.Close()
	}
	if p.forward != nil {
		// Before the guest goes: no stream is then cut half-way by the VM's end, and none starts.
		_ = p.forward.Close()
		if refused, failed := p.forward.Refused(), p.forward.Failed(); refused > 0 || failed > 0 {
			p.log.WithFields(logrus.Fields{"refused": refused, "failed": failed}).Info("port-forward connections not carried")
		}
	}
	start := time.Now()
	if p.sb != nil {
		if err := p.sb.Stop(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	vmStopped := time.Now()
	if err := p.endStandIns(); err != nil {
		errs = append(errs, err)
	}
	if err := p.closeNetwork(); err != nil {
		errs = append(errs, err)
	}
	netClosed := time.Now()
	if err := p.share.Close(); err != nil {
		errs = append(errs, err)
	}
	shareClosed := time.Now()
	if p.cgroup != nil {
		if err := p.cgroup.Leave(); err != nil {
			errs = append(errs, err)
		}
	}
	p.log.WithFields(logrus.Fields{"vm": vmStopped.Sub(start), "network": netClosed.Sub(vmStopped),
		"share": shareClosed.Sub(netClosed), "cgroup": time.Since(shareClosed)}).Debug("pod stopped")
	if len(errs) > 0 {
		return fmt.Errorf("stop pod %s: %w", p.id, errors.Join(errs...))
	}
	return nil
}
