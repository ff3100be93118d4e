package task

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/containerd/containerd/v2/defaults"

	"github.com/kiln-runtime/kiln/runtime/pod"
)

// RecordFile is the file in each task's bundle that tells the shim's `delete` command what to clean up when
// the shim that served the task is gone.
const RecordFile = "kiln-task.json"

// Record is what a task's bundle remembers about the shim and VM serving it.
type Record struct {
	// VMID names the VM; its state directory is StateDir/VMID.
	VMID     string `json:"vm_id"`
	StateDir string `json:"state_dir"`
	// ShareDir is the VM's shared directory on the host.
	ShareDir string `json:"share_dir"`
	ShimPid  int    `json:"shim_pid"`
	// ShimSocket is the shim's ttrpc socket address, removed by `delete` when the shim died without doing so.
	ShimSocket string `json:"shim_socket,omitempty"`
	// Pid is the pid containerd got for the task (its stand-in's, runtime/standin), reported back in the exit that
	// `delete` makes up.
	Pid uint32 `json:"pid"`
	// Cgroup is the host cgroup the shim moved the VM's processes to, removed by `delete` (see hostcgroup).
	Cgroup string `json:"cgroup,omitempty"`
	// PoststopRan is set by a `delete` that ran the container's poststop hooks, so that a later one whose
	// cleanup an earlier one could not finish does not run them again.
	PoststopRan bool `json:"poststop_ran,omitempty"`
}

// vmIDPattern is the form VMID gives a VM id.
var vmIDPattern = regexp.MustCompile(`^kiln-[0-9a-f]{16}$`)

// shimSocketName is the form containerd's shim.CreateSocketAddress gives a shim socket's name: a sha256.
var shimSocketName = regexp.MustCompile(`^[0-9a-f]{64}$`)

// defaultSocketDir is where shims put their sockets for a containerd that names no directory (before 2.3).
var defaultSocketDir = filepath.Join(defaults.DefaultStateDir, "s")

// socketDirLink is the link containerd's shim package makes in a bundle, before the `start` command's work, to the
// socket directory containerd passed (its shim manager's socket_dir), for the server and `delete` to find.
const socketDirLink = "s"

// SocketDir is the directory the shim socket of the task in bundle goes in: containerd's socket_dir, as its shim
// package linked it in the bundle, or containerd's default state directory's for a containerd that passes none.
func SocketDir(bundle string) string {
	if dir, err := os.Readlink(filepath.Join(bundle, socketDirLink)); err == nil && filepath.IsAbs(dir) {
		return filepath.Clean(dir)
	}
	return defaultSocketDir
}

// inSocketDir says whether address names a shim socket in dir.
func inSocketDir(address, dir string) bool {
	name, ok := strings.CutPrefix(address, "unix://"+dir+"/")
	return ok && shimSocketName.MatchString(name)
}

// Validate checks that r names only what a shim writes in a record: the `delete` command kills the processes
// whose command line names StateDir/VMID and removes that directory, the share and the socket, so a record
// edited to name other paths must not be acted on. The socket is in the task's socket directory (socketDir,
// SocketDir) or containerd's default one (a shim that ran before containerd named one, or a Kiln that did not
// read it). The error names the first field that is not as a shim writes it.
func (r Record) Validate(socketDir string) error {
	if !vmIDPattern.MatchString(r.VMID) {
		return fmt.Errorf("vm_id %q: want \"kiln-\" and 16 lowercase hex digits", r.VMID)
	}
	if !filepath.IsAbs(r.StateDir) || filepath.Clean(r.StateDir) != r.StateDir {
		return fmt.Errorf("state_dir %q: want an absolute, clean path", r.StateDir)
	}
	if want := pod.ShareDir(r.StateDir, r.VMID); r.ShareDir != want {
		return fmt.Errorf("share_dir %q: want %q, beside the VM's state directory", r.ShareDir, want)
	}
	if r.ShimSocket != "" && !inSocketDir(r.ShimSocket, socketDir) && !inSocketDir(r.ShimSocket, defaultSocketDir) {
		return fmt.Errorf("shim_socket %q: want a containerd shim socket, unix://%s/<sha256>", r.ShimSocket, socketDir)
	}
	if r.Cgroup != "" && (!filepath.IsAbs(r.Cgroup) || filepath.Clean(r.Cgroup) != r.Cgroup || r.Cgroup == "/") {
		return fmt.Errorf("cgroup %q: want an absolute, clean cgroup path below the root", r.Cgroup)
	}
	if r.ShimPid < 0 {
		return fmt.Errorf("shim_pid %d: want a pid, or 0", r.ShimPid)
	}
	return nil
}

// WriteRecord stores r in bundle.
func WriteRecord(bundle string, r Record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode task record: %w", err)
	}
	tmp := filepath.Join(bundle, RecordFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write task record in %s: %w", bundle, err)
	}
	if err := os.Rename(tmp, filepath.Join(bundle, RecordFile)); err != nil {
		return fmt.Errorf("write task record in %s: %w", bundle, err)
	}
	return nil
}

// ReadRecord loads the record in bundle; a bundle without one gives os.ErrNotExist.
func ReadRecord(bundle string) (Record, error) {
	var r Record
	b, err := os.ReadFile(filepath.Join(bundle, RecordFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return r, err
		}
		return r, fmt.Errorf("read task record in %s: %w", bundle, err)
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("decode task record in %s: %w", bundle, err)
	}
	return r, nil
}

// RemoveRecord deletes the record in bundle.
func RemoveRecord(bundle string) error {
	if err := os.Remove(filepath.Join(bundle, RecordFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove task record in %s: %w", bundle, err)
	}
	return nil
}
