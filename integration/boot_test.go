package integration

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

func TestBootGuestInfo(t *testing.T) {
	share := requireVM(t)
	m := testMachine(t, filepath.Join(share, "vmlinuz"), filepath.Join(share, "initrd.img"), nil)
	// A booting agent tells the host when it listens, so the host need not poll (each refused dial interrupts
	// the guest's boot). With an hour between dials, only the announcement gets the agent answered in time.
	sb, err := sandbox.Start(context.Background(), m, sandbox.Options{DialTimeout: 60 * time.Second, RedialInterval: time.Hour})
	if err != nil {
		t.Fatalf("start sandbox without redialling (did the agent announce itself on the host's ready port?): %v", err)
	}
	t.Cleanup(func() { _ = sb.Stop(context.Background()) })
	if !sb.Announced() {
		t.Error("the booting guest's agent did not announce itself on the host's ready port")
	}
	asked := time.Now()
	info, err := sb.GuestInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The host seeded the guest at start: under TCG, with no hardware generator the guest kernel trusts, its
	// generator would otherwise stay uninitialised for seconds after the agent answers (getrandom blocks).
	// A cold boot has no agent image (microvm has no memory devices): the agent runs from the initramfs.
	if got := info.GetAgentExecutable(); got != "/init" {
		t.Errorf("a cold boot's agent runs from %q, want /init", got)
	}
	if !info.GetRandomReady() {
		t.Error("the guest's random number generator is not initialised after the host seeded it")
	}
	// The RTC the guest boots from has whole seconds; the host's clock, sent at start, is finer.
	if skew := time.Unix(0, info.GetWallClockUnixNano()).Sub(asked); skew < -500*time.Millisecond || skew > time.Since(asked)+500*time.Millisecond {
		t.Errorf("the guest's wall clock is %v off the host's", skew)
	}
	want, err := os.ReadFile(filepath.Join(share, "kernel-release"))
	if err != nil {
		t.Fatal(err)
	}
	if got := info.GetKernelRelease(); got != strings.TrimSpace(string(want)) {
		t.Errorf("guest kernel release %q, want %q", got, strings.TrimSpace(string(want)))
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatal(err)
	}
	if info.GetKernelRelease() == unix.ByteSliceToString(uts.Release[:]) {
		t.Errorf("guest kernel release equals the host's (%s): not talking to the guest?", info.GetKernelRelease())
	}
	if info.GetVcpus() != 1 {
		t.Errorf("vcpus = %d, want 1", info.GetVcpus())
	}
	if mem := info.GetMemoryTotalBytes(); mem < 128<<20 || mem > 256<<20 {
		t.Errorf("guest memory %d bytes, want between 128 MiB and 256 MiB", mem)
	}
	if len(info.GetBootId()) != 36 {
		t.Errorf("boot id %q is not a UUID", info.GetBootId())
	}
	if info.GetUptime().AsDuration() <= 0 {
		t.Errorf("uptime %v, want > 0", info.GetUptime().AsDuration())
	}
	// The agent left the initramfs, so containers are entered with pivot_root (issue 11, finding 13).
	if !info.GetPivotRoot() {
		t.Error("the guest's root is the initial ramfs: containers would be entered with MS_MOVE and chroot")
	}
	// Under TCG QEMU tells what it translated: a booted guest has run tens of thousands of blocks of code.
	switch tr, err := m.Translation(context.Background()); {
	case errors.Is(err, qemu.ErrNoTranslation):
	case err != nil:
		t.Errorf("translation statistics: %v", err)
	case tr.Blocks < 10000 || tr.CodeBytes < int64(tr.Blocks)*50:
		t.Errorf("translation statistics %+v, want tens of thousands of blocks and their code", tr)
	}
	if err := m.Pause(context.Background()); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if err := m.Resume(context.Background()); err != nil {
		t.Fatalf("resume: %v", err)
	}
	if _, err := sb.GuestInfo(context.Background()); err != nil {
		t.Fatalf("guest info after resume: %v", err)
	}
	if err := sb.Stop(context.Background()); err != nil {
		t.Fatalf("stop: %v", err)
	}
	select {
	case <-m.Exited():
	default:
		t.Fatal("VM still running after Stop")
	}
}

// Each boot failure must be a clear error and leave no QEMU, socket or state directory behind (testMachine's
// cleanup checks that).
func TestBootFailures(t *testing.T) {
	share := requireVM(t)
	kernel, initrd := filepath.Join(share, "vmlinuz"), filepath.Join(share, "initrd.img")
	garbage := filepath.Join(t.TempDir(), "garbage.img")
	if err := os.WriteFile(garbage, []byte(strings.Repeat("not an initramfs\n", 4096)), 0o644); err != nil {
		t.Fatal(err)
	}
	_, hangInitrd := buildInitrd(t, buildStatic(t, "./integration/hanginit"))

	tests := []struct {
		name        string
		mutate      func(*qemu.Config)
		during      func(*qemu.Machine)
		dialTimeout time.Duration
		want        []string
	}{
		{
			name:   "missing kernel",
			mutate: func(c *qemu.Config) { c.Kernel = "/nonexistent/vmlinuz" },
			want:   []string{"/nonexistent/vmlinuz", "make image"},
		},
		{
			name:   "missing QEMU",
			mutate: func(c *qemu.Config) { c.QEMU = "/nonexistent/qemu-system-x86_64" },
			want:   []string{"/nonexistent/qemu-system-x86_64", "not found", "hypervisor.path"},
		},
		{
			name:   "QEMU rejects its arguments",
			mutate: func(c *qemu.Config) { c.MemoryMiB = 1 << 30 },
			want:   []string{"QEMU", "stderr"},
		},
		{
			name: "QEMU killed during boot",
			during: func(m *qemu.Machine) {
				for m.PID() == 0 {
					time.Sleep(5 * time.Millisecond)
				}
				time.Sleep(300 * time.Millisecond)
				_ = unix.Kill(m.PID(), unix.SIGKILL)
			},
			want: []string{"VM exited before its agent answered", "signal: killed"},
		},
		{
			name:   "guest dies during boot",
			mutate: func(c *qemu.Config) { c.Initrd = garbage },
			want:   []string{"VM exited before its agent answered", "Kernel panic"},
		},
		{
			name:        "agent never answers",
			mutate:      func(c *qemu.Config) { c.Initrd = hangInitrd },
			dialTimeout: 8 * time.Second,
			// The guest's kernel refused each connection (RST): the error says the vsock device carried packets.
			want: []string{"agent did not answer on vsock port 1024 within 8s", "the guest's devices: vsock packets: "},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := testMachine(t, kernel, initrd, tt.mutate)
			timeout := tt.dialTimeout
			if timeout == 0 {
				timeout = 60 * time.Second
			}
			if tt.during != nil {
				go tt.during(m)
			}
			_, err := sandbox.Start(context.Background(), m, sandbox.Options{DialTimeout: timeout})
			if err == nil {
				t.Fatal("start succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q:\n%v", w, err)
				}
			}
			if _, statErr := os.Stat(m.StateDir()); !os.IsNotExist(statErr) {
				t.Errorf("state dir %s still exists after a failed start", m.StateDir())
			}
		})
	}
}
