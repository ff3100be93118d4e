// Package qemu is the QEMU microvm backend of vm.Machine: it builds QEMU's command line, runs QEMU as a child
// that dies with its parent, drives it over QMP, serves its vsock device over vhost-user, runs virtiofsd for its
// shared directory (vm/virtiofs), and removes every host resource (sockets, state directory) however the VM
// ends. It knows nothing of the agent's API or containers.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/child"
	"github.com/kiln-runtime/kiln/vm/guestmem"
	"github.com/kiln-runtime/kiln/vm/virtiofs"
)

// StateDirEnv names the VM's state directory in QEMU's environment.
const StateDirEnv = "KILN_VM_STATE_DIR"

type paths struct {
	dir            string
	qmp            string
	vhostUserVsock string
	vsock          string
	virtiofs       string
	console        string
	owner          string
	cgroups        string
}

func pathsFor(root, id string) paths {
	dir := filepath.Join(root, id)
	return paths{
		dir:            dir,
		qmp:            filepath.Join(dir, "qmp.sock"),
		vhostUserVsock: filepath.Join(dir, "vhost-user-vsock.sock"),
		vsock:          filepath.Join(dir, "vsock.sock"),
		virtiofs:       filepath.Join(dir, "virtiofs.sock"),
		console:        filepath.Join(dir, "console.log"),
		owner:          filepath.Join(dir, "owner"),
		cgroups:        filepath.Join(dir, cgroupsFile),
	}
}

// Machine is a QEMU microVM. Create it with New.
type Machine struct {
	cfg   Config
	paths paths
	log   *logrus.Entry
	// assetsFound: Kernel and Initrd are Config.resolvedAssets, so Start need not look for them again.
	assetsFound bool

	mu      sync.Mutex
	proc    *child.Process // QEMU; nil until it started
	qmp     *qmpConn
	console *console
	vsock   vsockBackend
	fs      *virtiofs.Daemon
	cgroup  *child.Cgroup
	cancel  context.CancelFunc
	started bool
	// restored says the VM came from a template (it has hot-plug); plugged counts the NIC indexes PlugNets used,
	// plugging says a PlugNets is under way.
	restored bool
	// template is the one a restored VM came from, and cold the configuration that boots it instead (BootInstead).
	template template
	cold     Config
	plugged  int
	plugging bool
	// rehearsal is the state of the root port RehearseNIC borrows.
	rehearsal rehearsalPort
	// fsErr is why the VM was ended for its virtiofsd's death, nil otherwise.
	fsErr error
	// oomKills counts the VM's processes the kernel's OOM killer killed: written by reap before exited closes.
	oomKills uint64
	// cloneRAM is a clone's copy of its template's RAM while it starts.
	cloneRAM *cloneRAM
	// incoming is a clone's template state while it starts.
	incoming *os.File

	// guestMiB is the guest memory its cgroup holds (Config.MemoryMiB until GrowGuestMemory), hostExtra the host
	// memory its cgroup holds beyond the VM's own (AllowHostMemory); under memMu, which may be taken under mu, not
	// around it.
	memMu     sync.Mutex
	guestMiB  int
	hostExtra int64
	// grant bounds the guest RAM Kiln's vsock device reaches to what the guest was given (guestMiB), for a VM
	// whose RAM is larger; nil otherwise.
	grant *guestmem.Grant

	exited  chan struct{} // closed when QEMU has exited (or Start failed before running it)
	cleaned chan struct{} // closed when host resources are released
}

var _ vm.Machine = (*Machine)(nil)

