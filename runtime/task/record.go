package task

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"

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

// shimSocketPattern is the form containerd's shim.SocketAddress gives a shim's socket address: a Unix socket
// named by a sha256 under <containerd's default state dir>/s, whatever the daemon's own state dir.
var shimSocketPattern = regexp.MustCompile(`^unix://` + regexp.QuoteMeta(filepath.Join(defaults.DefaultStateDir, "s")) + `/[0-9a-f]{64}$`)

// Validate checks that r names only what a shim writes in a record: the `delete` command kills the processes
// whose command line names StateDir/VMID and removes that directory, the share and the socket, so a record
// edited to name other paths must not be acted on. The error names the first field that is not as a shim
// writes it.
func (r Record) Validate() error {
	if !vmIDPattern.MatchString(r.VMID) {
		return fmt.Errorf("vm_id %q: want \"kiln-\" and 16 lowercase hex digits", r.VMID)
	}
	if !filepath.IsAbs(r.StateDir) || filepath.Clean(r.StateDir) != r.StateDir {
		return fmt.Errorf("state_dir %q: want an absolute, clean path", r.StateDir)
	}
	if want := pod.ShareDir(r.StateDir, r.VMID); r.ShareDir != want {
		return fmt.Errorf("share_dir %q: want %q, beside the VM's state directory", r.ShareDir, want)
	}
	if r.ShimSocket != "" && !shimSocketPattern.MatchString(r.ShimSocket) {
		return fmt.Errorf("shim_socket %q: want a containerd shim socket, %s", r.ShimSocket, "unix://"+filepath.Join(defaults.DefaultStateDir, "s")+"/<sha256>")
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
