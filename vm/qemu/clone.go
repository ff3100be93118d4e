package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/virtiofs"
)

// errTemplateState is a clone's QEMU refusing its template's saved state: the template is of no use.
var errTemplateState = errors.New("QEMU could not load the template's state")

// errTemplateGuestDied is a clone whose guest died the moment it resumed, ending QEMU (which does not reboot) before
// the shim had its answer to cont: the template is of no use either, as when its guest dies a moment later
// (BootInstead).
var errTemplateGuestDied = errors.New("the guest restored from the template died as it resumed")

// exitGrace is how long a QMP error waits for QEMU's exit, which tells a refused state from other failures.
const exitGrace = time.Second

// restoreTimeout bounds loading a template's device state into a clone (some tens of milliseconds).
const restoreTimeout = 30 * time.Second

// cloneUnsupported says why c cannot start from a template, "" when it can.
func cloneUnsupported(c Config) string {
	switch {
	case c.SharedDir == "":
		// A restored agent waits for its shared directory's device before it serves containers.
		return "a VM without a shared directory is not restored from a template"
	case c.Vsock == VsockKernel:
		return "the kernel's vhost-vsock is not hot-plugged yet (vsock.mode)"
	case len(c.Nets) > maxCloneNets:
		return fmt.Sprintf("%d network interfaces, a template's clone takes at most %d", len(c.Nets), maxCloneNets)
	}
	return ""
}

// startFromTemplate starts the VM as a clone of its template (built first if there is none): a copy of the
// template's RAM, its device state loaded into a new QEMU, then its vsock and virtio-fs devices and NICs
// hot-plugged. It records the template and the configuration before the restore, for BootInstead. On error
// nothing of the clone is left and the Machine may be started again.
func (m *Machine) startFromTemplate(ctx context.Context) error {
	qemuPath, err := lookPath(m.cfg.QEMU)
	if err != nil {
		return err
	}
	tpl, err := ensureTemplate(ctx, m.cfg, qemuPath)
	if err != nil {
		return err
	}
	// Which template this clone copies: another may take its place by the time this one is found wanting.
	if tpl.id, err = dirID(tpl.dir); err != nil {
		return fmt.Errorf("template %s: %w", tpl.dir, err)
	}
	state, err := os.Open(tpl.state())
	if err != nil {
		return fmt.Errorf("open template state: %w", err)
	}
	defer state.Close()
	// Each clone has RAM of its own, a memfd nobody can shrink: the vhost-user back ends write into the memory
	// they are given, the template must never change, and Kiln's vsock back end maps the RAM too (a file QEMU
	// could truncate under it would kill the shim with SIGBUS). It is filled while virtiofsd and QEMU start.
	ram, err := startCloneRAM(tpl.ram(), "kiln-clone-"+m.cfg.ID)
	if err != nil {
		return fmt.Errorf("copy template RAM: %w", err)
	}
	// QEMU holds its own reference once started; the RAM goes with the last of QEMU and the back ends.
	defer ram.close()
	cold := m.cfg
	m.cfg.role = roleClone
	m.cfg.templateInputs = tpl.inputs
	m.cloneRAM = ram
	m.incoming = state
	defer func() { m.cloneRAM, m.incoming = nil, nil }()
	if err := m.start(ctx); err != nil {
		switch {
		case errors.Is(err, errTemplateState):
			discardTemplate(tpl, m.log, "QEMU refused its state")
		case errors.Is(err, errTemplateGuestDied):
			discardTemplate(tpl, m.log, "a guest restored from it died as it resumed")
		}
		m.cfg = cold
		return err
	}
	m.restored, m.template, m.cold = true, tpl, cold
	return nil
}

// FilesChanged returns an error naming a file the guest came from (the QEMU binary, the kernel, the initrd, the
// agent image, as its template had them for a clone) that was rebuilt, upgraded or removed since: a VM kept
// running, a spare's, would serve a task the old guest. nil when none was, or when the VM could not read them as
// it started.
func (m *Machine) FilesChanged() error {
	m.mu.Lock()
	inputs := m.inputs
	m.mu.Unlock()
	if inputs == "" {
		return nil
	}
	return changedInput(inputs)
}

// Restored says whether the VM was restored from its template rather than booted.
func (m *Machine) Restored() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.restored
}

