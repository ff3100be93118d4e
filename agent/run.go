package agent

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/agent/network"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Config is what differs between guest programs built on the agent.
type Config struct {
	// Version is the agent's build version, reported over the API.
	Version string
	// Services, when set, starts the program's extra services after Init and
	// before the agent API listens; it must not block. Its error is fatal.
	Services func(ctx context.Context, log *logrus.Entry) error
	// Containers, when set, builds the Containers service after Init. It
	// gets the guest's reaper, with which anything that waits for its own
	// children must coordinate. Its error is fatal. When it runs only
	// /proc, /sys and /run are mounted; the service's requests (but not
	// its Events stream) are held until the rest of the guest's setup, the
	// shared directory among it, is done. It is a hook rather than part of
	// this package because the container runtime needs cgo (runc's nsenter)
	// and guest programs without containers stay pure Go.
	// It also gets the pod's network namespace, which its containers join.
	Containers func(ctx context.Context, log *logrus.Entry, reaper *Reaper, pod *network.Pod) (agentv1.ContainersService, error)
	// Warm, when set, runs in a template guest before its save: it builds what the program's own libraries
	// build at first use and keep, so that the template's clones inherit it (see warmForClones). Its error is
	// logged, not fatal.
	Warm func() error
}

// PodNetNS is where the agent keeps the pod's network namespace (see agent/network).
const PodNetNS = "/run/kiln/netns/pod"

// Timings of the power-off after a Shutdown request.
const (
	// ttrpc's Server.Shutdown may close a connection whose request has been
	// handled but whose reply is not written yet (it sees the connection as
	// idle until the reply goes out). So after a Shutdown request the agent
	// waits for the host, which hangs up once it has the reply, for at most
	// this long.
	shutdownReplyGrace = 100 * time.Millisecond
	// The host usually hangs up by itself; a stuck client must not keep the
	// guest up.
	shutdownDrainTimeout = 2 * time.Second
)

