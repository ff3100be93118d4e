package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/child"
	"github.com/kiln-runtime/kiln/vm/idlease"
)

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
	qemuPath, cred, err := m.preflight()
	if err != nil {
		// Nothing was set up.
		close(m.exited)
		close(m.cleaned)
		return fmt.Errorf("start vm %s: %w", m.cfg.ID, err)
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
	// Under mu, which Start holds.
	m.inputs = m.cfg.templateInputs
	if m.inputs == "" {
		// A booted guest uses no agent image, and a relative QEMU path would name another file once the process
		// changed its directory (a spare becoming a task's shim). Not worth failing a start for: FilesChanged then
		// cannot tell.
		c := m.cfg
		if c.role == roleCold {
			c.AgentImage = ""
		}
		if abs, err := filepath.Abs(qemuPath); err == nil {
			m.inputs, _ = templateInputs(guestFiles(c, abs)...)
		}
	}

	var vs vsockBackend
	switch {
	case m.cfg.role == roleTemplate:
		// A template has no vsock device: it could not be saved with one.
		vs = noVsock{}
	case m.cfg.Vsock == VsockKernel:
		vs, err = openKernelVsock(KernelVsockDevice)
	case m.cfg.Vsock == VsockVhostUser || m.cfg.Vsock == "":
		vs, err = startVhostUserVsock(runCtx, m.paths.vhostUserVsock, m.paths.vsock, m.guestRAM(), m.log)
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
	if m.cfg.role == roleClone {
		fds.incomingState = 3 + len(files)
		files = append(files, m.incoming)
		fds.memory = 3 + len(files)
		files = append(files, m.cloneRAM.file)
	}
	kernel, bootCopy := m.kernelFile()
	if kernel != nil {
		defer kernel.Close()
		fds.kernel = 3 + len(files)
		files = append(files, kernel)
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
		Confine:    m.confinement(),
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

// preflight finds QEMU and the guest's assets, checks that QEMU's user reaches them, and creates the VM's state
// directory: everything start does before it has something to release.
func (m *Machine) preflight() (qemuPath string, cred *syscall.Credential, err error) {
	qemuPath, err = exec.LookPath(m.cfg.QEMU)
	if err != nil {
		return "", nil, fmt.Errorf("QEMU binary %q not found: install it (apt-get install qemu-system-x86) or set hypervisor.path: %w", m.cfg.QEMU, err)
	}
	// A configuration from ConfigFrom names files config.ResolveAssets found a moment ago; others are looked at.
	if !m.assetsFound {
		for _, f := range []struct{ what, path string }{{"guest kernel", m.cfg.Kernel}, {"guest initrd", m.cfg.Initrd}} {
			if _, err := os.Stat(f.path); err != nil {
				return "", nil, fmt.Errorf("%s %s: %w (run `make image`, or set hypervisor.kernel/initrd)", f.what, f.path, err)
			}
		}
	}
	if err := os.MkdirAll(m.cfg.StateRoot, 0o711); err != nil {
		return "", nil, fmt.Errorf("create state root %s: %w", m.cfg.StateRoot, err)
	}
	c, lease, err := leaseUser(m.cfg)
	if err != nil {
		return "", nil, err
	}
	defer func() {
		if err != nil {
			m.releaseUser(lease)
		}
	}()
	cred = qemuCredential(c)
	if err = checkReachable(c, cred); err != nil {
		return "", nil, err
	}
	if err = os.Mkdir(m.paths.dir, 0o700); err != nil {
		return "", nil, fmt.Errorf("create state dir: %w", err)
	}
	m.lease = lease
	return qemuPath, cred, nil
}

// releaseUser gives back the id QEMU ran as, once no process runs with it.
func (m *Machine) releaseUser(l *idlease.Lease) {
	if err := l.Release(); err != nil {
		m.log.WithError(err).Warn("release QEMU's user")
	}
}

// kernelFile is the kernel QEMU is given by descriptor, nil for the kernel's own file: a clone's stub (kernelStub),
// or for a booting VM a memfd copy (bootKernel), which is also returned as bootCopy. QEMU keeps the descriptor it
// inherits open, and with it a copy's pages; it has read them by the time it answers qmp_capabilities (dialQMP),
// which its main loop serves only once machine init, which loads the kernel, is done. Only memory is at stake when
// neither can be made.
func (m *Machine) kernelFile() (kernel, bootCopy *os.File) {
	max := m.cfg.initrdMax()
	if m.cfg.role == roleClone {
		stub, err := kernelStub(m.cfg.Kernel, max)
		if err != nil {
			m.log.WithError(err).Warn("the clone's QEMU is given the whole kernel")
		}
		return stub, nil
	}
	if max <= 0 {
		return nil, nil
	}
	k, err := bootKernel(m.cfg.Kernel, max)
	if err != nil {
		// The initrd's first copy stays where QEMU put it.
		m.log.WithError(err).Warn("the VM boots its kernel as it is")
		return nil, nil
	}
	return k, k
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
	// QEMU was reaped: nothing runs as its user any more.
	m.releaseUser(m.lease)
	m.lease = nil

	close(m.cleaned)
}
