package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// TestContainers runs one container per behaviour of issue 3 in a single guest (a boot costs seconds under
// TCG). Each subtest removes its container and checks that nothing of it is left.
func TestContainers(t *testing.T) {
	v := newContainerVM(t, 512)

	t.Run("output_and_exit_status", func(t *testing.T) {
		out, errOut, status := v.output(t, "status", v.spec("sh", "-c", "echo out; echo err >&2; exit 7"))
		if out != "out\n" || errOut != "err\n" || status != 7 {
			t.Errorf("stdout %q stderr %q status %d, want \"out\\n\" \"err\\n\" 7", out, errOut, status)
		}
	})

	t.Run("user_and_groups", func(t *testing.T) {
		spec := v.spec("sh", "-c", "id; echo HOME=$HOME")
		spec.Process.User = specs.User{UID: 1234, GID: 1234, AdditionalGids: []uint32{2345}}
		out, errOut, status := v.output(t, "user", spec)
		if status != 0 {
			t.Fatalf("status %d, stderr %q", status, errOut)
		}
		for _, want := range []string{"uid=1234(kiln)", "gid=1234(kiln)", "2345(extra)", "HOME=/home/kiln"} {
			if !strings.Contains(out, want) {
				t.Errorf("output %q lacks %q", out, want)
			}
		}
		if strings.Contains(out, "3456") || strings.Contains(out, "(root)") {
			t.Errorf("output %q names a group the spec did not give", out)
		}
	})

	t.Run("no_device_nodes_on_the_share", func(t *testing.T) {
		// A guest root allowed to make a device node makes it on the guest's tmpfs, but not in the share: there
		// virtiofsd would make it on the host (it runs without CAP_MKNOD). FIFOs need no capability.
		spec := v.spec("sh", "-c", "mknod /dev/kiln-null c 1 3 && echo tmpfs=ok; "+
			"mknod /kiln-null-node c 1 3 2>/dev/null && echo share=made; mkfifo /kiln-fifo-node && echo fifo=ok; rm -f /kiln-fifo-node /kiln-null-node")
		spec.Root.Readonly = false
		caps := append(spec.Process.Capabilities.Bounding, "CAP_MKNOD")
		spec.Process.Capabilities = &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}
		spec.Linux.Resources.Devices = append(spec.Linux.Resources.Devices,
			specs.LinuxDeviceCgroup{Allow: true, Type: "c", Major: ptr(int64(1)), Minor: ptr(int64(3)), Access: "m"})
		out, errOut, status := v.output(t, "mknod", spec)
		if status != 0 || out != "tmpfs=ok\nfifo=ok\n" {
			t.Errorf("stdout %q (stderr %q, status %d), want a node on tmpfs, none in the share, and a FIFO there", out, errOut, status)
		}
	})

	t.Run("capabilities_and_no_new_privileges", func(t *testing.T) {
		// CAP_CHOWN (0), CAP_KILL (5), CAP_SYS_ADMIN (21).
		const mask = "0000000000200021"
		for _, nnp := range []bool{true, false} {
			t.Run(fmt.Sprintf("nnp=%t", nnp), func(t *testing.T) {
				spec := v.spec("cat", "/proc/self/status")
				caps := []string{"CAP_CHOWN", "CAP_KILL", "CAP_SYS_ADMIN"}
				spec.Process.Capabilities = &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}
				spec.Process.NoNewPrivileges = nnp
				out, errOut, status := v.output(t, fmt.Sprintf("caps-%t", nnp), spec)
				if status != 0 {
					t.Fatalf("status %d, stderr %q", status, errOut)
				}
				fields := statusFields(out)
				for _, k := range []string{"CapEff", "CapPrm", "CapBnd"} {
					if fields[k] != mask {
						t.Errorf("%s = %q, want %s", k, fields[k], mask)
					}
				}
				want := "0"
				if nnp {
					want = "1"
				}
				if fields["NoNewPrivs"] != want {
					t.Errorf("NoNewPrivs = %q, want %s", fields["NoNewPrivs"], want)
				}
			})
		}
	})

	t.Run("rlimit_nofile", func(t *testing.T) {
		spec := v.spec("sh", "-c", "ulimit -n; ulimit -Hn")
		spec.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 4242, Hard: 8484}}
		out, errOut, status := v.output(t, "rlimit", spec)
		if status != 0 || out != "4242\n8484\n" {
			t.Errorf("output %q status %d (stderr %q), want \"4242\\n8484\\n\"", out, status, errOut)
		}
	})

	t.Run("root_read_only", func(t *testing.T) {
		for _, ro := range []bool{true, false} {
			t.Run(fmt.Sprintf("readonly=%t", ro), func(t *testing.T) {
				spec := v.spec("sh", "-c", "cat /proc/self/mountinfo; touch /probe && echo wrote")
				spec.Root.Readonly = ro
				rootfs := ""
				if !ro {
					// A root the container may write to is its own.
					rootfs = filepath.Join(t.TempDir(), "rootfs")
					if err := copyTree(filepath.Join(v.bundle, "rootfs"), rootfs); err != nil {
						t.Fatal(err)
					}
				}
				var out, errOut bytes.Buffer
				c := v.create(t, fmt.Sprintf("root-%t", ro), spec, rootfs, stdio.IO{Stdout: &out, Stderr: &errOut})
				ctx := testCtx(t, time.Minute)
				if err := c.Start(ctx); err != nil {
					t.Fatal(err)
				}
				if _, err := c.Wait(ctx); err != nil {
					t.Fatal(err)
				}
				opts, ok := rootMountOptions(out.String())
				if !ok {
					t.Fatalf("no mount at / in mountinfo:\n%s", out.String())
				}
				if hasOption(opts, "ro") != ro {
					t.Errorf("root mount options %q, want read-only=%t", opts, ro)
				}
				wrote := strings.Contains(out.String(), "wrote")
				if wrote == ro {
					t.Errorf("touch /probe wrote=%t with a read-only=%t root (stderr %q)", wrote, ro, errOut.String())
				}
				if ro && !strings.Contains(errOut.String(), "Read-only file system") {
					t.Errorf("stderr %q does not say the root is read-only", errOut.String())
				}
				if !ro {
					if _, err := os.Stat(filepath.Join(rootfs, "probe")); err != nil {
						t.Errorf("the file the container wrote is not in its host root: %v", err)
					}
				}
			})
		}
	})

	t.Run("hostname", func(t *testing.T) {
		spec := v.spec("hostname")
		spec.Hostname = "kiln-box"
		out, _, status := v.output(t, "hostname", spec)
		if out != "kiln-box\n" || status != 0 {
			t.Errorf("hostname %q status %d, want kiln-box", out, status)
		}
	})

	t.Run("cgroup_cpu_memory_pids_limits", func(t *testing.T) {
		spec := v.spec("sh", "-c", "cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max")
		quota, period, mem, pids := int64(25000), uint64(100000), int64(64<<20), int64(42)
		spec.Linux.Resources = &specs.LinuxResources{
			CPU:    &specs.LinuxCPU{Quota: &quota, Period: &period},
			Memory: &specs.LinuxMemory{Limit: &mem},
			Pids:   &specs.LinuxPids{Limit: &pids},
		}
		out, errOut, status := v.output(t, "cgroups", spec)
		if status != 0 {
			t.Fatalf("status %d, stderr %q", status, errOut)
		}
		if want := "25000 100000\n67108864\n42\n"; out != want {
			t.Errorf("cpu.max, memory.max, pids.max = %q, want %q", out, want)
		}
	})

	t.Run("namespaces_and_mounts", func(t *testing.T) {
		out, errOut, status := v.output(t, "ns", v.spec("sh", "-c", "echo pid=$$; cat /proc/self/mountinfo"))
		if status != 0 {
			t.Fatalf("status %d, stderr %q", status, errOut)
		}
		if !strings.HasPrefix(out, "pid=1\n") {
			t.Errorf("shell is not pid 1 of its pid namespace: %q", firstLine(out))
		}
		for _, want := range []string{" /proc rw", " /dev/pts ", " /dev/mqueue ", " /sys ro", " /dev/shm "} {
			if !strings.Contains(out, want) {
				t.Errorf("mountinfo lacks %q", want)
			}
		}
	})

	t.Run("masked_and_readonly_paths", func(t *testing.T) {
		spec := v.spec("sh", "-c", "wc -c < /proc/kcore; echo x > /proc/sys/kernel/domainname && echo wrote")
		spec.Linux.MaskedPaths = []string{"/proc/kcore"}
		spec.Linux.ReadonlyPaths = []string{"/proc/sys"}
		spec.Process.Capabilities = &specs.LinuxCapabilities{
			Bounding: []string{"CAP_SYS_ADMIN"}, Effective: []string{"CAP_SYS_ADMIN"}, Permitted: []string{"CAP_SYS_ADMIN"},
		}
		out, errOut, _ := v.output(t, "masked", spec)
		if firstLine(out) != "0" {
			t.Errorf("masked /proc/kcore has %q bytes, want 0 (stderr %q)", firstLine(out), errOut)
		}
		if strings.Contains(out, "wrote") || !strings.Contains(errOut, "Read-only file system") {
			t.Errorf("write to read-only /proc/sys: stdout %q stderr %q", out, errOut)
		}
	})

	t.Run("seccomp_denies_syscall", func(t *testing.T) {
		enosys := uint(syscall.ENOSYS)
		for _, deny := range []bool{true, false} {
			t.Run(fmt.Sprintf("deny=%t", deny), func(t *testing.T) {
				spec := v.spec("sh", "-c", "mkdir /tmp/d && echo made")
				spec.Mounts = append(spec.Mounts, specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev"}})
				if deny {
					spec.Linux.Seccomp = &specs.LinuxSeccomp{
						DefaultAction: specs.ActAllow,
						Architectures: []specs.Arch{specs.ArchX86_64},
						Syscalls: []specs.LinuxSyscall{{
							Names: []string{"mkdir", "mkdirat"}, Action: specs.ActErrno, ErrnoRet: &enosys,
						}},
					}
				}
				out, errOut, status := v.output(t, fmt.Sprintf("seccomp-%t", deny), spec)
				if deny {
					if status == 0 || strings.Contains(out, "made") || !strings.Contains(errOut, "Function not implemented") {
						t.Errorf("mkdir under seccomp: status %d stdout %q stderr %q, want ENOSYS", status, out, errOut)
					}
				} else if status != 0 || out != "made\n" {
					t.Errorf("mkdir without seccomp: status %d stdout %q stderr %q", status, out, errOut)
				}
			})
		}
	})

	t.Run("exec_into_running_container", func(t *testing.T) { testExec(t, v) })
	t.Run("sigterm_to_trapping_shell", func(t *testing.T) { testSigterm(t, v) })
	t.Run("oom_kill_under_memory_limit", func(t *testing.T) { testOOM(t, v) })
	t.Run("stdout_100MiB", func(t *testing.T) { testBigStdout(t, v) })
	t.Run("stdin_10MiB_round_trip", func(t *testing.T) { testBigStdin(t, v) })
	t.Run("tty_with_resize", func(t *testing.T) { testTTY(t, v) })
	t.Run("host_mount_after_start", func(t *testing.T) { testLateMount(t, v) })
	t.Run("bind_escaping_through_symlink_rejected", func(t *testing.T) {
		link := filepath.Join(v.bundle, "escape")
		if err := os.Symlink("/etc", link); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(link)
		spec := v.spec("true")
		spec.Mounts = append(spec.Mounts, specs.Mount{Destination: "/mnt", Type: "bind", Source: "escape/", Options: []string{"rbind", "ro"}})
		b := &bundle.Bundle{Dir: v.bundle, Spec: spec, Rootfs: filepath.Join(v.bundle, "rootfs")}
		_, err := v.p.CreateContainer(testCtx(t, time.Minute), pod.ContainerOptions{ID: "escape", Bundle: b})
		if err == nil {
			t.Fatal("a bind source escaping the bundle through a symlink was shared")
		}
		if !strings.Contains(err.Error(), "escape") {
			t.Errorf("error %v does not say the source escapes", err)
		}
		if _, err := os.Lstat(filepath.Join(v.p.ShareDir(), "mounts", "escape")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the failed create left its directory in the share (%v)", err)
		}
	})
}

