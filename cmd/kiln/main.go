// Command kiln is the operator's tool: it checks that a host can run Kiln, boots a guest to prove it, and
// reports versions.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newRoot().ExecuteContext(ctx); err != nil {
		stop()
		// `kiln run` exits with its container's status, as runc does, and has nothing to add.
		var status exitStatus
		if errors.As(err, &status) {
			os.Exit(int(status))
		}
		fmt.Fprintln(os.Stderr, "kiln:", err)
		os.Exit(1)
	}
}

type globalFlags struct {
	configPath string
	debug      bool
}

func newRoot() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:           "kiln",
		Short:         "Kiln microVM container runtime: operator tool",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, _ []string) {
			logrus.SetOutput(os.Stderr)
			if g.debug {
				logrus.SetLevel(logrus.DebugLevel)
				// A start's steps are milliseconds apart: the default's whole seconds would hide where it goes.
				logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: "15:04:05.000000"})
			}
			// `kiln run` and `kiln vm boot` talk ttrpc to a guest's agent, whose client logs through this logger
			// at the guest's rate: bound those lines as the shim does.
			sandbox.QuietGuestNoise(logrus.StandardLogger())
		},
	}
	root.PersistentFlags().StringVar(&g.configPath, "config", "", "configuration file (default: the file $"+config.PathEnv+" names, else "+config.DefaultPath+" if it exists, else built-in defaults)")
	root.PersistentFlags().BoolVar(&g.debug, "debug", false, "debug logging, including the guest console")
	root.AddCommand(newCheck(g), newVM(g), newRun(g), newConfig(g), newSpare(), newVersion(g))
	return root
}
