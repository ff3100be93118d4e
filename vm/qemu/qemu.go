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
	"path/filepath"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/child"
	"github.com/kiln-runtime/kiln/vm/guestmem"
	"github.com/kiln-runtime/kiln/vm/idlease"
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
	// lease is the id QEMU runs as under Config.Users, released by cleanup.
	lease *idlease.Lease
	// restored says the VM came from a template (it has hot-plug); plugged counts the NIC indexes PlugNets used,
	// plugging says a PlugNets is under way.
	restored bool
	// template is the one a restored VM came from, and cold the configuration that boots it instead (BootInstead).
	template template
	cold     Config
	plugged  int
	plugging bool
	// inputs are the files the guest came from as it started (templateInputs): a clone's template's, a booted
	// guest's own; "" when they could not be read (FilesChanged).
	inputs string
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
