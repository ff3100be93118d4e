package manager

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/runtime/task"
)

// liveTaskStopTimeout bounds stopLiveTask: containerd gives the whole `delete` command 5 s.
const liveTaskStopTimeout = 4 * time.Second

// stopLiveTask asks the shim that still runs task id (rec) to kill it, wait for its exit and delete it, and then
// to shut down, which it does once it serves no other task.
func stopLiveTask(ctx context.Context, rec task.Record, id string) error {
	addr, ok := strings.CutPrefix(rec.ShimSocket, "unix://")
	if !ok {
		return fmt.Errorf("no shim socket recorded (%q)", rec.ShimSocket)
	}
	ctx, cancel := context.WithTimeout(ctx, liveTaskStopTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", addr)
	if err != nil {
		return fmt.Errorf("dial the shim: %w", err)
	}
	client := ttrpc.NewClient(conn)
	defer client.Close()
	tc := taskAPI.NewTTRPCTaskClient(client)
	gone := func(err error) bool { return err == nil || errdefs.IsNotFound(errgrpc.ToNative(err)) }
	if _, err := tc.Kill(ctx, &taskAPI.KillRequest{ID: id, Signal: uint32(unix.SIGKILL), All: true}); !gone(err) {
		return fmt.Errorf("kill task %s: %w", id, errgrpc.ToNative(err))
	}
	if _, err := tc.Wait(ctx, &taskAPI.WaitRequest{ID: id}); !gone(err) {
		return fmt.Errorf("wait for task %s: %w", id, errgrpc.ToNative(err))
	}
	if _, err := tc.Delete(ctx, &taskAPI.DeleteRequest{ID: id}); !gone(err) {
		return fmt.Errorf("delete task %s: %w", id, errgrpc.ToNative(err))
	}
	if _, err := tc.Shutdown(ctx, &taskAPI.ShutdownRequest{ID: id}); err != nil && !errors.Is(err, ttrpc.ErrClosed) {
		return fmt.Errorf("shut the shim down: %w", errgrpc.ToNative(err))
	}
	return nil
}