// Run is the whole life of the agent as PID 1: prepare the guest, serve the
// agent API on vsock, and power off when asked to (by the Shutdown request or
// by a signal). It never returns; any fatal error is logged on the console
// and powers the guest off.
func Run(ctx context.Context, cfg Config) {
	startedAt := time.Now()
	logger := NewLogger(os.Stderr)
	log := logrus.NewEntry(logger)
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "kiln agent: must run as PID 1 inside a Kiln guest")
		os.Exit(1)
	}
	defer func() {
		// A panic in this goroutine would end PID 1; power off cleanly instead.
		if r := recover(); r != nil {
			Fatal(log, fmt.Errorf("panic: %v", r))
		}
	}()

	// Go installs handlers for every signal and exits on SIGTERM or SIGINT
	// by default; for PID 1 that would be a kernel panic.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT,
		unix.SIGUSR1, unix.SIGUSR2, unix.SIGPWR)

	// The guest's uptime here, beside the kernel's "Run /init" console line, shows what the exec of /init and
	// the Go runtime's start cost. It is logged once the API listens: under emulation the first log line costs
	// about 9 ms (logrus's formatter runs for the first time, and the serial console is emulated too).
	started := sinceBoot()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	guest, err := Init(ctx, logger)
	if err != nil {
		Fatal(log, fmt.Errorf("init guest: %w", err))
	}
	pod := network.New(PodNetNS, log.WithField("service", "network"))
	var containers agentv1.ContainersService
	if cfg.Containers != nil {
		start := time.Now()
		if containers, err = cfg.Containers(ctx, log, guest.Reaper, pod); err != nil {
			Fatal(log, fmt.Errorf("start container service: %w", err))
		}
		log.WithField("took", time.Since(start)).Debug("container service created")
	}

	// Extra services come first so that a host that reaches the agent API
	// finds them listening too.
	if cfg.Services != nil {
		if err := cfg.Services(ctx, log); err != nil {
			Fatal(log, fmt.Errorf("start services: %w", err))
		}
	}
	l, err := ListenVsock(log, APIPort, 0)
	if err != nil {
		Fatal(log, err)
	}
	shutdown := make(chan string, 1)
	answered, restored := setupHooks(guest, pod)
	srv, err := NewServer(log, ServerConfig{
		Version:    cfg.Version,
		Root:       "/",
		StartedAt:  startedAt,
		Containers: containers,
		Network:    pod,
		Ready:      guest.Ready,
		Answered:   answered,
		Seeder:     KernelSeeder{},
		Memory:     &GuestMemory{Sys: "/sys", Threads: guest.Threads},
		CPUs:       &GuestCPUs{Sys: "/sys"},
		Restored:   restored,
		OnShutdown: func(reason string) {
			select {
			case shutdown <- "shutdown request: " + reason:
			default:
			}
		},
	})
	if err != nil {
		Fatal(log, err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()

	log.WithFields(logrus.Fields{
		"version": cfg.Version, "port": APIPort, "started": started, "init": time.Since(startedAt), "uptime": sinceBoot(),
	}).Info("agent API ready")
	if guest.Template() {
		go func() {
			warmForClones(log, cfg.Warm)
			guest.AnnounceTemplate(ctx, logger.Out)
		}()
	} else {
		go AnnounceReady(log)
	}

	requested, err := waitForShutdown(log, shutdown, signals, served)
	if err != nil {
		Fatal(log, err)
	}
	if requested {
		graceCtx, graceCancel := context.WithTimeout(ctx, shutdownReplyGrace)
		if err := srv.WaitHungUp(graceCtx); err != nil {
			log.Debug("the host did not hang up after its Shutdown request")
		}
		graceCancel()
	}
	drainCtx, drainCancel := context.WithTimeout(ctx, shutdownDrainTimeout)
	if err := srv.Shutdown(drainCtx); err != nil {
		log.WithError(err).Warn("closing agent API connections")
	}
	drainCancel()
	cancel()
	PowerOff(log)
}

// waitForShutdown returns when the guest should power off in order, requested
// saying whether a Shutdown request (not a signal) asked for it, and with an
// error when the agent API stopped serving by itself.
func waitForShutdown(log *logrus.Entry, shutdown <-chan string, signals <-chan os.Signal, served <-chan error) (requested bool, err error) {
	for {
		select {
		case reason := <-shutdown:
			log.WithField("reason", reason).Info("shutting down")
			return true, nil
		case sig := <-signals:
			if sig == unix.SIGHUP {
				log.Info("ignoring SIGHUP")
				continue
			}
			log.WithField("signal", sig).Info("shutting down on signal")
			return false, nil
		case err := <-served:
			if err == nil {
				err = fmt.Errorf("agent API server stopped")
			}
			return false, err
		}
	}
}

// sinceBoot is the guest's uptime (CLOCK_BOOTTIME), zero if unreadable.
func sinceBoot() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// setupGuest is what setupHooks needs of the guest (*Guest).
type setupGuest interface {
	Proceed()
	Template() bool
	Restored(ctx context.Context) error
}

// setupHooks returns the server's Answered and Restored hooks. The guest's setup, and the pod namespace's
// creation, wait for the host's first request so as not to slow its answer down. A template guest is saved
// before any request, and each clone makes its namespace only once SeedGuest gave it entropy of its own: the
// namespace's random hash mix would otherwise come from the kernel's generator as the template saved it, the same
// in every clone.
func setupHooks(guest setupGuest, pod interface{ Prepare() }) (answered func(), restored func(context.Context) error) {
	answered = func() {
		guest.Proceed()
		if !guest.Template() {
			pod.Prepare()
		}
	}
	restored = func(ctx context.Context) error {
		if err := guest.Restored(ctx); err != nil {
			return err
		}
		pod.Prepare()
		return nil
	}
	return answered, restored
}
