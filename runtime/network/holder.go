package network

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// holderEnv, set in a process's environment, makes it a namespace holder (see RunHolderIfAsked); its value is
// the namespace file to join, or empty for a new namespace made at clone.
const holderEnv = "KILN_NETNS_HOLDER"

func init() {
	if _, ok := os.LookupEnv(holderEnv); ok {
		// The holder joins the namespace on its main thread, the one /proc/<pid>/ns/net shows; LockOSThread in
		// an init function keeps main on it.
		runtime.LockOSThread()
	}
}

// RunHolderIfAsked turns the process into a namespace holder when Kiln started it as one, and then never
// returns: it sits in the network namespace until its standard input closes (its owner closes it or dies).
// Every binary that boots pods calls it first thing in main.
func RunHolderIfAsked() {
	path, ok := os.LookupEnv(holderEnv)
	if !ok {
		return
	}
	if path != "" {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			fmt.Fprintf(os.Stderr, "open network namespace %s: %v\n", path, err)
			os.Exit(1)
		}
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			fmt.Fprintf(os.Stderr, "join network namespace %s: %v\n", path, err)
			os.Exit(1)
		}
		_ = unix.Close(fd)
	}
	// The owner waits for this byte: once it is written, /proc/<pid>/ns/net is the namespace.
	if _, err := os.Stdout.Write([]byte{'1'}); err != nil {
		os.Exit(1)
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

// Holder is a process in a pod's network namespace: OCI hooks get its pid, as runc gives them its container's,
// and a new namespace lives as long as it does.
type Holder struct {
	cmd   *exec.Cmd
	stdin io.Closer
}

// StartHolder starts a holder in the namespace at path, or in a new namespace when path is empty.
func StartHolder(path string) (*Holder, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("start network namespace holder: %w", err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), holderEnv+"="+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if path == "" {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWNET
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("start network namespace holder: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("start network namespace holder: %w", err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start network namespace holder: %w", err)
	}
	h := &Holder{cmd: cmd, stdin: stdin}
	var b [1]byte
	if _, err := io.ReadFull(stdout, b[:]); err != nil {
		h.Close()
		return nil, fmt.Errorf("network namespace holder for %q did not start (see the shim's log): %w", path, err)
	}
	return h, nil
}

// Pid is the holder's pid.
func (h *Holder) Pid() int { return h.cmd.Process.Pid }

// NSPath is the holder's network namespace as a path.
func (h *Holder) NSPath() string { return fmt.Sprintf("/proc/%d/ns/net", h.Pid()) }

// Close ends the holder and waits for it.
func (h *Holder) Close() {
	_ = h.stdin.Close()
	_ = h.cmd.Wait()
}
