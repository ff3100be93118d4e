package task

import (
	"errors"
	"os"
	"testing"
)

func TestRecordRoundTrip(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadRecord(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("no record: %v, want ErrNotExist", err)
	}
	want := Record{VMID: "kiln-1", StateDir: "/run/kiln", ShareDir: "/run/kiln/kiln-1.share", ShimPid: 42, Pid: 7}
	if err := WriteRecord(dir, want); err != nil {
		t.Fatal(err)
	}
	got, err := ReadRecord(dir)
	if err != nil || got != want {
		t.Fatalf("read %+v, %v; want %+v", got, err, want)
	}
	if err := RemoveRecord(dir); err != nil {
		t.Fatal(err)
	}
	if err := RemoveRecord(dir); err != nil {
		t.Fatalf("second remove: %v", err)
	}
}
