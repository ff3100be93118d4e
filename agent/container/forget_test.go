package container

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

func TestRemovedPaths(t *testing.T) {
	for _, tc := range []struct {
		name     string
		root     string
		released []string
		want     []string
	}{
		{"a root alone", "/s/c1/rootfs", nil, []string{"/s/c1"}},
		{"pod binds released", "/s/c1/rootfs", []string{"/s/_binds/3/data", "/s/_binds/4/x", "/s/_binds/3/other"}, []string{"/s/c1", "/s/_binds/3", "/s/_binds/4"}},
		{"the container's own binds", "/s/c1/rootfs", []string{"/s/c1/binds/1/f"}, []string{"/s/c1"}},
		{"nothing outside the shared directory, nor itself", "/s/c1/rootfs", []string{"/elsewhere/x", "/s/top"}, []string{"/s/c1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := removedPaths("/s", tc.root, tc.released); !slices.Equal(got, tc.want) {
				t.Errorf("removedPaths = %q, want %q", got, tc.want)
			}
		})
	}
}

// forgetRemoved looks the paths up until each is gone, or its bound has passed, then has the kernel drop unused
// entries once.
func TestForgetRemoved(t *testing.T) {
	l := logrus.New()
	l.SetOutput(io.Discard)
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, p := range []string{a, b} {
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var drops atomic.Int32
	drop := func(time.Time) error { drops.Add(1); return nil }
	done := make(chan struct{})
	go func() {
		forgetRemoved(logrus.NewEntry(l), []string{a, b}, 10*time.Millisecond, time.Minute, drop)
		close(done)
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case <-done:
		t.Fatal("forgetRemoved returned while the paths were still there")
	default:
	}
	if n := drops.Load(); n != 0 {
		t.Fatalf("forgetRemoved dropped entries %d times while the paths were still there", n)
	}
	_ = os.Remove(a)
	_ = os.Remove(b)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("forgetRemoved still looks 10 s after the paths were removed")
	}
	if n := drops.Load(); n != 1 {
		t.Errorf("forgetRemoved dropped entries %d times once the paths were gone, want once", n)
	}
	start := time.Now()
	forgetRemoved(logrus.NewEntry(l), []string{dir}, 10*time.Millisecond, 100*time.Millisecond, drop)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("forgetRemoved of a path that stays took %s, want its 100 ms bound", d)
	}
	if n := drops.Load(); n != 2 {
		t.Errorf("forgetRemoved of a path that stays dropped entries %d times, want once", n-1)
	}
}

// entryDropper tells the kernel once to stop logging drops, then drops (2) for each request that no drop begun
// after it covers.
func TestEntryDropper(t *testing.T) {
	var writes []string
	d := &entryDropper{write: func(v string) error { writes = append(writes, v); return nil }}
	asked := time.Now()
	if err := d.drop(asked); err != nil {
		t.Fatal(err)
	}
	if err := d.drop(asked); err != nil { // covered by the drop it asked for
		t.Fatal(err)
	}
	if err := d.drop(time.Now()); err != nil {
		t.Fatal(err)
	}
	if want := []string{"4", "2", "2"}; !slices.Equal(writes, want) {
		t.Errorf("drop_caches got %q, want %q", writes, want)
	}
	// A drop the kernel refused covers no request.
	refuse := true
	writes = nil
	failing := &entryDropper{write: func(v string) error {
		if v == "2" && refuse {
			return errors.New("refused")
		}
		writes = append(writes, v)
		return nil
	}}
	asked = time.Now()
	if err := failing.drop(asked); err == nil {
		t.Error("a drop the kernel refused succeeded")
	}
	refuse = false
	if err := failing.drop(asked); err != nil {
		t.Fatal(err)
	}
	if want := []string{"4", "2"}; !slices.Equal(writes, want) {
		t.Errorf("after a refused drop, drop_caches got %q, want %q", writes, want)
	}
}
