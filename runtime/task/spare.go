package task

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"reflect"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/spare"
	"github.com/kiln-runtime/kiln/runtime/standin"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// SpareNice is the nice value a spare shim boots and warms its VM at (QEMU and virtiofsd inherit it), so that it
// takes only CPU nothing else wants: it is started while its spawner's task runs, and the host's next task may
// come before it is ready. The task that takes it puts every process back to 0.
const SpareNice = 19

// Spare is the pod of a spare shim (runtime/spare): booted and warmed before the shim knew its task. The task
// service's first Create takes it when it fits the task, and stops it otherwise.
type Spare struct {
	pod  *pod.Pod
	cfg  config.Config
	warm pod.WarmUp
	// threads holds the pod's stand-ins, and those of any pod the task service boots instead (NewService).
	threads *standin.Pool

	mu  sync.Mutex
	svc *Service
}

// SpareShape is the VM shape a spare shim boots: that of the task whose shim started it (pod.Size: the
// configuration's VM grown by the task's resources), so that the next task like it fits the spare; but for a VM
// that can grow, the memory and vCPUs it boots with, so that a task of any size fits it (config.Hypervisor.
// MemoryLayout and CPULayout). It travels on the spare's command line (SpareShapeFlag) as JSON.
type SpareShape struct {
	VCPUs        int      `json:"vcpus"`
	MemoryMiB    int      `json:"memory_mib"`
	KernelParams []string `json:"kernel_params,omitempty"`
}

// SpareShapeFlag is the spare's command-line flag that carries its SpareShape.
const SpareShapeFlag = "shape"

func shapeOf(sized config.Config) SpareShape {
	h := sized.Hypervisor
	mem, vcpus := h.MemoryMiB, h.VCPUs
	if boot, ram := h.MemoryLayout(); boot < ram {
		mem = h.BootMemory()
	}
	if boot, most := h.CPULayout(); boot < most {
		vcpus = boot
	}
	return SpareShape{VCPUs: vcpus, MemoryMiB: mem, KernelParams: h.KernelParams}
}

// sized is cfg with the shape's VM, checked as a configuration is. A shape's kernel parameters are cfg's and the
// task's: none leaves cfg's as they are (nil or empty), so that an unsized task compares equal to the spare.
func (sh SpareShape) sized(cfg config.Config) (config.Config, error) {
	cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB = sh.VCPUs, sh.MemoryMiB
	if len(sh.KernelParams) > 0 {
		cfg.Hypervisor.KernelParams = append([]string(nil), sh.KernelParams...)
	}
	if err := cfg.Validate(); err != nil {
		return config.Config{}, fmt.Errorf("spare shim shape %+v: %w", sh, err)
	}
	return cfg, nil
}

// SpareBoot is what BootSpare boots a spare shim's pod from.
type SpareBoot struct {
	// ConfigPath is the Kiln configuration (config.Load's rules), Shape the VM's shape (SpareShapeFlag's JSON;
	// empty: the configuration's own).
	ConfigPath, Shape string
	// Version is the shim's own (pod.Options.HostVersion).
	Version string
	Log     *logrus.Entry
	// Hold, when set, is handed the VM's programs as they start (pod.Options.Hold), for the spare's holder
	// (spare.Holder).
	Hold func(qemu.Holdable)
	// Turn, when set, is waited for before the boot, with the VM's vCPUs (spare.WaitTurn); its release is called
	// once the VM is warmed or every attempt failed. A spare that cannot take one boots without it.
	Turn func(ctx context.Context, vcpus int) (release func(), err error)
}

