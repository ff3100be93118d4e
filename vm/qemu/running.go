package qemu

// What a started VM offers: how it ended, its diagnostics, stopping, pausing and resuming it over QMP, and the
// connections into it.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/kiln-runtime/kiln/vm"
	"github.com/kiln-runtime/kiln/vm/child"
)

// ExitError describes how QEMU ended, with its stderr and the console's last lines.
func (m *Machine) ExitError() error {
	select {
	case <-m.exited:
	default:
		return nil
	}
	if m.proc == nil {
		return fmt.Errorf("QEMU exited%s", m.Diagnostics())
	}
	m.mu.Lock()
	fsErr, oomKills := m.fsErr, m.oomKills
	limit := int64(0)
	if m.cgroup != nil {
		limit = m.cgroup.Limit()
	}
	m.mu.Unlock()
	err := m.proc.ExitError()
	if fsErr != nil {
		err = fmt.Errorf("%w; then %w", fsErr, err)
	}
	if oomKills > 0 {
		err = fmt.Errorf("%w (%d of its processes killed; the VM's cgroup's memory limit is %d MiB, a pod's or the host's may be lower): %w",
			vm.ErrOOMKilled, oomKills, limit>>20, err)
	}
	return fmt.Errorf("%w%s", err, m.Diagnostics())
}

// Diagnostics implements vm.Machine.
func (m *Machine) Diagnostics() string {
	var b bytes.Buffer
	if m.fs != nil {
		b.WriteString(m.fs.Diagnostics())
	}
	if m.proc != nil {
		b.WriteString(m.proc.Diagnostics())
	}
	if m.console != nil {
		if s := m.console.tail(); len(s) > 0 {
			fmt.Fprintf(&b, "\nlast guest console lines:\n%s", s)
		}
	}
	b.WriteString(m.guestDevices())
	return b.String()
}