// New validates the configuration; nothing is started until Start.
func New(cfg Config) (*Machine, error) {
	if cfg.ID == "" {
		return nil, errors.New("vm id is empty")
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	if cfg.VCPUs == 0 {
		cfg.VCPUs = 1
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 256
	}
	cfg.MaxMemoryMiB = max(cfg.MaxMemoryMiB, cfg.MemoryMiB)
	cfg.MaxVCPUs = max(cfg.MaxVCPUs, cfg.VCPUs)
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 3 * time.Second
	}
	if cfg.MemoryOverheadMiB == 0 {
		cfg.MemoryOverheadMiB = config.DefaultMemoryOverheadMiB
	}
	assetsFound := cfg.Kernel != "" && cfg.resolvedAssets.Kernel == cfg.Kernel && cfg.resolvedAssets.Initrd == cfg.Initrd
	// QEMU runs in the VM's state directory, so relative paths would point there.
	for _, p := range []*string{&cfg.Kernel, &cfg.Initrd, &cfg.AgentImage, &cfg.MemoryFile, &cfg.StateRoot} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return nil, fmt.Errorf("vm %s: %w", cfg.ID, err)
		}
		*p = abs
	}
	if cfg.AgentImage != "" {
		st, err := os.Stat(cfg.AgentImage)
		if err != nil {
			return nil, fmt.Errorf("vm %s: agent image: %w (run `make image`)", cfg.ID, err)
		}
		if !st.Mode().IsRegular() || st.Size() == 0 {
			return nil, fmt.Errorf("vm %s: agent image %s is not a file system image (run `make image`)", cfg.ID, cfg.AgentImage)
		}
		cfg.agentImageSize = st.Size()
	}
	if cfg.Accel == accel.TCG && cfg.TSCkHz == 0 {
		khz, err := hostTSCkHz()
		if err != nil {
			cfg.Log.WithError(err).Warn("host TSC frequency unknown; the guest calibrates its clock itself and may hang on a busy host")
		}
		cfg.TSCkHz = khz
	}
	m := &Machine{
		cfg:         cfg,
		paths:       pathsFor(cfg.StateRoot, cfg.ID),
		log:         cfg.Log.WithField("vm", cfg.ID),
		assetsFound: assetsFound,
		guestMiB:    cfg.MemoryMiB,
		exited:      make(chan struct{}),
		cleaned:     make(chan struct{}),
	}
	if cfg.MaxMemoryMiB > cfg.MemoryMiB {
		// Its RAM lies below 4 GiB and from 4 GiB up, or from 1 TiB up (QEMU moves it there on AMD hosts when it
		// would reach the HyperTransport hole): a bit for each block below 1 TiB + its RAM, about 1 KiB.
		m.grant = guestmem.NewGrant(uint64(cfg.MemoryMiB)<<20, config.MemoryBlockMiB<<20, 1<<40+uint64(cfg.ramMiB())<<20)
	}
	return m, nil
}

// ID implements vm.Machine.
func (m *Machine) ID() string { return m.cfg.ID }

// StateDir is the VM's state directory.
func (m *Machine) StateDir() string { return m.paths.dir }

// ConsolePath is the guest console log file.
func (m *Machine) ConsolePath() string { return m.paths.console }

// Exited implements vm.Machine.
func (m *Machine) Exited() <-chan struct{} { return m.exited }

// PID is QEMU's process id, 0 before Start.
func (m *Machine) PID() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.proc == nil {
		return 0
	}
	return m.proc.PID()
}

// Processes are the VM's host processes: QEMU and, with a shared directory, virtiofsd (each may have started
// more below it). Empty before Start.
func (m *Machine) Processes() []int {
	m.mu.Lock()
	defer m.mu.Unlock()
	var pids []int
	if m.proc != nil {
		pids = append(pids, m.proc.PID())
	}
	if m.fs != nil {
		pids = append(pids, m.fs.PID())
	}
	return pids
}

// Foreground puts the VM's cgroup back beside the others for CPU, for a VM started in the background
// (Config.Background).
func (m *Machine) Foreground() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.foreground()
}

// foreground is Foreground for a caller that holds mu or has the machine to itself (cleanup).
func (m *Machine) foreground() error {
	if m.cgroup == nil || !m.cfg.Background {
		return nil
	}
	if err := m.cgroup.Background(false); err != nil {
		return fmt.Errorf("vm %s: %w", m.cfg.ID, err)
	}
	return nil
}

// Start implements vm.Machine.
func (m *Machine) Start(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.started {
		return fmt.Errorf("start vm %s: already started", m.cfg.ID)
	}
	m.started = true
	if m.cfg.TemplateDir == "" || m.cfg.role != roleCold {
		return m.start(ctx)
	}
	why := cloneUnsupported(m.cfg)
	if why == "" {
		why = TemplateDirUnusable(m.cfg.TemplateDir, Statfs)
	}
	if why != "" {
		// Not a fault: a VM of this shape, or this host, has no fast path.
		m.log.WithField("reason", why).Debug("VM boots without a template")
		return m.start(ctx)
	}
	start := time.Now()
	err := m.startFromTemplate(ctx)
	if err == nil {
		m.log.WithField("took", time.Since(start).Round(time.Millisecond)).Debug("VM restored from its template")
		return nil
	}
	if ctx.Err() != nil {
		// Whether or not QEMU had started, nothing runs now: a Stop or Wait after this returns at once.
		m.reset()
		close(m.exited)
		close(m.cleaned)
		return fmt.Errorf("start vm %s from its template: %w", m.cfg.ID, err)
	}
	m.log.WithError(err).Warn("starting the VM from its template failed; booting it")
	m.reset()
	return m.start(ctx)
}