// BootSpare boots and warms a spare shim's pod as b says.
func BootSpare(ctx context.Context, b SpareBoot) (*Spare, error) {
	log := b.Log
	cfg, err := config.Load(b.ConfigPath)
	if err != nil {
		return nil, fmt.Errorf("spare shim: load kiln configuration: %w", err)
	}
	sh := shapeOf(cfg)
	if b.Shape != "" {
		if err := json.Unmarshal([]byte(b.Shape), &sh); err != nil {
			return nil, fmt.Errorf("spare shim: -%s %q: %w", SpareShapeFlag, b.Shape, err)
		}
	}
	sized, err := sh.sized(cfg)
	if err != nil {
		return nil, err
	}
	release, err := spareTurn(ctx, log, b.Turn, sized.Hypervisor.VCPUs)
	if err != nil {
		return nil, err
	}
	defer release()
	threads, err := standin.NewPool()
	if err != nil {
		return nil, fmt.Errorf("spare shim: %w", err)
	}
	sp := &Spare{cfg: cfg, threads: threads}
	err = retryBoot(ctx, log, spareBootAttempts, func() error {
		id := make([]byte, 8)
		if _, err := rand.Read(id); err != nil {
			return fmt.Errorf("spare shim: %w", err)
		}
		// The task's group is not known yet: the id is random, of VMID's form.
		p, err := pod.New(ctx, pod.Options{
			ID: vmID(id), Config: sized, HostVersion: b.Version, Log: log,
			OnEvent: sp.onEvent, OnExit: sp.onExit, Background: true, Hold: b.Hold, StandIns: threads,
		})
		if err != nil {
			return err
		}
		warm, err := p.Warm(ctx)
		if err != nil {
			_ = p.Close(context.WithoutCancel(ctx))
			return err
		}
		sp.pod, sp.warm = p, warm
		return nil
	})
	if err != nil {
		return nil, err
	}
	warm := sp.warm
	log.WithFields(logrus.Fields{"container": warm.Container.Round(time.Millisecond), "network_rehearsed": warm.NetworkRehearsed,
		"network": warm.Network.Round(time.Millisecond)}).Info("spare's VM warmed")
	return sp, nil
}

// spareTurn waits for the spare's turn to boot (SpareBoot.Turn) and returns its release. It fails only when ctx
// ends: the turns only pace spares, and one that cannot take a turn (its lock file cannot be made) boots without.
func spareTurn(ctx context.Context, log *logrus.Entry, turn func(context.Context, int) (func(), error), vcpus int) (func(), error) {
	none := func() {}
	if turn == nil {
		return none, nil
	}
	start := time.Now()
	release, err := turn(ctx, vcpus)
	switch {
	case ctx.Err() != nil:
		if err == nil {
			release()
			err = context.Cause(ctx)
		}
		return nil, err
	case err != nil:
		log.WithError(err).Warn("the spare boots without a turn")
		return none, nil
	}
	log.WithField("waited", time.Since(start).Round(time.Millisecond)).Info("the spare's turn to boot")
	return release, nil
}

// spareBootAttempts is how many VMs a spare shim boots and warms before it gives up. It boots at the lowest
// priority while tasks start beside it, and under TCG a burst of tasks with a pool refilling beside it can hold
// a warm-up's request past agent.request_timeout: make bench's pool of 10, its nine spares warming at once
// behind ten pods, lost one that way (docs/fast-start-log.md, session 28), and its slot stayed empty until the next
// task's start. Spares now boot in turns (spare.WaitTurn), but a host loaded otherwise can still hold one that
// long. Another VM boots once the load is over; a fault that persists fails each attempt, and the spare leaves
// as before.
const spareBootAttempts = 3

// retryBoot calls boot until it succeeds, at most attempts times, logging each failure it retries. It stops
// retrying once ctx is done (the spare was told to stop) and returns the last error.
func retryBoot(ctx context.Context, log *logrus.Entry, attempts int, boot func() error) error {
	for attempt := 1; ; attempt++ {
		err := boot()
		if err == nil || ctx.Err() != nil || attempt >= attempts {
			return err
		}
		log.WithError(err).WithField("attempt", attempt).Warn("the spare's VM did not boot and warm; booting another")
	}
}

// Lost is closed when the spare's VM ends (its QEMU killed while it waited).
func (sp *Spare) Lost() <-chan struct{} { return sp.pod.Machine().Exited() }

// Close stops the spare's pod, for which no task came (none: nothing to stop).
func (sp *Spare) Close(ctx context.Context) error {
	if sp.pod == nil {
		return nil
	}
	return sp.pod.Close(ctx)
}

// spareTaskBound bounds how long a shim a spare was handed to waits for its task's first Create, which containerd
// sends right after `start`. One that never comes (containerd killed or restarted between the hand-over and its
// record of the shim, or `start` killed by its caller, after which containerd removes the bundle and runs no
// `shim delete`) would leave the warm VM running with no one to stop it: the spare left its slot, so neither the
// pool nor `kiln spare stop` finds it.
const spareTaskBound = 5 * time.Minute

// awaitTask ends the shim when its spare is still untaken after bound, and nothing (a task, a Create, a Delete)
// is under way; with something under way it looks again a bound later (a Create may fail before it takes the
// spare, and no Shutdown follow), until a Create took the spare.
func (s *Service) awaitTask(bound time.Duration) {
	t := time.NewTicker(bound)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-s.ctx.Done():
			return
		}
		s.bootMu.Lock()
		untaken := s.spare != nil
		s.bootMu.Unlock()
		if !untaken {
			return
		}
		if s.busy() {
			continue
		}
		log.G(s.ctx).WithField("waited", bound).Warn("no task came to the spare shim it was handed to; stopping its VM and the shim")
		s.shutdownNow(s.ctx)
		return
	}
}

