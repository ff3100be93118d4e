package qemu

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestAllocateCID(t *testing.T) {
	tests := []struct {
		name    string
		inUse   map[uint64]bool
		failing error
		picks   []uint64
		want    uint64
		errPart string
	}{
		{name: "first free", picks: []uint64{7}, want: 7},
		{name: "skips ids in use", inUse: map[uint64]bool{7: true, 8: true}, picks: []uint64{7, 8, 9}, want: 9},
		{name: "gives up", inUse: map[uint64]bool{5: true}, picks: []uint64{5, 5, 5}, errPart: "no free guest CID after 3"},
		{name: "other errors stop at once", failing: unix.EPERM, picks: []uint64{4, 5}, errPart: "operation not permitted"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			i := 0
			pick := func() uint64 { v := tt.picks[i%len(tt.picks)]; i++; return v }
			set := func(cid uint64) error {
				if tt.failing != nil {
					return tt.failing
				}
				if tt.inUse[cid] {
					return unix.EADDRINUSE
				}
				return nil
			}
			got, err := allocateCID(set, pick, 3)
			if tt.errPart != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errPart) {
					t.Fatalf("want error with %q, got %v (cid %d)", tt.errPart, err, got)
				}
				if tt.failing != nil && !errors.Is(err, tt.failing) {
					t.Fatalf("error %v does not wrap %v", err, tt.failing)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %d, %v; want %d", got, err, tt.want)
			}
		})
	}
}

func TestRandomCIDRange(t *testing.T) {
	for range 10000 {
		if c := randomCID(); c < 3 || c >= 0xffffffff {
			t.Fatalf("cid %d outside [3, 0xffffffff)", c)
		}
	}
}

func TestKernelVsockArgs(t *testing.T) {
	k := &kernelVsock{cid: 1234}
	got := strings.Join(k.qemuArgs(3), " ")
	if got != "-device vhost-vsock-device,guest-cid=1234,vhostfd=3" {
		t.Fatalf("args %q", got)
	}
}