// BootInstead stops a VM restored from its template whose guest did not come up (it died, or its agent never
// answered), removes the template so that the next VM builds it again, and boots the VM instead: a template that
// restores into a broken guest costs a cold boot, never the VM.
func (m *Machine) BootInstead(ctx context.Context, why error) error {
	m.mu.Lock()
	restored, tpl := m.restored, m.template
	m.mu.Unlock()
	if !restored {
		return fmt.Errorf("boot vm %s instead: it was not restored from a template", m.cfg.ID)
	}
	if err := m.Stop(ctx); err != nil {
		return fmt.Errorf("boot vm %s instead: %w", m.cfg.ID, err)
	}
	discardTemplate(tpl, m.log, fmt.Sprintf("a guest restored from it did not come up (%v)", why))
	m.mu.Lock()
	defer m.mu.Unlock()
	m.cfg, m.restored, m.template, m.plugged, m.rehearsal = m.cold, false, template{}, 0, rehearsalFree
	m.reset()
	return m.start(ctx)
}

// restore loads the template's state into the clone's QEMU, hot-plugs the devices and lets the guest run.
func (m *Machine) restore(ctx context.Context, stateFD int) error {
	ctx, cancel := context.WithTimeout(ctx, restoreTimeout)
	defer cancel()
	q := m.qmp
	// QEMU reads guest RAM from here on (a device's state refers to its rings there).
	waitStart := time.Now()
	n, err := m.cloneRAM.wait(ctx)
	if err != nil {
		return fmt.Errorf("copy template RAM: %w", err)
	}
	loadStart := time.Now()
	m.log.WithFields(logrus.Fields{"bytes": n, "took": m.cloneRAM.took.Round(time.Microsecond),
		"waited": loadStart.Sub(waitStart).Round(time.Microsecond)}).Debug("template RAM copied")
	if err := q.execute(ctx, "migrate-set-capabilities", ignoreShared, nil); err != nil {
		return err
	}
	if err := q.execute(ctx, "migrate-incoming", map[string]any{"uri": fmt.Sprintf("fd:%d", stateFD)}, nil); err != nil {
		return m.exitedAs(err, errTemplateState)
	}
	for {
		var st struct {
			Status string `json:"status"`
		}
		if err := q.execute(ctx, "query-status", nil, &st); err != nil {
			return m.exitedAs(err, errTemplateState)
		}
		if st.Status == "paused" {
			break
		}
		if st.Status != "inmigrate" {
			return fmt.Errorf("restored guest is %q, want paused", st.Status)
		}
		select {
		case <-m.exited:
			return errTemplateState
		case <-ctx.Done():
			return fmt.Errorf("load the template's state: %w", ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
	plugStart := time.Now()
	for _, dev := range hotplugDevices(m.cfg) {
		if err := q.execute(ctx, "device_add", dev, nil); err != nil {
			return fmt.Errorf("hot-plug %s: %w", dev["id"], err)
		}
	}
	if err := q.execute(ctx, "cont", nil, nil); err != nil {
		return m.exitedAs(err, errTemplateGuestDied)
	}
	m.log.WithFields(logrus.Fields{"load": plugStart.Sub(loadStart).Round(time.Microsecond),
		"hotplug": time.Since(plugStart).Round(time.Microsecond)}).Debug("VM restored")
	return nil
}

// exitedAs is err, a QMP failure during a restore, as cause when QEMU exits meanwhile: it exits when it refuses the
// state (its monitor goes with it: errTemplateState), and when the guest dies as cont resumes it
// (errTemplateGuestDied).
func (m *Machine) exitedAs(err, cause error) error {
	select {
	case <-m.exited:
	case <-time.After(exitGrace):
		return err
	}
	return fmt.Errorf("%w (%v)", cause, err)
}

// discardTemplate removes a template its clones cannot use, for the reason why, so that the next VM builds it
// again. Clones started from it hold their own copies and descriptors. A template t names by identity (t.id) that
// another replaced meanwhile (discarded and built again, by a VM that found it wanting first) is left alone.
func discardTemplate(t template, log *logrus.Entry, why string) {
	if t.id != (fileID{}) {
		if now, err := dirID(t.dir); err != nil || now != t.id {
			log.WithFields(logrus.Fields{"template": t.dir, "reason": why}).Info("a template of no use was replaced already")
			return
		}
	}
	trash := fmt.Sprintf("%s.discarded-%d", t.dir, os.Getpid())
	err := os.Rename(t.dir, trash)
	if err == nil {
		err = os.RemoveAll(trash)
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		log.WithError(err).WithField("reason", why).Warn("remove a template of no use")
		return
	}
	log.WithFields(logrus.Fields{"template": t.dir, "reason": why}).Warn("removed a template of no use; the next VM builds it again")
}

// hotplugDevices are the devices a clone gets once restored, each on its root port (q35Devices).
func hotplugDevices(c Config) []map[string]any {
	devs := []map[string]any{{"driver": "vhost-user-vsock-pci", "chardev": "vsock", "bus": "rp0", "id": "vsock0"}}
	if c.SharedDir != "" {
		devs = append(devs, map[string]any{"driver": "vhost-user-fs-pci", "chardev": "fs", "tag": virtiofs.Tag, "bus": "rp1", "id": "fs0"})
	}
	for i, n := range c.Nets {
		devs = append(devs, nicDevice(i, n))
	}
	return devs
}

// nicDevice is a clone's i-th NIC, on its root port, backed by netdev net<i>. It has no option ROM: QEMU would
// read iPXE's (efi-virtio.rom, 249 KB) into memory of its own for every NIC, for a firmware that never runs
// again in a restored guest, and the guest would map it at the device's hot-plug.
func nicDevice(i int, n Net) map[string]any {
	d := map[string]any{"driver": "virtio-net-pci", "netdev": fmt.Sprintf("net%d", i), "mac": n.MAC.String(),
		"bus": fmt.Sprintf("rp%d", 2+i), "id": fmt.Sprintf("nic%d", i), "romfile": ""}
	if n.MTU > 0 {
		d["host_mtu"] = n.MTU
	}
	return d
}

// PlugNets hot-plugs network devices into a running VM restored from a template (a spare's, taken by a pod with
// a network), after the NICs it has: each tap's descriptor goes to QEMU over QMP (getfd), then its back end and
// its device on the next root port. Only a template's clones have hot-plug. The Machine's lock is not held across
// the QMP commands: a QEMU that stops answering them holds PlugNets up to the command's bound, but not Stop.
func (m *Machine) PlugNets(ctx context.Context, nets []Net) error {
	q, have, err := m.beginPlug(len(nets))
	if err != nil {
		return fmt.Errorf("hot-plug NICs into vm %s: %w", m.cfg.ID, err)
	}
	// A NIC index is used up once its descriptor went to QEMU, whatever fails after: QEMU keeps the name, and a
	// back end added stays.
	used := 0
	defer func() { m.endPlug(used) }()
	for i, n := range nets {
		idx := have + i
		name := fmt.Sprintf("net%d", idx)
		used++
		if err := q.executeWithFile(ctx, "getfd", map[string]any{"fdname": name}, n.Tap); err != nil {
			return fmt.Errorf("hot-plug NIC %s into vm %s: %w", n.MAC, m.cfg.ID, err)
		}
		if err := q.execute(ctx, "netdev_add", map[string]any{"type": "tap", "id": name, "fd": name, "vhost": false}, nil); err != nil {
			return fmt.Errorf("hot-plug NIC %s into vm %s: %w", n.MAC, m.cfg.ID, err)
		}
		if err := q.execute(ctx, "device_add", nicDevice(idx, n), nil); err != nil {
			return fmt.Errorf("hot-plug NIC %s into vm %s: %w", n.MAC, m.cfg.ID, err)
		}
	}
	return nil
}

// beginPlug reserves n NIC root ports for PlugNets, and returns the QMP connection and the index of the first
// NIC to plug. Another PlugNets or a rehearsal meanwhile is refused.
func (m *Machine) beginPlug(n int) (*qmpConn, int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.hotplugLocked(); err != nil {
		return nil, 0, err
	}
	switch {
	case m.rehearsal == rehearsing:
		return nil, 0, errors.New("a NIC rehearsal holds its last root port")
	case m.plugging:
		return nil, 0, errors.New("NICs are being hot-plugged already")
	}
	have, ports := len(m.cfg.Nets)+m.plugged, maxCloneNets
	if m.rehearsal == rehearsalStuck {
		ports--
	}
	if have+n > ports {
		return nil, 0, fmt.Errorf("%d NICs asked for: it has %d, and %d root ports for NICs", n, have, ports)
	}
	m.plugging = true
	return m.qmp, have, nil
}

// endPlug ends PlugNets, which used up used NIC indexes.
func (m *Machine) endPlug(used int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.plugged += used
	m.plugging = false
}

// cloneBackends are a clone's device back ends, on its command line (they are no migrated state); the devices
// themselves come by hot-plug once the state is loaded, which then waits for it (-incoming defer).
func cloneBackends(c Config, fds fdLayout) []string {
	a := []string{"-chardev", fmt.Sprintf("socket,id=vsock,fd=%d", fds.vsockChardev)}
	if c.SharedDir != "" {
		a = append(a, "-chardev", fmt.Sprintf("socket,id=fs,fd=%d", fds.virtiofs))
	}
	for i := range c.Nets {
		a = append(a, "-netdev", fmt.Sprintf("tap,id=net%d,fd=%d,vhost=off", i, fds.firstNet+i))
	}
	return append(a, "-incoming", "defer")
}

// cloneRAM is a clone's guest RAM: a memfd of its template's RAM size that a goroutine fills with the template's
// data while QEMU starts. QEMU may map it at once: it reads guest RAM only when the state loads, after wait.
type cloneRAM struct {
	file *os.File
	done chan struct{}
	// Set before done closes:
	copied int64
	took   time.Duration
	err    error
}

// startCloneRAM creates a memfd (named name) of the file src's size and starts copying src's data extents
// (SEEK_DATA/SEEK_HOLE) into it, then sealing it against any change of size; the rest stays unallocated zeros.
func startCloneRAM(src, name string) (_ *cloneRAM, retErr error) {
	in, err := os.Open(src)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			in.Close()
		}
	}()
	st, err := in.Stat()
	if err != nil {
		return nil, err
	}
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("create guest RAM memfd: %w", err)
	}
	out := os.NewFile(uintptr(fd), name)
	// QEMU checks the size when it maps the file, so that is set before QEMU starts.
	if err := out.Truncate(st.Size()); err != nil {
		out.Close()
		return nil, err
	}
	r := &cloneRAM{file: out, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		defer in.Close()
		start := time.Now()
		r.copied, r.err = fillSealed(in, out, st.Size())
		r.took = time.Since(start)
	}()
	return r, nil
}

