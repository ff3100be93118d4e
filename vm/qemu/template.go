package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// role is what a Machine's QEMU is started for.
type role int

const (
	// roleCold boots a microvm with all its devices.
	roleCold role = iota
	// roleTemplate boots a q35 guest without vhost-user devices, to be saved as a template.
	roleTemplate
	// roleClone restores a q35 guest from a template and hot-plugs its devices.
	roleClone
)

// The PCIe root ports of a template's machine, the same in every clone: the vsock device, the virtio-fs device,
// then one NIC each (a pod of several networks, as Multus gives, has up to four on the fast path; each port adds
// about 3 ms to a clone's start under TCG). QEMU 7.2's q35 hot-plugs on them through ACPI by default.
var rootPortAddrs = []string{"0x2", "0x3", "0x5", "0x6", "0x8", "0x9"}

// maxCloneNets is how many NICs a clone can hot-plug: one per root port left after vsock and virtio-fs.
var maxCloneNets = len(rootPortAddrs) - 2

// q35Devices are a template's devices, which its clones' command lines repeat exactly: the migration state
// describes them.
func q35Devices(c Config, fds fdLayout) []string {
	var a []string
	for i, addr := range rootPortAddrs {
		a = append(a, "-device", fmt.Sprintf("pcie-root-port,id=rp%d,chassis=%d,bus=pcie.0,addr=%s", i, i+1, addr))
	}
	if c.FreePageReporting {
		a = append(a, "-device", "virtio-balloon-pci,free-page-reporting=on,bus=pcie.0,addr=0x4")
	}
	if c.AgentImage != "" {
		// Shared and read-only: every clone maps the one file, from the host's page cache, and none can write
		// to it. Being shared, x-ignore-shared leaves it out of the saved state, as it does guest RAM.
		img := c.AgentImage
		if fds.agentImage > 0 {
			img = fmt.Sprintf("/proc/self/fd/%d", fds.agentImage)
		}
		a = append(a,
			"-object", fmt.Sprintf("memory-backend-file,id=agentimg,mem-path=%s,size=%d,share=on,readonly=on", img, c.agentImageSize),
			"-device", "virtio-pmem-pci,memdev=agentimg,id=agentimg0,bus=pcie.0,addr=0x7")
	}
	return a
}

// Template files, in a template's directory.
const (
	templateRAM        = "ram"
	templateState      = "state"
	templateInputsFile = "inputs"
)

// Bounds of a template's build: its boot (as long as any cold boot, several seconds under TCG) and its save
// (tens of milliseconds).
const (
	templateBootTimeout = 2 * time.Minute
	templateSaveTimeout = 30 * time.Second
	templateLockPoll    = 50 * time.Millisecond
	// templateInUse: a template used this recently is not removed for the bound, so that no VM's restore loses
	// its files (a restore reads them within seconds).
	templateInUse = time.Minute
)

// templateKey names the template of c's guest: a hash of everything that shapes the saved guest. The template's
// command line covers the machine, its devices, vCPUs, memory, accelerator and kernel parameters; the kernel,
// initrd (and with it the agent) and QEMU binary are identified by their file's identity (templateInputs), which
// a rebuilt or upgraded file changes. It also returns the inputs, which the template keeps (pruneTemplates).
func templateKey(c Config, qemuPath string) (key, inputs string, err error) {
	t := templateConfig(c, "template", templateRAM)
	// tsc_early_khz spares a booting guest the calibration of its clock, which a clone, resumed booted, never
	// makes; and the host's "cpu MHz" it comes from (hostTSCkHz) moves with frequency scaling, read by read.
	t.TSCkHz = 0
	inputs, err = templateInputs(guestFiles(c, qemuPath)...)
	if err != nil {
		return "", "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "kiln template v1\x00%s\x00", strings.Join(args(t, fdLayout{qmp: 3}), "\x00"))
	h.Write([]byte(inputs))
	return hex.EncodeToString(h.Sum(nil))[:32], inputs, nil
}

// guestFiles are the files c's guest comes from: the QEMU binary at qemuPath, the kernel, the initrd and the agent
// image.
func guestFiles(c Config, qemuPath string) []string {
	files := []string{qemuPath, c.Kernel, c.Initrd}
	if c.AgentImage != "" {
		files = append(files, c.AgentImage)
	}
	return files
}

// templateInputs describes files a template is built from, a line each: the path and the file's identity
// (device, inode, size, modification time).
func templateInputs(paths ...string) (string, error) {
	var b strings.Builder
	for _, p := range paths {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			return "", fmt.Errorf("identify %s for the template: %w", p, err)
		}
		b.WriteString(inputLine(p, &st))
	}
	return b.String(), nil
}

