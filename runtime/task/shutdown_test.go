package task

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/core/events"
	"golang.org/x/sys/unix"
)

// fakeShutdown records whether the shim was asked to shut down.
type fakeShutdown struct {
	mu     sync.Mutex
	called int
}

func (f *fakeShutdown) Shutdown() {
	f.mu.Lock()
	f.called++
	f.mu.Unlock()
}
func (f *fakeShutdown) RegisterCallback(func(context.Context) error) {}
func (f *fakeShutdown) Done() <-chan struct{}                        { return nil }
func (f *fakeShutdown) Err() error                                   { return nil }
func (f *fakeShutdown) calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.called
}

// ctxPublisher records each event with whether its context had ended.
type ctxPublisher struct {
	mu       sync.Mutex
	got      []any
	canceled []bool
	delay    time.Duration
}

func (p *ctxPublisher) Publish(ctx context.Context, _ string, e events.Event) error {
	time.Sleep(p.delay)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got = append(p.got, e)
	p.canceled = append(p.canceled, ctx.Err() != nil)
	return nil
}

func (p *ctxPublisher) Close() error { return nil }

// The events a shim queued before it shuts down reach containerd: the shutdown callback waits for them, and they
// are published whether or not the shim's context has ended.
func TestShutdownPublishesQueuedEvents(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	pub := &ctxPublisher{delay: 50 * time.Millisecond}
	s := &Service{namespace: "test", publisher: pub, events: make(chan any, eventQueue)}
	go s.forward(ctx)
	cancel()
	s.send(&eventstypes.TaskExit{ContainerID: "c1", ID: "c1"})
	s.send(&eventstypes.TaskDelete{ContainerID: "c1", ID: "c1"})
	if err := s.shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	pub.mu.Lock()
	defer pub.mu.Unlock()
	if len(pub.got) != 2 {
		t.Fatalf("published %d events by the end of the shutdown, want 2", len(pub.got))
	}
	for i, c := range pub.canceled {
		if c {
			t.Errorf("event %d was published with the ended context", i)
		}
	}
}

// A Shutdown while a task's Create or Delete is under way leaves the shim running, and is carried out once, when
// the Create failed or the Delete ended and left no task: containerd sends it during a Delete it gave up on, naming
// that task. One that names another task (containerd's Shutdown after an earlier task's delete, the pod's other
// tasks still there) is not carried out by a Delete's end.
func TestShutdownWaitsForDeletesAndCreates(t *testing.T) {
	for _, tc := range []struct {
		name string
		// creating counts Creates under way; deleting names the task whose Delete is under way ("": none).
		creating   int
		deleting   string
		shutdownID string
		now        bool
		want       int
		wantAfter  int
	}{
		{"idle", 0, "", "t1", false, 1, 1},
		{"a delete under way", 0, "t1", "t1", false, 0, 1},
		{"a delete of another task under way", 0, "t2", "t1", false, 0, 0},
		{"a create under way", 1, "", "t1", false, 0, 1},
		{"now", 1, "t1", "t1", true, 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sd := &fakeShutdown{}
			s := &Service{ctx: context.Background(), namespace: "test", publisher: &ctxPublisher{}, sd: sd, events: make(chan any, eventQueue),
				creating: tc.creating}
			if tc.deleting != "" {
				s.deletes = map[string]int{tc.deleting: 1}
			}
			if _, err := s.Shutdown(context.Background(), &taskAPI.ShutdownRequest{ID: tc.shutdownID, Now: tc.now}); err != nil {
				t.Fatal(err)
			}
			if got := sd.calls(); got != tc.want {
				t.Errorf("the shim was shut down %d times, want %d", got, tc.want)
			}
			// The Create fails, or the Delete ends, and leaves no task.
			s.mu.Lock()
			s.creating = 0
			s.mu.Unlock()
			if tc.deleting != "" {
				s.deleteEnded(context.Background(), tc.deleting)
			} else {
				s.shutdownIfAsked(context.Background())
				s.shutdownIfAsked(context.Background())
			}
			if got := sd.calls(); got != tc.wantAfter {
				t.Errorf("after the Create or Delete: shut down %d times, want %d", got, tc.wantAfter)
			}
		})
	}
}