// reset makes a Machine whose start failed (and released everything) startable again.
func (m *Machine) reset() {
	m.proc, m.qmp, m.console, m.vsock, m.fs, m.cgroup, m.cancel = nil, nil, nil, nil, nil, nil, nil
	m.fsErr, m.oomKills = nil, 0
	m.exited = make(chan struct{})
	m.cleaned = make(chan struct{})
}

// start starts QEMU for the machine's role; on error everything is released and exited and cleaned are closed.
func (m *Machine) start(ctx context.Context) (retErr error) {
	qemuPath, err := exec.LookPath(m.cfg.QEMU)
	if err != nil {
		close(m.exited)
		close(m.cleaned)
		return fmt.Errorf("start vm %s: QEMU binary %q not found: install it (apt-get install qemu-system-x86) or set hypervisor.path: %w", m.cfg.ID, m.cfg.QEMU, err)
	}
	// A configuration from ConfigFrom names files config.ResolveAssets found a moment ago; others are looked at.
	if !m.assetsFound {
		for _, f := range []struct{ what, path string }{{"guest kernel", m.cfg.Kernel}, {"guest initrd", m.cfg.Initrd}} {
			if _, err := os.Stat(f.path); err != nil {
				close(m.exited)
				close(m.cleaned)
				return fmt.Errorf("start vm %s: %s %s: %w (run `make image`, or set hypervisor.kernel/initrd)", m.cfg.ID, f.what, f.path, err)
			}
		}
	}
	cred := qemuCredential(m.cfg)
	if err := checkReachable(m.cfg, cred); err != nil {
		close(m.exited)
		close(m.cleaned)
		return fmt.Errorf("start vm %s: %w", m.cfg.ID, err)
	}
	if err := os.MkdirAll(m.cfg.StateRoot, 0o711); err != nil {
		close(m.exited)
		close(m.cleaned)
		return fmt.Errorf("start vm %s: create state root %s: %w", m.cfg.ID, m.cfg.StateRoot, err)
	}
	if err := os.Mkdir(m.paths.dir, 0o700); err != nil {
		close(m.exited)
		close(m.cleaned)
		return fmt.Errorf("start vm %s: create state dir: %w", m.cfg.ID, err)
	}
	// From here on every failure must release what was set up; cleanup() is idempotent.
	runCtx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	defer func() {
		if retErr != nil {
			if m.proc != nil {
				m.proc.Kill()
				<-m.exited
			} else {
				close(m.exited)
				m.cleanup()
			}
			<-m.cleaned
		}
	}()

	if err := os.WriteFile(m.paths.owner, []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return fmt.Errorf("start vm %s: write owner file: %w", m.cfg.ID, err)
	}

	var vs vsockBackend
	switch {
	case m.cfg.role == roleTemplate:
		// A template has no vsock device: it could not be saved with one.
		vs = noVsock{}
	case m.cfg.Vsock == VsockKernel:
		vs, err = openKernelVsock(KernelVsockDevice)
	case m.cfg.Vsock == VsockVhostUser || m.cfg.Vsock == "":
		vs, err = startVhostUserVsock(runCtx, m.paths.vhostUserVsock, m.paths.vsock, m.grant, m.log)
	default:
		err = fmt.Errorf("unknown vsock mode %q", m.cfg.Vsock)
	}
	if err != nil {
		return fmt.Errorf("start vm %s: %w", m.cfg.ID, err)
	}
	m.vsock = vs
	defer vs.started()

	if m.cfg.Cgroup {
		cg, err := child.NewCgroup("kiln-vm-"+m.cfg.ID, m.ownMemory())
		if err != nil {
			return fmt.Errorf("start vm %s: %w", m.cfg.ID, err)
		}
		m.cgroup = cg
		if m.cfg.Background {
			if err := cg.Background(true); err != nil {
				m.log.WithError(err).Warn("the VM's cgroup stays at the usual CPU weight")
			}
		}
		// Whoever cleans up after a dead owner (Sweep, a shim's delete) finds the cgroup here.
		if err := os.WriteFile(m.paths.cgroups, []byte(strings.Join(cg.Dirs(), "\n")+"\n"), 0o600); err != nil {
			return fmt.Errorf("start vm %s: record its cgroup: %w", m.cfg.ID, err)
		}
	}

	// QEMU opens no socket by path: QMP's listener and the vhost-user connections are passed in, in this order
	// (then the vsock backend's descriptors, then the taps).
	qmpListener, err := listenFile(m.paths.qmp)
	if err != nil {
		return fmt.Errorf("start vm %s: QMP socket: %w", m.cfg.ID, err)
	}
	defer qmpListener.Close()
	files := []*os.File{qmpListener}
	fds := fdLayout{qmp: 3}
	if m.cfg.role == roleClone {
		fds.vsockChardev = 3 + len(files)
	} else {
		fds.vsockArgs = vs.qemuArgs(3 + len(files))
	}
	files = append(files, vs.files()...)

	var fsConn *os.File
	if m.cfg.SharedDir != "" {
		if err := m.startVirtiofsd(ctx); err != nil {
			return fmt.Errorf("start vm %s: %w", m.cfg.ID, err)
		}
		fsConn, err = dialFile(m.paths.virtiofs)
		if err != nil {
			return fmt.Errorf("start vm %s: connect to virtiofsd for QEMU: %w", m.cfg.ID, err)
		}
		// Once QEMU holds it, Kiln's copy goes, so virtiofsd sees QEMU's exit.
		defer fsConn.Close()
		fds.virtiofs = 3 + len(files)
		files = append(files, fsConn)
	}
	fds.firstNet = 3 + len(files)
	files = append(files, netFiles(m.cfg.Nets)...)
	if m.cfg.role != roleCold && m.cfg.AgentImage != "" {
		img, err := openAgentImage(m.cfg)
		if err != nil {
			return fmt.Errorf("start vm %s: %w", m.cfg.ID, err)
		}
		defer img.Close()
		fds.agentImage = 3 + len(files)
		files = append(files, img)
	}
	// bootCopy is the kernel QEMU boots from a memfd (bootKernel): QEMU keeps the descriptor it inherits open,
	// and with it the copy's pages. It has read them by the time it answers qmp_capabilities (dialQMP), which its
	// main loop serves only once machine init, which loads the kernel, is done.
	var bootCopy *os.File
	if m.cfg.role == roleClone {
		fds.incomingState = 3 + len(files)
		files = append(files, m.incoming)
		fds.memory = 3 + len(files)
		files = append(files, m.cloneRAM.file)
		stub, err := kernelStub(m.cfg.Kernel, m.cfg.initrdMax())
		if err != nil {
			// Only memory is at stake: the clone gets the whole kernel.
			m.log.WithError(err).Warn("the clone's QEMU is given the whole kernel")
		}
		if stub != nil {
			defer stub.Close()
			fds.kernel = 3 + len(files)
			files = append(files, stub)
		}
	} else if max := m.cfg.initrdMax(); max > 0 {
		k, err := bootKernel(m.cfg.Kernel, max)
		if err != nil {
			// Only memory is at stake: the initrd's first copy stays where QEMU put it.
			m.log.WithError(err).Warn("the VM boots its kernel as it is")
		}
		if k != nil {
			defer k.Close()
			fds.kernel = 3 + len(files)
			files = append(files, k)
			bootCopy = k
		}
	}

	cons, err := newConsole(m.paths.console, m.cfg.ConsoleToLog, m.log)
	if err != nil {
		return fmt.Errorf("start vm %s: %w", m.cfg.ID, err)
	}
	m.console = cons

	// vm/child gives QEMU a parent-death signal: it must not outlive Kiln, even when Kiln is killed with SIGKILL.
	dir := m.paths.dir
	if cred != nil {
		// The state directory is Kiln's alone (0700); QEMU needs no directory.
		dir = "/"
	}
	proc, err := child.Start(child.Config{
		Name: "QEMU",
		Path: qemuPath,
		Args: args(m.cfg, fds),
		Dir:  dir,
		// QEMU's command line names no path of the VM's any more: its environment does, so that a dead shim's
		// cleanup (and an operator) can tell which VM a QEMU is.
		Env:        []string{StateDirEnv + "=" + m.paths.dir},
		ExtraFiles: files,
		Credential: cred,
		Cgroup:     m.cgroup,
		// Under TCG QEMU's vCPUs are CPU-bound emulators, which need not preempt others when they wake: with more
		// of them than host cores, batch scheduling saves the cost of the switches (vm/child's startBatch).
		// Under KVM a vCPU mostly waits in the guest's idle loop, and its wakeups carry the guest's latency.
		Batch: m.cfg.Accel == accel.TCG,
		// Under TCG QEMU asks for huge pages for its translated code and its ROMs and ACPI tables: a 2 MiB page
		// for a few KiB of ACPI tables, and translation cache backed in 2 MiB steps ahead of the code written
		// into it, 3.5 to 3.8 MB per idle pod in make bench. Under KVM there is no translated code, and a host
		// that gives guest RAM huge pages (shmem_enabled) must keep them.
		NoHugePages: m.cfg.Accel == accel.TCG,
		Stdout:      cons.writer(),
		Quit:        m.quit,
		StopTimeout: m.cfg.StopTimeout,
		Log:         m.log,
	})
	// QEMU holds its copies now (or failed to start): Kiln's go, so QEMU's exit closes the QMP listener and
	// ends the vhost-user sessions.
	qmpListener.Close()
	if fsConn != nil {
		fsConn.Close()
	}
	vs.started()
	if err != nil {
		return fmt.Errorf("start vm %s: %w", m.cfg.ID, err)
	}
	m.proc = proc
	if m.cfg.Hold != nil {
		m.cfg.Hold(proc)
	}
	go m.reap()

	q, err := dialQMP(ctx, m.paths.qmp, m.exited)
	if err != nil {
		return fmt.Errorf("start vm %s: %w%s", m.cfg.ID, err, m.Diagnostics())
	}
	if bootCopy != nil {
		if err := bootCopy.Truncate(0); err != nil {
			m.log.WithError(err).Debug("free the kernel's copy")
		}
	}
	m.qmp = q
	if m.cfg.role == roleClone {
		if err := m.restore(ctx, fds.incomingState); err != nil {
			return fmt.Errorf("start vm %s: restore from template: %w%s", m.cfg.ID, err, m.Diagnostics())
		}
	}
	return nil
}