// stop stops the spare's pod, which its task did not take, logging a failure.
func (sp *Spare) stop(ctx context.Context, log *logrus.Entry) {
	if err := sp.Close(context.WithoutCancel(ctx)); err != nil {
		log.WithError(err).Warn("stop the spare shim's VM")
	}
}

// Fits says whether the spare's pod can serve the task `start` hands over (spare.Fits), as its Create would
// decide: a spare declines a task it does not fit, which then boots its own VM, and waits for the next. A task
// its Create would refuse whatever the VM (its spec, its configuration) is declined as spare.ErrRefused, so that
// a client retrying it neither uses up warm VMs nor makes the pool leave.
func (sp *Spare) Fits(req spare.Request) error {
	err := sp.fits(req)
	if err != nil && !errors.Is(err, pod.ErrUnfit) {
		return fmt.Errorf("%w: %w", spare.ErrRefused, err)
	}
	return err
}

func (sp *Spare) fits(req spare.Request) error {
	if req.Task == nil {
		return nil
	}
	// First: a stale spare leaves at once, whatever the task.
	if err := sp.stale(); err != nil {
		return err
	}
	cfg, err := config.Load(req.Task.ConfigPath)
	if err != nil {
		return fmt.Errorf("load the task's Kiln configuration: %w", err)
	}
	b, err := bundle.Load(req.Dir)
	if err != nil {
		return err
	}
	if _, err := pod.CheckSpec(cfg, req.Task.ID, b.Spec); err != nil {
		return err
	}
	return sp.refuses(cfg, &pod.First{ID: req.Task.ID, Bundle: b})
}

// guestOrigin is what a spare's VM tells of the files its guest came from (*qemu.Machine).
type guestOrigin interface {
	FilesChanged() error
}

// refuses says why the spare's pod cannot be the pod of first, booted with cfg, touching nothing (pod.Refuses).
// A spare whose guest came from files replaced since (QEMU upgraded, the guest rebuilt, with the shim binary
// unchanged) is stale, as one of another shim's version is: it leaves, and the spares after it boot the new
// guest.
func (sp *Spare) refuses(cfg config.Config, first *pod.First) error {
	if !reflect.DeepEqual(cfg, sp.cfg) {
		return fmt.Errorf("%w: the task's Kiln configuration differs from the one the spare booted with", pod.ErrUnfit)
	}
	if err := sp.stale(); err != nil {
		return err
	}
	return sp.pod.Refuses(cfg, first)
}

// stale says, as a spare.ErrStale, why the spare's guest is not the one a task would boot now: it came from files
// replaced since (guestOrigin).
func (sp *Spare) stale() error {
	if sp.pod == nil {
		return nil // no VM yet
	}
	if m, ok := sp.pod.Machine().(guestOrigin); ok {
		if err := m.FilesChanged(); err != nil {
			return fmt.Errorf("%w: the spare's guest came from other files: %w", spare.ErrStale, err)
		}
	}
	return nil
}

// The pod's events go to the task service that took it; there is none before (the warm-up's are dropped).
func (sp *Spare) onEvent(e container.Event) {
	if s := sp.service(); s != nil {
		s.onEvent(e)
	}
}

func (sp *Spare) onExit(p *container.Process, e container.Exit) {
	if s := sp.service(); s != nil {
		s.onExit(p, e)
	}
}

func (sp *Spare) service() *Service {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.svc
}

func (sp *Spare) bind(s *Service) {
	sp.mu.Lock()
	sp.svc = s
	sp.mu.Unlock()
}