// A pod that takes longer to stop than containerd waits for a Shutdown is left to the shutdown callback: the
// reply comes after shutdownWait, and the shim is told to shut down, whose callback waits for the stop.
func TestShutdownAnswersWhileThePodStops(t *testing.T) {
	sd := &fakeShutdown{}
	s := &Service{ctx: context.Background(), namespace: "test", publisher: &ctxPublisher{}, sd: sd, events: make(chan any, eventQueue)}
	go s.forward(context.Background())
	// A spare's VM still stopping holds stopPod (takeSpare).
	s.spareStops.Add(1)
	start := time.Now()
	if _, err := s.Shutdown(context.Background(), &taskAPI.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < shutdownWait || took > shutdownWait+2*time.Second {
		t.Errorf("Shutdown answered after %s, want about %s", took, shutdownWait)
	}
	if sd.calls() != 1 {
		t.Errorf("the shim was shut down %d times, want once", sd.calls())
	}
	callback := make(chan error, 1)
	go func() { callback <- s.shutdown(context.Background()) }()
	select {
	case <-callback:
		t.Fatal("the shutdown callback returned while the pod was still stopping")
	case <-time.After(100 * time.Millisecond):
	}
	s.spareStops.Done()
	select {
	case err := <-callback:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the shutdown callback did not return once the pod stopped")
	}
}

// The shim removes its own socket as it shuts down, before it stops listening: containerd's shim package removes
// the one named by the server's -id, a pod's first container, which is not the group's socket when their ids
// differ. A shim ended by a signal removes it in its shutdown callback.
func TestShutdownRemovesTheSocket(t *testing.T) {
	for _, viaSignal := range []bool{false, true} {
		t.Run(fmt.Sprintf("signal=%v", viaSignal), func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), strings.Repeat("0", 64))
			if err := os.WriteFile(sock, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			sd := &fakeShutdown{}
			s := &Service{ctx: context.Background(), namespace: "test", publisher: &ctxPublisher{}, sd: sd, events: make(chan any, eventQueue),
				socket: "unix://" + sock}
			var err error
			if viaSignal {
				go s.forward(context.Background())
				err = s.shutdown(context.Background())
			} else {
				_, err = s.Shutdown(context.Background(), &taskAPI.ShutdownRequest{})
			}
			if err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(sock); !os.IsNotExist(err) {
				t.Errorf("the shim's socket %s is still there (%v)", sock, err)
			}
		})
	}
}

// A Create counts itself before it loads its bundle (which can take as long as the file takes to read): a Shutdown
// meanwhile is held back, and carried out once the Create failed.
func TestShutdownDuringTheBundlesLoad(t *testing.T) {
	dir := t.TempDir()
	config := filepath.Join(dir, "config.json")
	if err := unix.Mkfifo(config, 0o600); err != nil {
		t.Fatal(err)
	}
	sd := &fakeShutdown{}
	s := &Service{ctx: context.Background(), namespace: "test", publisher: &ctxPublisher{}, sd: sd, events: make(chan any, eventQueue)}
	created := make(chan error, 1)
	go func() {
		_, err := s.Create(context.Background(), &taskAPI.CreateTaskRequest{ID: "c1", Bundle: dir})
		created <- err
	}()
	// The open returns once the Create opened the file to read it.
	w, err := os.OpenFile(config, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Shutdown(context.Background(), &taskAPI.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	if got := sd.calls(); got != 0 {
		t.Errorf("shut down %d times while a Create loaded its bundle, want none", got)
	}
	_, _ = w.WriteString("not json")
	_ = w.Close()
	if err := <-created; err == nil {
		t.Fatal("Create of a bundle whose config.json is not JSON succeeded")
	}
	if got := sd.calls(); got != 1 {
		t.Errorf("after the Create failed: shut down %d times, want once", got)
	}
}

// A shim a spare was handed to whose task never came (containerd gone between the hand-over and its record of the
// shim) ends after the bound, stopping the spare's VM; one whose spare a Create took stays; with a Create under
// way it looks again later, and ends once that Create failed without taking the spare.
func TestShimHandedASpareEndsWhenNoTaskComes(t *testing.T) {
	const bound = 10 * time.Millisecond
	newService := func(sd *fakeShutdown) *Service {
		return &Service{ctx: context.Background(), namespace: "test", publisher: &ctxPublisher{}, sd: sd, events: make(chan any, eventQueue)}
	}
	t.Run("no task came", func(t *testing.T) {
		sd := &fakeShutdown{}
		s := newService(sd)
		s.spare = &Spare{}
		s.awaitTask(bound)
		if sd.calls() != 1 || s.spare != nil {
			t.Errorf("shut down %d times, spare left %v; want once, the spare stopped", sd.calls(), s.spare != nil)
		}
	})
	t.Run("a create took the spare", func(t *testing.T) {
		sd := &fakeShutdown{}
		s := newService(sd)
		s.awaitTask(bound)
		if sd.calls() != 0 {
			t.Errorf("shut down %d times, want none", sd.calls())
		}
	})
	t.Run("a create under way, then failed", func(t *testing.T) {
		sd := &fakeShutdown{}
		s := newService(sd)
		s.spare = &Spare{}
		s.creating = 1
		done := make(chan struct{})
		go func() { defer close(done); s.awaitTask(bound) }()
		time.Sleep(10 * bound)
		if sd.calls() != 0 {
			t.Fatalf("shut down %d times while a create was under way", sd.calls())
		}
		s.mu.Lock()
		s.creating = 0
		s.mu.Unlock()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("the shim did not end once the create failed without taking the spare")
		}
		if sd.calls() != 1 {
			t.Errorf("shut down %d times, want once", sd.calls())
		}
	})
}