// wait blocks until the RAM is filled and sealed: the bytes copied, or why the RAM is unusable.
func (r *cloneRAM) wait(ctx context.Context) (int64, error) {
	select {
	case <-r.done:
		return r.copied, r.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// close lets the copy finish and closes Kiln's descriptor of the RAM.
func (r *cloneRAM) close() {
	<-r.done
	r.file.Close()
}

// fillSealed copies in's data extents into out, which has in's size, then seals out as QEMU seals its own
// memfds (seal=on), which Kiln's vsock back end requires. It returns the bytes copied.
func fillSealed(in, out *os.File, size int64) (int64, error) {
	copied, err := copyExtents(in, out, size)
	if err != nil {
		return copied, err
	}
	if _, err := unix.FcntlInt(out.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		return copied, fmt.Errorf("seal guest RAM memfd: %w", err)
	}
	return copied, nil
}

// copyExtents copies in's data extents (SEEK_DATA/SEEK_HOLE) below size into out at the same offsets; out's
// other bytes are left as they are. It returns the bytes copied.
func copyExtents(in, out *os.File, size int64) (copied int64, _ error) {
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return copied, fmt.Errorf("find data in %s: %w", in.Name(), err)
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return copied, fmt.Errorf("find a hole in %s: %w", in.Name(), err)
		}
		n, err := copyRange(in, out, data, hole-data)
		copied += n
		if err != nil {
			return copied, err
		}
		off = hole
	}
	return copied, nil
}

