package task

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
	// Pid is the task's init pid in the guest, reported back in the exit that `delete` makes up.
	Pid uint32 `json:"pid"`
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