// Wait implements vm.Machine.
func (m *Machine) Wait(ctx context.Context) error {
	// A VM already released is not an error, however late the caller asks.
	select {
	case <-m.cleaned:
		return nil
	default:
	}
	select {
	case <-m.cleaned:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stop implements vm.Machine: QMP quit, then SIGKILL after StopTimeout or when ctx ends.
func (m *Machine) Stop(ctx context.Context) error {
	m.mu.Lock()
	started, proc := m.started, m.proc
	m.mu.Unlock()
	if !started {
		return nil
	}
	// A VM in the background would shut down, and its processes exit, only on CPU nothing else wants: under load
	// that outlasts the stop's timeouts and the removal of its cgroup.
	if err := m.Foreground(); err != nil {
		m.log.WithError(err).Warn("stop the VM at the usual CPU weight")
	}
	if proc != nil {
		proc.Stop(ctx)
	}
	<-m.cleaned
	return nil
}

// quit asks QEMU to end over QMP: the polite first step of Stop (vm/child calls it as Config.Quit).
func (m *Machine) quit(ctx context.Context) error {
	m.mu.Lock()
	q := m.qmp
	m.mu.Unlock()
	if q == nil {
		return errors.New("no QMP connection")
	}
	return q.execute(ctx, "quit", nil, nil)
}

// Pause implements vm.Machine.
func (m *Machine) Pause(ctx context.Context) error {
	return m.qmpCommand(ctx, "stop", nil, nil)
}

// Resume implements vm.Machine.
func (m *Machine) Resume(ctx context.Context) error {
	return m.qmpCommand(ctx, "cont", nil, nil)
}

// qmpCommand runs one QMP command on the running VM; result, when not nil, receives its "return" value.
func (m *Machine) qmpCommand(ctx context.Context, cmd string, arguments, result any) error {
	m.mu.Lock()
	q := m.qmp
	m.mu.Unlock()
	if q == nil {
		return fmt.Errorf("%s vm %s: not running", cmd, m.cfg.ID)
	}
	if err := q.execute(ctx, cmd, arguments, result); err != nil {
		return fmt.Errorf("%s vm %s: %w", cmd, m.cfg.ID, err)
	}
	return nil
}

// DialVsock implements vm.Machine.
func (m *Machine) DialVsock(ctx context.Context, port uint32) (net.Conn, error) {
	select {
	case <-m.exited:
		return nil, fmt.Errorf("dial vsock port %d of vm %s: %w", port, m.cfg.ID, m.ExitError())
	default:
	}
	c, err := m.vsock.dial(ctx, port)
	if err != nil {
		return nil, fmt.Errorf("dial vsock port %d of vm %s: %w", port, m.cfg.ID, err)
	}
	return c, nil
}

// ListenVsock accepts the guest's connections to host port port, while the VM runs, with Kiln's own vsock device;
// with the kernel's vhost-vsock it fails with errdefs.ErrNotImplemented (the host's vsock ports are shared by all
// its VMs).
func (m *Machine) ListenVsock(port uint32) (net.Listener, error) {
	select {
	case <-m.exited:
		return nil, fmt.Errorf("listen on vsock port %d of vm %s: %w", port, m.cfg.ID, m.ExitError())
	default:
	}
	l, err := m.vsock.listen(port)
	if err != nil {
		return nil, fmt.Errorf("listen on vsock port %d of vm %s: %w", port, m.cfg.ID, err)
	}
	return l, nil
}

// VsockPath is the hybrid vsock Unix socket: guest connections to host port P go to VsockPath()+"_P". It is
// empty in kernel vhost-vsock mode, where they go to host AF_VSOCK listeners instead.
func (m *Machine) VsockPath() string {
	if m.cfg.Vsock == VsockKernel {
		return ""
	}
	return m.paths.vsock
}

// CgroupPath is the VM's cgroup directory (the v1 memory hierarchy's), empty without Config.Cgroup.
func (m *Machine) CgroupPath() string {
	if m.cgroup == nil {
		return ""
	}
	return m.cgroup.Path()
}

// AllowHostMemory sets the memory limit of the VM's cgroup to the VM's own (guest memory and overhead) plus extra
// bytes: host memory its programs hold for the guest beyond its RAM, such as the pages of a host tmpfs the guest
// writes through virtio-fs, which the host charges to virtiofsd. Nothing to do without Config.Cgroup.
func (m *Machine) AllowHostMemory(extra int64) error {
	if extra < 0 {
		return fmt.Errorf("vm %s: allow %d bytes of host memory: want none or more", m.cfg.ID, extra)
	}
	cg := m.vmCgroup()
	m.memMu.Lock()
	defer m.memMu.Unlock()
	if err := m.setCgroupLimit(cg, m.guestMiB, extra); err != nil {
		return err
	}
	m.hostExtra = extra
	return nil
}

// GrowGuestMemory makes room for the guest's memory to grow to mib MiB: the VM's cgroup holds it, and Kiln's vsock
// device reaches it, from now on.
// The guest adds it itself (its agent's AddMemory), next. It refuses more than Config.MaxMemoryMiB, and keeps the
// room as it is for no more than it has.
func (m *Machine) GrowGuestMemory(mib int) error {
	cg := m.vmCgroup()
	m.memMu.Lock()
	defer m.memMu.Unlock()
	if mib <= m.guestMiB {
		return nil
	}
	if mib > m.cfg.MaxMemoryMiB {
		return fmt.Errorf("vm %s: grow the guest's memory to %d MiB: it has RAM for %d MiB", m.cfg.ID, mib, m.cfg.MaxMemoryMiB)
	}
	if err := m.setCgroupLimit(cg, mib, m.hostExtra); err != nil {
		return err
	}
	m.guestMiB = mib
	if m.grant != nil {
		m.grant.Raise(uint64(mib) << 20)
	}
	return nil
}

// vmCgroup is the VM's cgroup, nil without one; taken before memMu (Start holds mu while it takes memMu).
func (m *Machine) vmCgroup() *child.Cgroup {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cgroup
}

// setCgroupLimit sets cg's memory limit for guestMiB of guest memory and extra bytes; under memMu.
func (m *Machine) setCgroupLimit(cg *child.Cgroup, guestMiB int, extra int64) error {
	if cg == nil {
		return nil
	}
	if err := cg.SetLimit(m.cgroupLimit(guestMiB) + extra); err != nil {
		return fmt.Errorf("vm %s: %w", m.cfg.ID, err)
	}
	return nil
}

// cgroupLimit is the memory limit of the VM's cgroup for the VM itself with guestMiB of guest memory: that and
// what QEMU and virtiofsd use beyond it.
func (m *Machine) cgroupLimit(guestMiB int) int64 {
	return int64(guestMiB+m.cfg.MemoryOverheadMiB) << 20
}

// ownMemory is the memory limit of the VM's cgroup for the VM itself, as its guest's memory is now.
func (m *Machine) ownMemory() int64 {
	m.memMu.Lock()
	defer m.memMu.Unlock()
	return m.cgroupLimit(m.guestMiB)
}

// listenFile creates a listening Unix socket at path and returns its descriptor; the file stays when the
// descriptor is closed (the state directory goes as a whole).
func listenFile(path string) (*os.File, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	defer l.Close()
	return l.File()
}

// dialFile connects to the Unix socket at path and returns the connection's descriptor.
func dialFile(path string) (*os.File, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.File()
}