// statusFields parses /proc/<pid>/status.
func statusFields(s string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// rootMountOptions finds the mount at / in mountinfo and returns its per-mount options.
func rootMountOptions(mountinfo string) (string, bool) {
	opts, found := "", false
	for _, line := range strings.Split(mountinfo, "\n") {
		f := strings.Fields(line)
		// id parent major:minor root mountpoint options ...; the last mount at / is the one in effect.
		if len(f) > 5 && f[4] == "/" {
			opts, found = f[5], true
		}
	}
	return opts, found
}

func hasOption(opts, want string) bool {
	for _, o := range strings.Split(opts, ",") {
		if o == want {
			return true
		}
	}
	return false
}

func copyTree(src, dst string) error {
	out, err := exec.Command("cp", "-a", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cp -a %s %s: %v: %s", src, dst, err, out)
	}
	return nil
}

// hashWriter counts and hashes what is written to it.
type hashWriter struct {
	h interface {
		io.Writer
		Sum([]byte) []byte
	}
	n int64
}

func newHashWriter() *hashWriter { return &hashWriter{h: sha256.New()} }

func (w *hashWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	return w.h.Write(p)
}

func (w *hashWriter) sum() string { return hex.EncodeToString(w.h.Sum(nil)) }

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return strings.TrimSpace(line)
}

// A container's files stay in the guest's page cache across opens (shared_fs.cache "auto"), so a process that
// runs or reads a file again is not served from the host again, yet a change the host makes in place, keeping
// the file's size, reaches a process that keeps reading it within a second or so: the guest revalidates after
// a second and drops what it cached once the modification time changed. The reader opens the file by its path
// and lists no directory, so only the file's own revalidation can show the change.
func TestHostChangeReachesCachedFile(t *testing.T) {
	requireVM(t)
	v := newContainerVM(t, 256)
	probe := filepath.Join(v.bundle, "rootfs", "etc", "kiln-cache-probe")
	if err := os.WriteFile(probe, []byte("first"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := newLineWatcher()
	c := v.create(t, "reader", v.spec("sh", "-c", "while :; do cat /etc/kiln-cache-probe; echo; sleep 0.2; done"), "",
		stdio.IO{Stdout: out})
	if err := c.Start(testCtx(t, 60*time.Second)); err != nil {
		t.Fatal(err)
	}
	out.waitFor(t, "first", 30*time.Second)
	f, err := os.OpenFile(probe, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt([]byte("again"), 0)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	out.waitFor(t, "again", 10*time.Second)
}
