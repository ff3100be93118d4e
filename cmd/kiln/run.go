package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/containerd/console"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/runtime/share"
	"github.com/kiln-runtime/kiln/runtime/stdio"
	"github.com/kiln-runtime/kiln/vm/qemu"
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
	cfg, err := config.Load(configPath)
	if err != nil {
		return 0, err
	}
	log := logrus.WithFields(logrus.Fields{"cmd": "run", "container": id})
	b, err := container.LoadBundle(f.bundle)
	if err != nil {
		return 0, err
	}
	b.Spec.Process.Terminal = f.tty
	if _, err := qemu.Sweep(cfg.Runtime.StateDir); err != nil {
		log.WithError(err).Warn("sweep stale VM state")
	}
	sweepShares(cfg.Runtime.StateDir, log)

	vmID := "run-" + randomID()
	log = log.WithField("vm", vmID)
	sh, err := newShare(cfg.Runtime.StateDir, vmID)
	if err != nil {
		return 0, err
	}
	defer func() {
		if err := sh.Close(); err != nil {
			retErr = errors.Join(retErr, err)
		}
	}()
	qcfg, err := qemu.ConfigFrom(cfg, vmID, log)
	if err != nil {
		return 0, err
	}
	enableShare(&qcfg, sh)
	m, err := qemu.New(qcfg)
	if err != nil {
		return 0, err
	}
	sb, err := sandbox.Start(ctx, m, sandbox.OptionsFrom(cfg, version, log))
	if err != nil {
		return 0, err
	}
	// From here on the run ends only through the container: signals are forwarded, not obeyed.
	ctx = context.WithoutCancel(ctx)
	defer func() {
		if err := sb.Stop(ctx); err != nil {
			retErr = errors.Join(retErr, err)
		}
	}()
	events, err := sb.StreamClient(ctx)
	if err != nil {
		return 0, err
	}
	mgr := container.NewManager(sb.Containers(), m, container.Options{
		RequestTimeout: cfg.Agent.RequestTimeout.Std(), Events: events, Log: log,
	})
	defer mgr.Close()
	return runContainer(ctx, mgr, sh, b, id, log)
}

func runContainer(ctx context.Context, mgr *container.Manager, sh *shareHandle, b *container.Bundle, id string, log *logrus.Entry) (uint32, error) {
	rootfs, err := sh.AddRootfs(ctx, id, b.Rootfs, b.Spec.Root.Readonly)
	if err != nil {
		return 0, err
	}
	defer func() {
		if err := sh.RemoveContainer(ctx, id); err != nil {
			log.WithError(err).Warn("remove container from share")
		}
	}()
	if err := sh.ShareSpecMounts(ctx, id, b.Dir, b.Spec); err != nil {
		return 0, err
	}

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
	raw, err := json.Marshal(b.Spec)
	if err != nil {
		return 0, fmt.Errorf("encode spec of container %s: %w", id, err)
	}

	signals := make(chan os.Signal, 16)
	signal.Notify(signals, append(forwardedSignals(), syscall.SIGWINCH)...)
	defer signal.Stop(signals)

	c, err := mgr.Create(ctx, container.CreateOptions{ID: id, Spec: raw, Rootfs: rootfs, IO: io})
	if err != nil {
		return 0, err
	}
	defer func() {
		if err := c.Delete(ctx, true); err != nil {
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

// A VM's shared directory is <state>/<vm>.share, beside the VM's own state directory rather than inside it:
// that one is removed recursively when the VM ends, and a share holds bind mounts of the user's files. The
// owner file, written first, names the kiln process, so that a later run can tell a share whose kiln was killed
// from one whose VM is still booting.
func sharePaths(stateDir, vmID string) (dir, owner string) {
	return filepath.Join(stateDir, vmID+".share"), filepath.Join(stateDir, vmID+".share-owner")
}

// shareHandle is a share with its owner file.
type shareHandle struct {
	*share.Share
	owner string
}

func newShare(stateDir, vmID string) (*shareHandle, error) {
	dir, owner := sharePaths(stateDir, vmID)
	if err := os.MkdirAll(stateDir, 0o711); err != nil {
		return nil, fmt.Errorf("create state dir %s: %w", stateDir, err)
	}
	if err := os.WriteFile(owner, []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return nil, fmt.Errorf("write share owner file: %w", err)
	}
	sh, err := share.New(dir)
	if err != nil {
		_ = os.Remove(owner)
		return nil, err
	}
	return &shareHandle{Share: sh, owner: owner}, nil
}

// Close removes the share, then its owner file.
func (h *shareHandle) Close() error {
	if err := h.Share.Close(); err != nil {
		return err
	}
	return os.Remove(h.owner)
}

// sweepShares removes the shares whose kiln process is gone.
func sweepShares(stateDir string, log *logrus.Entry) {
	owners, _ := filepath.Glob(filepath.Join(stateDir, "*.share-owner"))
	for _, owner := range owners {
		pid, err := qemu.ReadOwner(owner)
		if err != nil || qemu.OwnerAlive(pid) {
			continue
		}
		dir := strings.TrimSuffix(owner, "-owner")
		if err := share.Remove(dir); err != nil {
			log.WithError(err).Warn("remove stale share")
			continue
		}
		_ = os.Remove(owner)
	}
}

// enableShare exports the share to the VM through virtio-fs.
func enableShare(qcfg *qemu.Config, sh *shareHandle) { qcfg.SharedDir = sh.ExportDir() }