// reap waits for QEMU to exit, then releases everything.
func (m *Machine) reap() {
	<-m.proc.Exited()
	m.countOOMKills()
	close(m.exited)
	m.cleanup()
}

// countOOMKills notes, before anyone learns that QEMU exited, whether the kernel's OOM killer ended the VM: QEMU or
// virtiofsd killed in the VM's cgroup (for its limit, the pod's, or the host's want of memory). It takes no lock: a
// failed Start holds m.mu while it waits for the exit. The cgroup was set before reap started, and oomKills is
// read only once exited is closed.
func (m *Machine) countOOMKills() {
	if m.cgroup == nil {
		return
	}
	n, err := m.cgroup.OOMKills()
	if err != nil {
		m.log.WithError(err).Warn("whether the host's OOM killer ended the VM is not known")
		return
	}
	m.oomKills = n
}

func (m *Machine) cleanup() {
	// A guest that ended on its own (a spare's pod closed) leaves virtiofsd to stop in its cgroup: at the usual
	// weight, so that it is gone before the cgroup's removal gives up.
	if err := m.foreground(); err != nil {
		m.log.WithError(err).Warn("the VM's cgroup stays in the background")
	}
	if m.cancel != nil {
		m.cancel()
	}
	if m.qmp != nil {
		m.qmp.close()
	}
	if m.vsock != nil {
		if err := m.vsock.close(); err != nil {
			m.log.WithError(err).Warn("close vsock device")
		}
	}
	if m.fs != nil {
		// QEMU is gone, so virtiofsd has no client left and nothing to flush.
		if err := m.fs.Stop(context.Background()); err != nil {
			m.log.WithError(err).Warn("stop virtiofsd")
		}
	}
	if m.console != nil {
		m.console.close()
	}
	if m.cgroup != nil {
		// QEMU and virtiofsd have been reaped.
		if err := m.cgroup.Remove(); err != nil {
			m.log.WithError(err).Warn("remove vm cgroup")
		}
	}
	if err := os.RemoveAll(m.paths.dir); err != nil {
		m.log.WithError(err).Warn("remove vm state dir")
	}

	close(m.cleaned)
}
