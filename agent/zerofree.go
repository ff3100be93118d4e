package agent

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime/debug"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Bounds of zeroFreeMemory: it leaves zeroFreeReserve of the guest's memory free for the kernel, and takes the
// rest zeroFreeChunk at a time.
const (
	zeroFreeReserve = 16 << 20
	zeroFreeChunk   = 4 << 20
)

// zeroFreeMemory leaves the guest's free memory holding zeros, for a template guest about to be saved: the host
// leaves zero pages out of the saved RAM (punchZeros), so that each clone copies and holds only what the guest
// uses. A freed page keeps what was written to it (the initramfs unpacked at boot, the agent's garbage): the
// kernel gives the agent its free pages zeroed, as it gives every process new anonymous memory, and takes them
// back as they are. Kiln's guests used init_on_free=1 for this, which kept zeroing every page they freed for
// the clones' whole life, and zeroed all memory a clone added (AddMemory): onlined memory is freed into the
// allocator. It returns the bytes zeroed.
func zeroFreeMemory(meminfo string) (int64, error) {
	var held [][]byte
	defer func() {
		for _, b := range held {
			_ = unix.Munmap(b)
		}
	}()
	var zeroed int64
	first, err := memFree(meminfo)
	if err != nil {
		return 0, err
	}
	// No more than was free at first, however little the kernel's count falls meanwhile.
	for zeroed+zeroFreeChunk <= first-zeroFreeReserve {
		free, err := memFree(meminfo)
		if err != nil {
			return zeroed, err
		}
		if free < zeroFreeReserve+zeroFreeChunk {
			break
		}
		// Writable and private: MAP_POPULATE faults real pages in, each cleared by the kernel.
		b, err := unix.Mmap(-1, 0, zeroFreeChunk, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
		if err != nil {
			return zeroed, fmt.Errorf("zero the free memory: %w", err)
		}
		held = append(held, b)
		zeroed += zeroFreeChunk
	}
	return zeroed, nil
}

// zeroFreeEnv set to "1" makes the agent's binary the child that zeroes the guest's free memory (IsZeroFreeChild).
const zeroFreeEnv = "KILN_AGENT_ZERO_FREE"

// IsZeroFreeChild says whether this process is the agent's child that zeroes the guest's free memory: the binary's
// main hands it to RunZeroFreeChild.
func IsZeroFreeChild() bool { return os.Getenv(zeroFreeEnv) == "1" }

// RunZeroFreeChild zeroes the guest's free memory as the child of the agent, the process the kernel's OOM killer
// takes first, prints the bytes zeroed, and exits.
func RunZeroFreeChild() {
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte("1000"), 0); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	n, err := zeroFreeMemory("/proc/meminfo")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(n)
	os.Exit(0)
}

// zeroFreeInChild zeroes the guest's free memory from a child, the agent's binary run again (IsZeroFreeChild), and
// returns the bytes it zeroed. The agent is the guest's init, which the OOM killer never takes, and a template
// guest runs no other process: an allocation that met less free memory than MemFree promised (free page reporting
// holds free pages aside while the host drops them) found nothing to kill, and the kernel panicked ("System is
// deadlocked on memory"). The child is there to be killed instead; the template is saved all the same.
func zeroFreeInChild(ctx context.Context, reaper *Reaper) (int64, error) {
	// The agent's own garbage too: Go keeps freed heap pages until it returns them.
	debug.FreeOSMemory()
	cmd := exec.CommandContext(ctx, "/proc/self/exe")
	cmd.Env = []string{zeroFreeEnv + "=1"}
	return runZeroFree(reaper, cmd)
}

// runZeroFree runs cmd, a child that zeroes free memory and prints the bytes it zeroed, with the reaper held.
func runZeroFree(reaper *Reaper, cmd *exec.Cmd) (int64, error) {
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	// The child's exit is cmd's to wait for, not the reaper's.
	release := reaper.Hold()
	out, err := cmd.Output()
	release()
	if err != nil {
		return 0, fmt.Errorf("zero the free memory in a child: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("zero the free memory in a child: its count %q: %w", out, err)
	}
	return n, nil
}

// memFree is MemFree of a /proc/meminfo, in bytes.
func memFree(meminfo string) (int64, error) {
	b, err := os.ReadFile(meminfo)
	if err != nil {
		return 0, fmt.Errorf("zero the free memory: %w", err)
	}
	s := bufio.NewScanner(bytes.NewReader(b))
	for s.Scan() {
		f := bytes.Fields(s.Bytes())
		if len(f) >= 2 && string(f[0]) == "MemFree:" {
			kb, err := strconv.ParseInt(string(f[1]), 10, 64)
			if err != nil || kb < 0 {
				return 0, fmt.Errorf("zero the free memory: MemFree %q in %s", f[1], meminfo)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("zero the free memory: no MemFree in %s", meminfo)
}
