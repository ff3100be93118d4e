package spare

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"
)

// A spare that holds its slot is listed with its pid and containerd, booting until it listens, and no longer once
// it has gone.
func TestAllListsHolders(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	if got := all(dir); len(got) != 0 {
		t.Fatalf("all() with no spare = %v", got)
	}
	slot, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := all(dir); len(got) != 1 || got[0].Pid != os.Getpid() || got[0].Address != "/c.sock" || got[0].Ready || got[0].Slot != socketPath(dir, "/c.sock", 0) {
		t.Fatalf("all() while booting = %+v, want this process for /c.sock, not ready", got)
	}
	waitCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		_, _, _ = slot.Wait(waitCtx, 5*time.Second, 1, "v1", nil, nil)
		close(done)
	}()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if got := all(dir); len(got) == 1 && got[0].Ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("all() never showed the waiting spare ready: %+v", all(dir))
		}
	}
	cancel()
	<-done
	if got := all(dir); len(got) != 0 {
		t.Errorf("all() after the spare left = %+v", got)
	}
}

// A spare that leaves without giving its slot up (it failed, or was killed) is listed as failed, with the slot
// whose log it kept; while it lives it is listed as holding the slot.
func TestFailedSlots(t *testing.T) {
	dir := t.TempDir()
	slot, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	if held, failed := scan(dir); len(held) != 1 || len(failed) != 0 {
		t.Fatalf("scan of a held slot = %+v, %+v; want it held", held, failed)
	}
	// What a spare's exit without release leaves: the lock file, no longer locked.
	_ = slot.lock.Close()
	held, failed := scan(dir)
	want := Info{Pid: os.Getpid(), Address: "/c.sock", Slot: socketPath(dir, "/c.sock", 0)}
	if len(held) != 0 || len(failed) != 1 || failed[0] != want {
		t.Errorf("scan after the spare left = %+v, %+v; want %+v failed", held, failed, want)
	}
}

// The socket of a spare that was killed goes when the next spare claims the slot, before it boots anything.
func TestClaimRemovesAKilledSparesSocket(t *testing.T) {
	dir := t.TempDir()
	path := socketPath(dir, "/c.sock", 0)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	_ = l.Close()
	slot, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a killed spare's socket is still there after a claim (%v)", err)
	}
	slot.Close()
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("files left after the spare gave its slot up: %v", left)
	}
}

// claimHere claims slot i of the containerd at address in dir for this process, named in its lock as a spawner
// names the spare it starts.
func claimHere(dir, address string, i int) (*Slot, error) {
	s, err := claim(dir, address, i)
	if err == nil {
		s.name(os.Getpid())
	}
	return s, err
}
