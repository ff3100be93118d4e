// Command kiln-agent is the Kiln guest agent, run by the guest kernel as
// PID 1 (/init in the guest's initramfs). Everything it does lives in the
// agent packages; this file carries the build version, plugs the container
// service into the agent, and handles the binary's other lives:
// libcontainer re-executes it as each container's init, and a template
// guest's agent as the child that zeroes free memory before the save.
//
// Build it static with cgo (libcontainer's nsenter is C that must run before
// the Go runtime starts threads) and seccomp (libseccomp-dev):
//
//	CGO_ENABLED=1 go build -tags 'seccomp netgo osusergo runc_nocriu' \
//	    -ldflags '-s -w -extldflags -static' ./cmd/kiln-agent
package main

import (
	"context"
	"fmt"
	"os"

	// nsenter's constructor joins or creates the container's namespaces
	// when the binary runs as a container init, before Go starts; in the
	// agent itself it returns at once.
	_ "github.com/opencontainers/runc/libcontainer/nsenter"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/agent"
	"github.com/kiln-runtime/kiln/agent/container"
	"github.com/kiln-runtime/kiln/agent/network"
	"github.com/kiln-runtime/kiln/agent/portforward"
	"github.com/kiln-runtime/kiln/agent/stdio"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// version is set at build time: -ldflags '-X main.version=...'.
var version = "dev"

func main() {
	if container.IsInitReexec() {
		container.RunInit()
	}
	if agent.IsZeroFreeChild() {
		agent.RunZeroFreeChild()
	}
	if os.Getenv(agentv1.WarmExitEnv) == "1" {
		// A spare's warm-up container (see agentv1.WarmExitEnv): its work is done.
		return
	}
	agent.Run(context.Background(), agent.Config{Version: version, Containers: startContainers, Warm: container.Warm})
}

// startContainers starts the container service, the stdio listener it
// takes process streams from, and the port-forward listener that reaches
// the ports of the pod its containers share.
func startContainers(ctx context.Context, log *logrus.Entry, reaper *agent.Reaper, pod *network.Pod) (agentv1.ContainersService, error) {
	hub := stdio.NewHub(stdio.Config{})
	svc, err := container.New(log.WithField("service", "containers"), container.Config{
		StateDir:  container.DefaultStateDir,
		SharedDir: agent.SharedDir,
		Stdio:     hub,
		Reaper:    reaper,
		PodNetNS:  pod,
	})
	if err != nil {
		return nil, err
	}
	l, err := agent.ListenVsock(log, stdio.Port, stdio.SocketBuffer)
	if err != nil {
		return nil, fmt.Errorf("stdio listener: %w", err)
	}
	go func() {
		if err := stdio.Serve(ctx, log.WithField("port", stdio.Port), l, hub); err != nil {
			log.WithError(err).Error("stdio listener stopped")
		}
	}()
	fl, err := agent.ListenVsock(log, portforward.Port, portforward.SocketBuffer)
	if err != nil {
		return nil, fmt.Errorf("port-forward listener: %w", err)
	}
	fwd := portforward.NewServer(log.WithField("port", portforward.Port), pod, portforward.Config{})
	go func() {
		if err := fwd.Serve(ctx, fl); err != nil {
			log.WithError(err).WithField("refused", fwd.Refused()).Error("port-forward listener stopped")
		}
	}()
	return svc, nil
}
