package task

import (
	"os"

	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/runtime/spare"
	"github.com/kiln-runtime/kiln/runtime/standin"
)

// Register adds the task service to containerd's shim plugin registry, where shim.Run finds it. The shim's main
// calls it once before shim.Run, with its build version; in a spare shim that a task was handed to, the spare's pod
// (nil otherwise); and the holds its `start` passed it (spare.Inherited; nil without), which it lets go once its
// task has started.
func Register(version string, sp *Spare, held *spare.Held) {
	registry.Register(&plugin.Registration{
		Type:     plugins.TTRPCPlugin,
		ID:       "task",
		Requires: []plugin.Type{plugins.EventPlugin, plugins.InternalPlugin},
		InitFn: func(ic *plugin.InitContext) (interface{}, error) {
			// shim.Run has set the shim's log format by now.
			sandbox.QuietGuestNoise(logrus.StandardLogger())
			pp, err := ic.GetByID(plugins.EventPlugin, "publisher")
			if err != nil {
				return nil, err
			}
			ss, err := ic.GetByID(plugins.InternalPlugin, "shutdown")
			if err != nil {
				return nil, err
			}
			var threads *standin.Pool
			if sp != nil {
				threads = sp.threads
			}
			s, err := NewService(ic.Context, pp.(shim.Publisher), ss.(shutdown.Service), version, threads)
			if err != nil {
				return nil, err
			}
			if sp != nil {
				sp.bind(s)
				s.spare = sp
			}
			s.held = held
			// The same address runtime/manager's `start` created the socket at (the server runs in the bundle
			// `start` ran in); recorded for crash cleanup.
			addr, group := ic.Properties[plugins.PropertyGRPCAddress], os.Getenv(GroupEnv)
			s.containerd = addr
			if addr != "" && group != "" {
				if cwd, err := os.Getwd(); err == nil {
					if sock, err := shim.CreateSocketAddress(ic.Context, SocketDir(cwd), addr, group, false); err == nil {
						s.socket = sock
					}
				}
			}
			if sp != nil {
				go s.awaitTask(spareTaskBound)
			}
			return s, nil
		},
	})
}
