package vhostuser

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// rxWatcher is a vsock-shaped device that reports the first receive buffer the guest driver posts.
type rxWatcher struct {
	started chan int // number of queues, per Start
	rxChain chan *virtqueue.Chain
	stopped chan struct{}
	wg      sync.WaitGroup
}

func (d *rxWatcher) NumQueues() int   { return 2 }
func (d *rxWatcher) Features() uint64 { return 0 }
func (d *rxWatcher) Config() []byte   { return []byte{42, 0, 0, 0, 0, 0, 0, 0} }
func (d *rxWatcher) Start(queues []*virtqueue.Queue) error {
	d.started <- len(queues)
	rx := queues[0]
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		for range rx.Kicks() {
			c, err := rx.Pop()
			if err != nil || c != nil {
				select {
				case d.rxChain <- c:
				default:
				}
			}
		}
	}()
	return nil
}
func (d *rxWatcher) Stop() {
	d.wg.Wait()
	select {
	case d.stopped <- struct{}{}:
	default:
	}
}

// bootAssets finds a guest kernel and an initrd that loads vmw_vsock_virtio_transport: KILN_TEST_KERNEL and
// KILN_TEST_INITRD, else the repository's build output.
func bootAssets(t *testing.T) (kernel, initrd string) {
	kernel, initrd = os.Getenv("KILN_TEST_KERNEL"), os.Getenv("KILN_TEST_INITRD")
	if kernel == "" {
		kernel, _ = filepath.Abs("../../_output/share/kiln/vmlinuz")
		initrd, _ = filepath.Abs("../../_output/share/kiln/initrd.img")
	}
	for _, p := range []string{kernel, initrd} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("guest asset missing (set KILN_TEST_KERNEL/KILN_TEST_INITRD or run make): %v", err)
		}
	}
	return kernel, initrd
}

// tscKHzArg tells the guest the host's TSC rate: under TCG on a loaded host the kernel sometimes cannot
// calibrate the TSC against the PIT and stalls.
func tscKHzArg() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || mhz <= 0 {
			return ""
		}
		return fmt.Sprintf(" tsc_early_khz=%d", int(mhz*1000))
	}
	return ""
}

// TestQEMUGuestDriverStartsRings boots a guest whose vsock driver binds the vhost-user device, and checks the
// whole start sequence reaches the device and that the driver's first receive buffer is read from guest memory
// through the translated ring addresses.
func TestQEMUGuestDriverStartsRings(t *testing.T) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed")
	}
	kernel, initrd := bootAssets(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "vsock.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	dev := &rxWatcher{started: make(chan int, 4), rxChain: make(chan *virtqueue.Chain, 1), stopped: make(chan struct{}, 1)}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	served := make(chan error, 1)
	logger := logrus.New()
	logger.SetLevel(logrus.DebugLevel)
	logger.SetOutput(testWriter{t})
	go func() { served <- Serve(ctx, l, dev, GuestRAM{}, logrus.NewEntry(logger)) }()

	cmd := exec.CommandContext(ctx, qemu,
		"-M", "microvm,acpi=off,pit=on,pic=on,rtc=on,memory-backend=mem", "-accel", "tcg",
		"-m", "256M", "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
		"-global", "virtio-mmio.force-legacy=false",
		"-chardev", "socket,id=c0,path="+sock,
		"-device", "vhost-user-vsock-device,chardev=c0",
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 tsc=reliable panic=-1 quiet i8042.noaux i8042.nokbd i8042.nopnp"+tscKHzArg(),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
	)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	fail := func(format string, args ...any) {
		t.Helper()
		cmd.Process.Kill()
		<-exited
		t.Fatalf(format+"\nguest console:\n%s", append(args, out.String())...)
	}

	select {
	case n := <-dev.started:
		if n != 2 {
			fail("device started with %d queues", n)
		}
	case <-exited:
		fail("qemu exited before the device started")
	case <-time.After(60 * time.Second):
		fail("device not started within 60s")
	}
	select {
	case c := <-dev.rxChain:
		if c == nil || len(c.Writable) == 0 || len(c.Readable) != 0 {
			fail("first rx chain %+v: want device-writable buffers only", c)
		}
	case <-time.After(30 * time.Second):
		fail("no rx buffer from the guest driver")
	}
	cmd.Process.Kill()
	<-exited
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve after QEMU died: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after QEMU died")
	}
	select {
	case <-dev.stopped:
	default:
		t.Fatal("device not stopped on disconnect")
	}
}
