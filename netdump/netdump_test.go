package netdump

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func TestConsistent(t *testing.T) {
	other := errors.New("permission denied")
	for _, tc := range []struct {
		name      string
		results   []error // what each dump returns, in turn
		wantCalls int
		wantErr   error
	}{
		{"first dump whole", []error{nil}, 1, nil},
		{"interrupted twice, then whole", []error{netlink.ErrDumpInterrupted, netlink.ErrDumpInterrupted, nil}, 3, nil},
		{"another error is not repeated", []error{other}, 1, other},
		{"interrupted, then another error", []error{netlink.ErrDumpInterrupted, other}, 2, other},
		{"interrupted every time", nil, attempts, netlink.ErrDumpInterrupted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			got, err := Consistent(func() (int, error) {
				calls++
				if calls > len(tc.results) {
					return calls, netlink.ErrDumpInterrupted
				}
				return calls, tc.results[calls-1]
			})
			if calls != tc.wantCalls {
				t.Errorf("%d dumps, want %d", calls, tc.wantCalls)
			}
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			if err == nil && got != calls {
				t.Errorf("result of dump %d, want the last one's (%d)", got, calls)
			}
			if err != nil && errors.Is(err, netlink.ErrDumpInterrupted) && got != 0 {
				t.Errorf("result %d with an interrupted dump, want none", got)
			}
		})
	}
}

// TestConsistentWhileTableChanges lists the addresses of a namespace in which another goroutine adds and deletes
// an address all the while, as a spare's guest binds hot-plugged NICs while its agent lists links: every listing
// comes back whole. Addresses stand for any table because they are cheap to change; links are dumped the same way.
func TestConsistentWhileTableChanges(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	h := newNamespaceHandle(t)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	// Enough addresses that a dump spans several messages, which is when the kernel can see a change in between.
	const still = 2048
	for i := 0; i < still; i++ {
		if err := h.AddrAdd(lo, address(t, 1, i)); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	churned := 0
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			a := address(t, 2, i%8)
			if err := h.AddrAdd(lo, a); err != nil {
				t.Errorf("add %s: %v", a, err)
				return
			}
			if err := h.AddrDel(lo, a); err != nil {
				t.Errorf("delete %s: %v", a, err)
				return
			}
			churned++
		}
	}()
	// Until a few plain listings were interrupted, which shows the churn reaches into dumps.
	const enough, most = 5, 5000
	interrupted, listings := 0, 0
	for ; interrupted < enough && listings < most; listings++ {
		if _, err := h.AddrList(lo, netlink.FAMILY_V6); errors.Is(err, netlink.ErrDumpInterrupted) {
			interrupted++
		}
		addrs, err := Consistent(func() ([]netlink.Addr, error) { return h.AddrList(lo, netlink.FAMILY_V6) })
		if err != nil {
			t.Fatalf("listing %d: %v", listings, err)
		}
		if len(addrs) < still {
			t.Fatalf("listing %d has %d addresses, want %d at least", listings, len(addrs), still)
		}
	}
	close(stop)
	wg.Wait()
	// Without a change in the middle of some dumps the test proves nothing.
	if interrupted == 0 {
		t.Fatalf("none of %d plain listings was interrupted (%d addresses added and deleted meanwhile)", listings, churned)
	}
	t.Logf("%d addresses added and deleted; %d of %d plain listings were interrupted", churned, interrupted, listings)
}

// address is fd00:<net>::<i>/128, without duplicate address detection.
func address(t *testing.T, net, i int) *netlink.Addr {
	t.Helper()
	a, err := netlink.ParseAddr(fmt.Sprintf("fd00:%x::%x/128", net, i))
	if err != nil {
		t.Fatal(err)
	}
	a.Flags = unix.IFA_F_NODAD
	return a
}

// newNamespaceHandle makes a network namespace on a thread that it then discards, and returns a netlink handle
// in it, closed when the test ends.
func newNamespaceHandle(t *testing.T) *netlink.Handle {
	t.Helper()
	type made struct {
		ns  netns.NsHandle
		err error
	}
	done := make(chan made, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends in the new namespace
		ns, err := netns.New()
		done <- made{ns, err}
	}()
	m := <-done
	if m.err != nil {
		t.Fatal(m.err)
	}
	defer m.ns.Close()
	h, err := netlink.NewHandleAt(m.ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}
