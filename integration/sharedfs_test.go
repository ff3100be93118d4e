package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/runtime/share"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// A guest sees what the host shares through virtiofsd: a container rootfs added before boot, a bind added after
// boot, a plain host mount made under the share after boot, and no longer a bind once it was removed.
func TestSharedFSReachesGuest(t *testing.T) {
	requireVM(t)
	kernel, initrd := buildInitrd(t, buildStatic(t, "./integration/sharedfsguest"))

	host := t.TempDir()
	rootfs := filepath.Join(host, "rootfs")
	vol := filepath.Join(host, "vol")
	for _, d := range []string{filepath.Join(rootfs, "etc"), filepath.Join(rootfs, "mnt"), vol} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeSharedFile(t, filepath.Join(rootfs, "etc", "hostname"), "before boot")
	writeSharedFile(t, filepath.Join(vol, "data"), "bound after boot")

	s, err := share.New(filepath.Join(t.TempDir(), "share"))
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the machine, so it runs after the machine's cleanup stopped QEMU and virtiofsd.
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close share: %v", err)
		}
		if _, err := os.Stat(s.Dir()); !os.IsNotExist(err) {
			t.Errorf("share directory left behind: %v", err)
		}
		if pids := sharedFSProcesses("source=" + s.ExportDir()); len(pids) > 0 {
			t.Errorf("leftover virtiofsd processes %v", pids)
		}
	})
	ctx := context.Background()
	rel, err := s.AddRootfs(ctx, "c1", rootfs, false)
	if err != nil {
		t.Fatal(err)
	}

	m := testMachine(t, kernel, initrd, func(c *qemu.Config) { withShare(c, s) })
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}

	waitGuestSees(t, m, rel+"/etc/hostname", "before boot", true)

	guestPath, err := s.AddBind(ctx, "c2", vol, true)
	if err != nil {
		t.Fatal(err)
	}
	bindRel := strings.TrimPrefix(guestPath, share.GuestDir+"/") + "/data"
	waitGuestSees(t, m, bindRel, "bound after boot", true)

	// Any mount under the share's private tree, not only Share's own, propagates.
	late := filepath.Join(s.Dir(), "mounts", "c1", "rootfs", "mnt")
	if err := unix.Mount("tmpfs", late, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	writeSharedFile(t, filepath.Join(late, "late"), "host mount after boot")
	waitGuestSees(t, m, rel+"/mnt/late", "host mount after boot", true)

	if err := s.RemoveContainer(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	waitGuestSees(t, m, bindRel, "bound after boot", false)
	if err := m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// waitGuestSees waits until the guest's latest report (see integration/sharedfsguest) lists, or no longer lists,
// the file at rel with content. With cache=auto the guest may trust a cached directory for a moment after the
// host changed it, hence the polling.
func waitGuestSees(t *testing.T, m *qemu.Machine, rel, content string, present bool) {
	t.Helper()
	line := fmt.Sprintf("SHAREDFS FILE %s %q", rel, content)
	deadline := time.Now().Add(60 * time.Second)
	var report []string
	for time.Now().Before(deadline) {
		select {
		case <-m.Exited():
			t.Fatalf("VM exited: %v", m.ExitError())
		default:
		}
		b, err := os.ReadFile(m.ConsolePath())
		if err != nil {
			t.Fatal(err)
		}
		report = lastReport(string(b))
		if slices.Contains(report, line) == present {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("guest never reported %q present=%v; last report:\n%s%s", line, present, strings.Join(report, "\n"), m.Diagnostics())
}

// lastReport is the last complete report on the console.
func lastReport(console string) []string {
	lines := strings.Split(strings.ReplaceAll(console, "\r", ""), "\n")
	end := -1
	for i := len(lines) - 1; i >= 0; i-- {
		switch {
		case lines[i] == "SHAREDFS END" && end < 0:
			end = i
		case lines[i] == "SHAREDFS BEGIN" && end >= 0:
			return lines[i+1 : end]
		case strings.HasPrefix(lines[i], "SHAREDFS ERROR"):
			return lines[i : i+1]
		}
	}
	return nil
}

func writeSharedFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// sharedFSProcesses lists the pids whose command line contains s.
func sharedFSProcesses(s string) []string {
	var pids []string
	matches, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range matches {
		b, err := os.ReadFile(f)
		if err == nil && bytes.Contains(b, []byte(s)) {
			pids = append(pids, filepath.Base(filepath.Dir(f)))
		}
	}
	return pids
}

// withShare exports sh to the guest of the machine c describes.
func withShare(c *qemu.Config, sh *share.Share) { c.SharedDir = sh.ExportDir() }

// A VM whose shared file system cannot start, or whose QEMU fails after virtiofsd started, fails with a clear
// error and leaves no virtiofsd, socket or state behind (testMachine checks the state root).
func TestSharedFSStartFailures(t *testing.T) {
	images := requireVM(t)
	tests := []struct {
		name    string
		mutate  func(c *qemu.Config, exportDir string)
		wantErr string
	}{
		{"virtiofsd missing", func(c *qemu.Config, d string) { c.SharedDir = d; c.Virtiofsd.Binary = "/nonexistent/virtiofsd" },
			"apt-get install qemu-system-common"},
		{"shared directory missing", func(c *qemu.Config, d string) { c.SharedDir = d + "-missing" }, "shared directory"},
		{"QEMU fails after virtiofsd started", func(c *qemu.Config, d string) { c.SharedDir = d; c.QEMU = "/bin/false" }, "QEMU"},
		// virtiofsd refuses an option: its own failure is the one reported, with what it wrote.
		{"virtiofsd exits early", func(c *qemu.Config, d string) {
			c.SharedDir = d
			c.Virtiofsd.ExtraArgs = []string{"-o", "no_such_option"}
		}, "virtiofsd stderr"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := share.New(filepath.Join(t.TempDir(), "share"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("close share: %v", err)
				}
			})
			m := testMachine(t, filepath.Join(images, "vmlinuz"), filepath.Join(images, "initrd.img"),
				func(c *qemu.Config) { tt.mutate(c, s.ExportDir()) })
			err = m.Start(context.Background())
			if err == nil {
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not mention %q", err, tt.wantErr)
			}
			if pids := sharedFSProcesses("source=" + s.ExportDir()); len(pids) > 0 {
				t.Errorf("leftover virtiofsd processes %v", pids)
			}
		})
	}
}
