package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/console"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/share"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// exitStatus carries the container's exit status out of a command, so main exits with it and prints nothing.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("container exited with status %d", int(e)) }

type runFlags struct {
	bundle string
	tty    bool
}

func newRun(g *globalFlags) *cobra.Command {
	f := &runFlags{}
	cmd := &cobra.Command{
		Use:   "run --bundle DIR [--tty] ID",
		Short: "Run an OCI bundle in a fresh microVM the way `runc run` does",
		Long: "Run an OCI bundle (config.json and its root file system) in a fresh microVM with stdio attached, and\n" +
			"exit with the container's exit status (128+signal when a signal killed it). SIGINT, SIGTERM and the\n" +
			"other terminating signals are forwarded to the container. --tty decides whether the process gets a\n" +
			"terminal, whatever process.terminal says in config.json. The VM is stopped and everything removed\n" +
			"before kiln returns.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			status, err := runBundle(cmd.Context(), g.configPath, args[0], f)
			if err != nil {
				return err
			}
			if status != 0 {
				return exitStatus(status)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&f.bundle, "bundle", "b", ".", "bundle directory (config.json and the root it names)")
	cmd.Flags().BoolVarP(&f.tty, "tty", "t", false, "give the process a terminal (the host terminal is put in raw mode)")
	return cmd
}

// forwardedSignals are what `runc run` passes on to the container instead of acting on them.
func forwardedSignals() []os.Signal {
	return []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}
}

// runBundle runs the bundle to completion and returns the container's exit status. Everything it set up is
// gone when it returns, also on error.
func runBundle(ctx context.Context, configPath, id string, f *runFlags) (status uint32, retErr error) {
	// The pod checks it too, but only once its VM is up.
	if err := share.CheckID(id); err != nil {
		return 0, err
	}
	cfg, err := config.Load(configPath)
	if err != nil {
		return 0, err
	}
	log := logrus.WithFields(logrus.Fields{"cmd": "run", "container": id})
	b, err := bundle.Load(f.bundle)
	if err != nil {
		return 0, err
	}
	b.Spec.Process.Terminal = f.tty
	// What no VM can give is refused before one boots.
	if _, err := pod.CheckSpec(cfg, id, b.Spec); err != nil {
		return 0, err
	}
	p, err := pod.New(ctx, pod.Options{ID: "run-" + randomID(), Config: cfg, HostVersion: version, Log: log})
	if err != nil {
		return 0, err
	}
	// From here on the run ends only through the container: signals are forwarded, not obeyed.
	ctx = context.WithoutCancel(ctx)
	defer func() {
		if err := p.Close(ctx); err != nil {
			retErr = errors.Join(retErr, err)
		}
	}()
	return runContainer(ctx, p, b, id, log)
}

func runContainer(ctx context.Context, p *pod.Pod, b *bundle.Bundle, id string, log *logrus.Entry) (uint32, error) {
	io := stdio.IO{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Terminal: b.Spec.Process.Terminal}
	var term console.Console
	if io.Terminal {
		if c, err := console.ConsoleFromFile(os.Stdin); err == nil {
			term = c
			if ws, err := term.Size(); err == nil && ws.Width > 0 {
				b.Spec.Process.ConsoleSize = &specs.Box{Height: uint(ws.Height), Width: uint(ws.Width)}
			}
			if err := term.SetRaw(); err != nil {
				return 0, fmt.Errorf("put the terminal in raw mode: %w", err)
			}
			defer func() { _ = term.Reset() }()
		}
	}

	signals := make(chan os.Signal, 16)
	signal.Notify(signals, append(forwardedSignals(), syscall.SIGWINCH)...)
	defer signal.Stop(signals)

	c, err := p.CreateContainer(ctx, pod.ContainerOptions{ID: id, Bundle: b, IO: io})
	if err != nil {
		// As the shim's create does: poststop hooks undo what create hooks did (and are owed no more).
		return 0, errors.Join(err, pod.FailedCreate(ctx, p, id, b, err))
	}
	defer func() {
		if _, err := p.DeleteContainer(ctx, c, true); err != nil {
			log.WithError(err).Warn("delete container")
		}
	}()
	if term != nil {
		resize(ctx, c.Init(), term, log)
	}
	if err := c.Start(ctx); err != nil {
		return 0, err
	}
	done := make(chan struct{})
	defer close(done)
	go forward(ctx, c.Init(), term, signals, done, log)
	exit, err := c.Wait(ctx)
	if err != nil {
		return 0, err
	}
	return exit.Status, nil
}

// forward passes signals to the container's init process and terminal size changes to its terminal.
func forward(ctx context.Context, p *container.Process, term console.Console, signals <-chan os.Signal, done <-chan struct{}, log *logrus.Entry) {
	for {
		select {
		case <-done:
			return
		case s := <-signals:
			if s == syscall.SIGWINCH {
				if term != nil {
					resize(ctx, p, term, log)
				}
				continue
			}
			sig, ok := s.(syscall.Signal)
			if !ok {
				continue
			}
			if err := p.Signal(ctx, uint32(sig)); err != nil {
				log.WithError(err).WithField("signal", sig).Debug("forward signal")
			}
		}
	}
}

func resize(ctx context.Context, p *container.Process, term console.Console, log *logrus.Entry) {
	ws, err := term.Size()
	if err != nil || ws.Width == 0 {
		return
	}
	if err := p.Resize(ctx, uint32(ws.Width), uint32(ws.Height)); err != nil {
		log.WithError(err).Debug("resize terminal")
	}
}
