package manager

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kiln-runtime/kiln/runtime/task"
)

// liveShim stands in for a shim that still runs: it records the calls it gets. Calls it does not serve panic
// (the embedded interface is nil), which the test would see.
type liveShim struct {
	taskAPI.TTRPCTaskService
	gone bool // the task has exited and been deleted already

	mu    sync.Mutex
	calls []string
}

func (s *liveShim) record(c string) {
	s.mu.Lock()
	s.calls = append(s.calls, c)
	s.mu.Unlock()
}

func (s *liveShim) Kill(_ context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	s.record("kill " + r.ID)
	if s.gone {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound)
	}
	if r.Signal != 9 || !r.All {
		s.record("wrong kill")
	}
	return &emptypb.Empty{}, nil
}

func (s *liveShim) Wait(_ context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	s.record("wait " + r.ID)
	if s.gone {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound)
	}
	return &taskAPI.WaitResponse{ExitStatus: 137}, nil
}

func (s *liveShim) Delete(_ context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	s.record("delete " + r.ID)
	if s.gone {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound)
	}
	return &taskAPI.DeleteResponse{ExitStatus: 137}, nil
}

func (s *liveShim) Shutdown(context.Context, *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	s.record("shutdown")
	return &emptypb.Empty{}, nil
}

// containerd's `delete` for a task whose shim still runs (containerd lost it) has that shim kill and delete the
// task, then shut down (it stays for its pod's other tasks), as runc's delete --force kills the container.
func TestStopLiveTask(t *testing.T) {
	for _, gone := range []bool{false, true} {
		shim := &liveShim{gone: gone}
		path := filepath.Join(t.TempDir(), "shim.sock")
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		srv, err := ttrpc.NewServer()
		if err != nil {
			t.Fatal(err)
		}
		taskAPI.RegisterTTRPCTaskService(srv, shim)
		go func() { _ = srv.Serve(context.Background(), l) }()
		err = stopLiveTask(context.Background(), task.Record{ShimSocket: "unix://" + path}, "c1")
		_ = srv.Close()
		if err != nil {
			t.Fatalf("task gone %v: %v", gone, err)
		}
		if got, want := strings.Join(shim.calls, ","), "kill c1,wait c1,delete c1,shutdown"; got != want {
			t.Errorf("task gone %v: the shim got %s, want %s", gone, got, want)
		}
	}
	if err := stopLiveTask(context.Background(), task.Record{}, "c1"); err == nil || !strings.Contains(err.Error(), "no shim socket") {
		t.Errorf("no socket recorded: %v", err)
	}
	err := stopLiveTask(context.Background(), task.Record{ShimSocket: "unix://" + filepath.Join(t.TempDir(), "none")}, "c1")
	if err == nil || !strings.Contains(err.Error(), "dial the shim") {
		t.Errorf("no shim answering: %v", err)
	}
}