// inputLine is templateInputs' line for the file at path whose status is st.
func inputLine(path string, st *unix.Stat_t) string {
	return fmt.Sprintf("%s\x00%d:%d:%d:%d.%d\n", path, st.Dev, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec)
}

// openAgentImage opens c's agent image for QEMU, which then maps the very file its template was keyed by: one
// replaced since (by `make install`) would show a restored guest other bytes than those it cached.
func openAgentImage(c Config) (*os.File, error) {
	f, err := os.Open(c.AgentImage)
	if err != nil {
		return nil, fmt.Errorf("open agent image: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("open agent image: %w", err)
	}
	if !strings.Contains("\n"+c.templateInputs, "\n"+inputLine(c.AgentImage, &st)) {
		f.Close()
		return nil, fmt.Errorf("agent image %s changed after its template was chosen", c.AgentImage)
	}
	if st.Size != c.agentImageSize {
		f.Close()
		return nil, fmt.Errorf("agent image %s changed size after the VM was configured", c.AgentImage)
	}
	return f, nil
}

// stale reports whether a template's recorded inputs no longer describe the files at their paths: one of them
// was rebuilt, upgraded or removed, and no VM will ask for this template again.
func stale(inputs string) bool { return changedInput(inputs) != nil }

// changedInput returns an error naming the first file of inputs (templateInputs) that is not the file they
// describe any more, or nil. Inputs it cannot read count as changed.
func changedInput(inputs string) error {
	if inputs == "" || !strings.HasSuffix(inputs, "\n") {
		return errors.New("no record of the files the guest came from")
	}
	for _, line := range strings.Split(strings.TrimSuffix(inputs, "\n"), "\n") {
		path, _, ok := strings.Cut(line, "\x00")
		if !ok {
			return errors.New("no record of the files the guest came from")
		}
		now, err := templateInputs(path)
		if err != nil {
			return err
		}
		if now != line+"\n" {
			return fmt.Errorf("%s was replaced", path)
		}
	}
	return nil
}

// templateConfig is the configuration of the guest saved as c's template.
func templateConfig(c Config, id, ram string) Config {
	t := c
	t.ID = id
	t.role = roleTemplate
	t.MemoryFile = ram
	t.SharedDir = ""
	t.Nets = nil
	t.TemplateDir = ""
	t.TemplateMax = 0
	// Not held by a task's start (a spare's Hold): the task may be waiting for this very template.
	t.Hold = nil
	return t
}

// template is a saved template's directory.
type template struct {
	dir string
	// inputs are what its key was computed from (templateKey).
	inputs string
	// id is dir's identity when a clone took it; zero where no clone did (a build's own checks).
	id fileID
}

// fileID tells one file from another of the same name: its device and inode.
type fileID struct{ dev, ino uint64 }

// dirID is the identity of the file at path.
func dirID(path string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileID{}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return fileID{dev: st.Dev, ino: st.Ino}, nil
}

func (t template) ram() string   { return filepath.Join(t.dir, templateRAM) }
func (t template) state() string { return filepath.Join(t.dir, templateState) }

// used records that a VM starts from t now: the directory's modification time, which nothing else changes once
// the template is built, orders templates for pruneTemplates' bound.
func (t template) used(log logrus.FieldLogger) {
	now := time.Now()
	if err := os.Chtimes(t.dir, now, now); err != nil {
		log.WithError(err).WithField("template", t.dir).Debug("record the template's use")
	}
}

// errNoTemplate is fault's answer for a template not built yet.
var errNoTemplate = errors.New("no template")

// fault says what keeps t from serving a guest of memoryMiB: nil when it is whole, errNoTemplate when there is
// none. A damaged one (a file removed, its RAM cut short) would fail every clone, and QEMU refuses a RAM file of
// another size at its start, before a restore could name the template as the cause: it is caught here instead.
func (t template) fault(memoryMiB int) error {
	if _, err := os.Stat(t.dir); errors.Is(err, os.ErrNotExist) {
		return errNoTemplate
	}
	if _, err := os.Stat(t.state()); err != nil {
		return fmt.Errorf("template state: %w", err)
	}
	st, err := os.Stat(t.ram())
	if err != nil {
		return fmt.Errorf("template RAM: %w", err)
	}
	if want := int64(memoryMiB) << 20; st.Size() != want {
		return fmt.Errorf("template RAM of %d bytes, want the guest's %d", st.Size(), want)
	}
	return nil
}

// ensureTemplate returns c's template, building it first when there is none. One process builds a template at
// a time (a lock file beside it); others wait for it.
func ensureTemplate(ctx context.Context, c Config, qemuPath string) (template, error) {
	key, inputs, err := templateKey(c, qemuPath)
	if err != nil {
		return template{}, err
	}
	t := template{dir: filepath.Join(c.TemplateDir, key), inputs: inputs}
	if err := os.MkdirAll(c.TemplateDir, 0o711); err != nil {
		return template{}, fmt.Errorf("create template directory %s: %w", c.TemplateDir, err)
	}
	// Checked once made: someone else may have made a part of it first.
	if err := trustedDir(c.TemplateDir); err != nil {
		return template{}, fmt.Errorf("template directory: %w", err)
	}
	if t.fault(c.ramMiB()) == nil {
		t.used(c.Log)
		return t, nil
	}
	unlock, err := lockFile(ctx, t.dir+".lock")
	if err != nil {
		return template{}, err
	}
	defer unlock()
	switch err := t.fault(c.ramMiB()); {
	case err == nil:
		return t, nil
	case !errors.Is(err, errNoTemplate):
		// Its directory would keep the new one's rename from landing.
		discardTemplate(t, c.Log, err.Error())
	}
	start := time.Now()
	if err := buildTemplate(ctx, c, key, inputs, t.dir); err != nil {
		return template{}, fmt.Errorf("build template %s: %w", key, err)
	}
	c.Log.WithFields(map[string]any{"template": t.dir, "took": time.Since(start).Round(time.Millisecond)}).Info("VM template built")
	pruneTemplates(c.TemplateDir, c.TemplateMax, c.Log)
	return t, nil
}

// pruneTemplates removes from dir the templates that are stale (one of the files they were built from changed:
// a new kernel, initrd or QEMU makes new templates, and nothing will ask for the old ones again), the partial
// builds of processes that died building, the remains of discarded templates, and locks left without a template
// or build; then, beyond limit templates (0: no bound), the least recently used ones, except those used within
// templateInUse (a VM may be copying one). Entries whose lock another process holds are left alone.
func pruneTemplates(dir string, limit int, log logrus.FieldLogger) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		log.WithError(err).Warn("list templates")
		return
	}
	dirs := map[string]bool{}
	for _, e := range entries {
		if e.IsDir() {
			dirs[e.Name()] = true
		}
	}
	type kept struct {
		key  string
		used time.Time
	}
	var templates []kept
	for _, e := range entries {
		name := e.Name()
		var remove bool
		key := name
		switch {
		case !e.IsDir():
			// A lock whose template and build are gone (removed by hand, or discarded and never asked for again).
			key = strings.TrimSuffix(name, ".lock")
			remove = key != name && !dirs[key] && !dirs[key+".tmp"]
		case strings.HasSuffix(name, ".tmp"):
			key, remove = strings.TrimSuffix(name, ".tmp"), true
		case strings.Contains(name, ".discarded-"):
			key, _, _ = strings.Cut(name, ".discarded-")
			remove = true
		case isTemplateKey(name):
			b, err := os.ReadFile(filepath.Join(dir, name, templateInputsFile))
			remove = (err == nil || errors.Is(err, os.ErrNotExist)) && stale(string(b))
			if info, err := e.Info(); !remove && err == nil {
				templates = append(templates, kept{key: name, used: info.ModTime()})
			}
		}
		if !remove || !isTemplateKey(key) {
			continue
		}
		removed, err := removeTemplateEntry(dir, key, name)
		if err != nil {
			log.WithError(err).WithField("template", filepath.Join(dir, name)).Warn("remove a stale template entry")
		} else if removed {
			log.WithField("entry", filepath.Join(dir, name)).Info("removed a stale template entry")
		}
	}
	if limit <= 0 || len(templates) <= limit {
		return
	}
	slices.SortFunc(templates, func(a, b kept) int { return b.used.Compare(a.used) })
	for _, t := range templates[limit:] {
		if time.Since(t.used) < templateInUse {
			continue
		}
		removed, err := removeTemplateEntry(dir, t.key, t.key)
		if err != nil {
			log.WithError(err).WithField("template", filepath.Join(dir, t.key)).Warn("remove a least recently used template")
		} else if removed {
			log.WithFields(logrus.Fields{"template": filepath.Join(dir, t.key), "template_max": limit, "last_used": t.used}).
				Info("removed a least recently used template")
		}
	}
}