// copyRange copies n bytes at off from in to out at the same offset, with copy_file_range where the file
// systems allow it and read/write otherwise.
func copyRange(in, out *os.File, off, n int64) (int64, error) {
	var done int64
	for done < n {
		roff, woff := off+done, off+done
		c, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(n-done), 0)
		if err != nil || c == 0 {
			m, err := io.Copy(io.NewOffsetWriter(out, off+done), io.NewSectionReader(in, off+done, n-done))
			return done + m, err
		}
		done += int64(c)
	}
	return done, nil
}

// TemplateDirUnusable says why templates cannot be kept in dir, "" when they can: a template's guest RAM is a file
// there, which its QEMU runs on while the template is built, and anywhere but tmpfs the kernel would write it out
// to disk; and no one but root may be able to change what it holds (trustedDir). A directory not made yet is
// judged by its nearest existing parent. statfs returns a path's file system type (Statfs).
func TemplateDirUnusable(dir string, statfs func(path string) (int64, error)) string {
	p := dir
	t, err := statfs(p)
	for errors.Is(err, os.ErrNotExist) && p != filepath.Dir(p) {
		p = filepath.Dir(p)
		t, err = statfs(p)
	}
	if err != nil {
		return fmt.Sprintf("hypervisor.template_dir %s: %v", dir, err)
	}
	if t != unix.TMPFS_MAGIC {
		return fmt.Sprintf("hypervisor.template_dir %s is not on tmpfs (a template's guest RAM is a file there)", dir)
	}
	if err := trustedDir(dir); err != nil {
		return fmt.Sprintf("hypervisor.template_dir: %v", err)
	}
	return ""
}

// Statfs is the file system type (statfs f_type) of path.
func Statfs(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, &os.PathError{Op: "statfs", Path: path, Err: err}
	}
	return st.Type, nil
}
