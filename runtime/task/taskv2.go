package task

import (
	"context"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"
)

// taskV2Name is the task API's version 2 service name.
//
// containerd talks version 3 to a shim and, when Create (or Connect, as it reloads a shim) answers "not implemented", takes it
// for a shim that predates version 3, downgrades to version 2 and asks again. A shim without version 2 then
// answers that the service containerd.task.v2.Task is unimplemented, and that, not Kiln's reason (a checkpoint,
// a mount Kiln cannot give), is what the user reads; containerd's cleanup of the failed task fails the same way.
// Version 2's messages are version 3's under another package name, with the same fields and numbers, so
// version 3's handlers serve version 2's calls as they are and the retry gets Kiln's own answer.
const taskV2Name = "containerd.task.v2.Task"

// registerTaskV2 serves svc under taskV2Name too.
func registerTaskV2(server *ttrpc.Server, svc taskAPI.TTRPCTaskService) {
	server.RegisterService(taskV2Name, taskV2Desc(svc))
}

// taskV2Desc is the version 2 service: each method decodes its request as version 3's and calls svc.
func taskV2Desc(svc taskAPI.TTRPCTaskService) *ttrpc.ServiceDesc {
	return &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		"State":      method(svc.State),
		"Create":     method(svc.Create),
		"Start":      method(svc.Start),
		"Delete":     method(svc.Delete),
		"Pids":       method(svc.Pids),
		"Pause":      method(svc.Pause),
		"Resume":     method(svc.Resume),
		"Checkpoint": method(svc.Checkpoint),
		"Kill":       method(svc.Kill),
		"Exec":       method(svc.Exec),
		"ResizePty":  method(svc.ResizePty),
		"CloseIO":    method(svc.CloseIO),
		"Update":     method(svc.Update),
		"Wait":       method(svc.Wait),
		"Stats":      method(svc.Stats),
		"Connect":    method(svc.Connect),
		"Shutdown":   method(svc.Shutdown),
	}}
}

// method is a ttrpc handler that decodes the request into Req, whatever package's message was sent.
func method[Req any, PReq interface {
	*Req
	proto.Message
}, Resp proto.Message](call func(context.Context, PReq) (Resp, error)) ttrpc.Method {
	return func(ctx context.Context, unmarshal func(any) error) (any, error) {
		req := PReq(new(Req))
		if err := unmarshal(req); err != nil {
			return nil, err
		}
		return call(ctx, req)
	}
}