// removeTemplateEntry removes dir/name, which belongs to template key, unless another process holds key's lock.
func removeTemplateEntry(dir, key, name string) (bool, error) {
	lockPath := filepath.Join(dir, key+".lock")
	unlock, err := tryLockFile(lockPath)
	if err != nil {
		return false, err
	}
	if unlock == nil {
		return false, nil // being built or pruned by another process
	}
	defer unlock()
	p := filepath.Join(dir, name)
	if name == key+".lock" {
		return true, os.Remove(p) // lockFile's holders check that the file they locked is still there
	}
	if name == key {
		// Out of the way in one step, so that no VM copies half a template.
		trash := fmt.Sprintf("%s.discarded-%d", p, os.Getpid())
		if err := os.Rename(p, trash); err != nil {
			return false, err
		}
		p = trash
	}
	if err := os.RemoveAll(p); err != nil {
		return false, err
	}
	if name != key {
		// The key may be one a VM wants (a build that died): its lock stays the one lock file all builders open.
		return true, nil
	}
	return true, os.Remove(lockPath)
}

// isTemplateKey reports whether name has the form of a templateKey.
func isTemplateKey(name string) bool {
	if len(name) != 32 {
		return false
	}
	_, err := hex.DecodeString(name)
	return err == nil
}

// lockFile takes an exclusive lock on path (created if needed), waiting until ctx ends.
func lockFile(ctx context.Context, path string) (func(), error) {
	for {
		unlock, err := tryLockFile(path)
		if err != nil || unlock != nil {
			return unlock, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for another process building the template (%s): %w", path, ctx.Err())
		case <-time.After(templateLockPoll):
		}
	}
}

// tryLockFile takes an exclusive lock on path (created if needed) if no other process holds it: it returns the
// unlock function, or nil when the lock is held elsewhere. Pruning removes lock files while holding them, so a lock
// taken on a file no longer at path is let go and taken again on the path's file.
func tryLockFile(path string) (func(), error) {
	for {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return nil, fmt.Errorf("open template lock: %w", err)
		}
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		switch {
		case err == nil && sameFile(f, path):
			return func() { f.Close() }, nil
		case err == nil:
			f.Close() // removed meanwhile: lock the file now at path
		case errors.Is(err, unix.EWOULDBLOCK):
			f.Close()
			return nil, nil
		default:
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
	}
}

// sameFile reports whether f is the file at path.
func sameFile(f *os.File, path string) bool {
	held, err := f.Stat()
	if err != nil {
		return false
	}
	now, err := os.Stat(path)
	return err == nil && os.SameFile(held, now)
}

// lookPath resolves the QEMU binary as Start does.
func lookPath(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("QEMU binary %q not found: install it (apt-get install qemu-system-x86) or set hypervisor.path: %w", name, err)
	}
	return filepath.Abs(p)
}