// takeSpare returns the pod this shim held as a spare when it fits the task's first container, having moved it
// into the task's cgroup; nil when there is none or it does not fit, in which case it is stopped. A spare that
// failed once first's create hooks had run leaves what they prepared in net, for the pod booted instead; a failed
// hook is err, the task's own failure.
func (s *Service) takeSpare(ctx context.Context, cfg config.Config, first *pod.First, log *logrus.Entry) (_ *pod.Pod, net *pod.Network, err error) {
	sp := s.spare
	s.spare = nil
	if sp == nil {
		return nil, nil, nil
	}
	// This shim was a spare, at SpareNice: its task runs at the usual priority, in the spare's VM or in one it
	// boots now (whose processes inherit the shim's).
	if err := unix.Setpriority(unix.PRIO_PGRP, 0, 0); err != nil {
		log.WithError(err).Warn("restore the priority of the spare shim")
	}
	if err := sp.refuses(cfg, first); err != nil {
		// Refused before anything of the spare's moved: its VM stops beside the task's start instead of before
		// it (a VM stop, about 60 ms under TCG); stopPod waits for it.
		log.WithError(err).Info("the spare shim's VM does not fit the task; booting one")
		s.spareStops.Add(1)
		go func() {
			defer s.spareStops.Done()
			sp.stop(ctx, log)
		}()
		return nil, nil, nil
	}
	// The spare's VM booted at the lowest priority too; back to the usual before Adopt, whose health check of the
	// guest would otherwise compete at nice 19 with whatever loads the host.
	if err := sp.pod.Foreground(); err != nil {
		log.WithError(err).Warn("restore the priority of the spare's VM")
	}
	if err := sp.pod.TakeShimOOMScore(); err != nil {
		log.WithError(err).Warn("the spare's VM keeps a spare's standing with the host's OOM killer")
	}
	start := time.Now()
	err = sp.pod.Adopt(ctx, cfg, first)
	if err == nil {
		p := sp.pod
		log.WithFields(logrus.Fields{"sandbox": p.ID(), "took": time.Since(start), "network_rehearsed": sp.warm.NetworkRehearsed}).Info("the spare shim's warm VM runs the task")
		return p, nil, nil
	}
	if errors.Is(err, pod.ErrHook) {
		sp.stop(ctx, log)
		return nil, nil, err
	}
	net = sp.pod.TakeNetwork()
	log.WithError(err).WithField("hooks_ran", net != nil).Info("the spare shim's VM could not take the task; booting one")
	sp.stop(ctx, log)
	return nil, net, nil
}

// startSpare fills this containerd's spare pool (hypervisor.spare_pool) for the next tasks, with spare shims of the
// shape of this one's pod (sized), held back until this shim's first container has started (releaseSpare). A
// spare that cannot start is logged: the tasks boot their VMs as before.
func (s *Service) startSpare(configPath string, sized config.Config, log *logrus.Entry) {
	if s.containerd == "" || s.spareGate != nil {
		return
	}
	shape, err := json.Marshal(shapeOf(sized))
	if err != nil {
		log.WithError(err).Warn("start a spare shim")
		return
	}
	self, err := os.Executable()
	if err == nil {
		s.spareGate, err = spare.Spawn(self, s.containerd, sized.Hypervisor.SparePool, configPath, "-"+SpareShapeFlag, string(shape))
	}
	if err != nil {
		log.WithError(err).Warn("start a spare shim")
	}
}

// holdTimeout bounds taking the holds of a container's create or an exec's start: a hold is a connection to a
// local socket.
const holdTimeout = time.Second

// holdSpares holds the spares of this shim's containerd still booting, while a container is created and started
// or an exec starts: under TCG a spare booting beside them delays them even at the lowest CPU weight
// (runtime/spare). For a pod's first container that adds to what `start` held (held); for its later ones (a CRI
// pod's containers after its sandbox, which come once kubelet has pulled their images) and for execs (probes
// among them) these are the only holds.
func (s *Service) holdSpares(ctx context.Context) *spare.Held {
	if s.containerd == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, holdTimeout)
	defer cancel()
	holds := spare.Hold(ctx, s.containerd)
	if len(holds) == 0 {
		return nil
	}
	return spare.NewHeld(holds)
}

// createHolds takes the holds container id's create kept (Create), to let go once it has started or is deleted.
func (s *Service) createHolds(id string) *spare.Held {
	s.mu.Lock()
	defer s.mu.Unlock()
	held := s.creates[id]
	delete(s.creates, id)
	return held
}

// letGo lets go of the spares held for container id's create and start, or for exec execID's start.
func (s *Service) letGo(id, execID string, held *spare.Held) {
	n := held.Release()
	if n == 0 {
		return
	}
	l := s.log(id, execID).WithField("spares", n)
	if execID != "" {
		// Exec probes come every few seconds.
		l.Debug("the booting spares the exec's start held go on")
		return
	}
	l.Info("the booting spares the container's create held go on")
}

// spareDelay is how long after this shim's first container started the spare it started may boot (this shim's
// exit lets it boot at once): a short task such as `ctr run --rm` is over by then, and a spare booting beside
// a task's start or stop slows it down under TCG even at the lowest priority.
const spareDelay = 2 * time.Second

// releaseSpare lets the spare shim this shim started boot, spareDelay from now.
func (s *Service) releaseSpare() {
	s.bootMu.Lock()
	gate := s.spareGate
	s.spareGate = nil
	s.bootMu.Unlock()
	if gate != nil {
		time.AfterFunc(spareDelay, func() { _ = gate.Close() })
	}
}
