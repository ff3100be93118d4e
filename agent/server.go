package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// ServerConfig is what the agent API needs from the program serving it.
type ServerConfig struct {
	// Version is reported by Health.Check and Agent.GuestInfo.
	Version string
	// Root is where the kernel's files are read from: "/" in the guest.
	Root string
	// StartedAt is when the agent process started; GuestInfo reports the time
	// from it to NewServer as the agent's init time. Zero reports none.
	StartedAt time.Time
	// OnShutdown is called once, from the first Shutdown request, before that
	// request is answered; it must not block. It is how the owner of the
	// server learns it must power the guest off. Nil refuses Shutdown.
	OnShutdown func(reason string)
	// Containers, when set, is served as the Containers service.
	Containers agentv1.ContainersService
	// Network, when set, is served as the Network service; its requests wait for Ready too.
	Network agentv1.NetworkService
	// Ready, when set, reports whether the guest's setup that the API is
	// served before (the shared directory and the file systems containers
	// need) is done; Containers requests wait for it, up to ReadyTimeout. The
	// Events stream does not: it needs nothing of that setup.
	Ready func(ctx context.Context) error
	// Answered, when set, is called after each request has been handled
	// (before its reply is written); it must not block.
	Answered func()
	// Seeder, when set, takes SeedGuest's entropy and time and Clock's corrections; nil refuses both.
	Seeder Seeder
	// Memory, when set, grows the guest's memory for AddMemory; nil refuses it.
	Memory MemoryAdder
	// CPUs, when set, brings vCPUs online for AddVCPUs; nil refuses it.
	CPUs CPUAdder
	// Restored, when set, runs after SeedGuest has seeded the guest, before it answers: a guest restored from a
	// template finishes its setup there (Guest.Restored). Its error fails SeedGuest.
	Restored func(ctx context.Context) error
}

// ReadyTimeout bounds a Containers request's wait for the guest's setup;
// under emulation that setup takes a fraction of a second.
const ReadyTimeout = 30 * time.Second

// Server serves the agent API (Health and Agent services) with ttrpc.
type Server struct {
	cfg          ServerConfig
	log          *logrus.Entry
	ttrpc        *ttrpc.Server
	agentInit    time.Duration
	shuttingDown atomic.Bool
	shutdownOnce sync.Once
	conns        *openConns
}

// NewServer builds a server; it serves nothing until Serve.
func NewServer(log *logrus.Entry, cfg ServerConfig) (*Server, error) {
	if cfg.Root == "" {
		cfg.Root = "/"
	}
	s := &Server{cfg: cfg, log: log, conns: newOpenConns()}
	if !cfg.StartedAt.IsZero() {
		s.agentInit = time.Since(cfg.StartedAt)
	}
	t, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(s.logCall))
	if err != nil {
		return nil, fmt.Errorf("create ttrpc server: %w", err)
	}
	s.ttrpc = t
	agentv1.RegisterHealthService(t, healthService{s})
	agentv1.RegisterAgentService(t, agentService{s})
	if cfg.Containers != nil {
		agentv1.RegisterContainersService(t, cfg.Containers)
	}
	if cfg.Network != nil {
		agentv1.RegisterNetworkService(t, cfg.Network)
	}
	return s, nil
}

// Serve accepts connections on l until Shutdown; it returns nil after a
// Shutdown and the listener's error otherwise. It may be called for several
// listeners at once.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	err := s.ttrpc.Serve(ctx, countingListener{Listener: l, conns: s.conns})
	if errors.Is(err, ttrpc.ErrServerClosed) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("serve agent API on %s: %w", l.Addr(), err)
	}
	return nil
}

// WaitHungUp returns once no connection to the API is open (the host has hung up), or with ctx's error.
func (s *Server) WaitHungUp(ctx context.Context) error { return s.conns.waitNone(ctx) }

// Shutdown closes the listeners, then each connection once it has no
// request in flight, and returns when all are closed or ctx is done.
func (s *Server) Shutdown(ctx context.Context) error {
	s.shuttingDown.Store(true)
	if err := s.ttrpc.Shutdown(ctx); err != nil {
		return fmt.Errorf("shut down agent API server: %w", err)
	}
	return nil
}

func (s *Server) logCall(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (resp any, err error) {
	start := time.Now()
	defer func() {
		// The agent is PID 1: a handler's panic (one reading what a container controls) must fail its request,
		// not end the guest.
		if r := recover(); r != nil {
			s.log.WithFields(logrus.Fields{"method": info.FullMethod, "panic": r, "stack": string(debug.Stack())}).Error("request handler panicked")
			resp, err = nil, status.Errorf(codes.Internal, "%s: the agent's handler failed: %v", info.FullMethod, r)
		}
	}()
	resp, err = s.call(ctx, unmarshal, info, method)
	entry := s.log.WithFields(logrus.Fields{"method": info.FullMethod, "took": time.Since(start)})
	if err != nil {
		entry.WithError(err).Warn("request failed")
	} else {
		entry.Debug("request")
	}
	return resp, err
}

// Full method names of the requests held until the guest is ready: they need what the guest sets up after the
// API's first answer (the late base file systems such as /dev and cgroup2, the shared directory, loopback).
const (
	containersPrefix = "/kiln.agent.v1.Containers/"
	networkPrefix    = "/kiln.agent.v1.Network/"
)

// call runs a request, holding Containers requests until the guest is ready.
func (s *Server) call(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (any, error) {
	if s.cfg.Ready != nil && (strings.HasPrefix(info.FullMethod, containersPrefix) || strings.HasPrefix(info.FullMethod, networkPrefix)) {
		rctx, cancel := context.WithTimeout(ctx, ReadyTimeout)
		err := s.cfg.Ready(rctx)
		cancel()
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "%s: guest not ready: %v", info.FullMethod, err)
		}
	}
	resp, err := method(ctx, unmarshal)
	if s.cfg.Answered != nil {
		s.cfg.Answered()
	}
	return resp, err
}

type healthService struct{ s *Server }

func (h healthService) Check(context.Context, *agentv1.CheckRequest) (*agentv1.CheckResponse, error) {
	status := agentv1.CheckResponse_SERVING
	if h.s.shuttingDown.Load() {
		status = agentv1.CheckResponse_NOT_SERVING
	}
	return &agentv1.CheckResponse{Status: status, AgentVersion: h.s.cfg.Version}, nil
}

type agentService struct{ s *Server }

func (a agentService) GuestInfo(context.Context, *agentv1.GuestInfoRequest) (*agentv1.GuestInfo, error) {
	info, err := ReadGuestInfo(a.s.cfg.Root)
	if err != nil {
		return nil, err
	}
	info.AgentVersion = a.s.cfg.Version
	if exe, err := os.Executable(); err == nil {
		info.AgentExecutable = exe
	}
	if a.s.agentInit > 0 {
		info.AgentInit = durationpb.New(a.s.agentInit)
	}
	info.RandomReady = randomReady()
	info.WallClockUnixNano = time.Now().UnixNano()
	return info, nil
}

func (a agentService) SeedGuest(ctx context.Context, req *agentv1.SeedGuestRequest) (*agentv1.SeedGuestResponse, error) {
	if a.s.cfg.Seeder == nil {
		return nil, status.Error(codes.Unimplemented, "seeding is not available in this agent")
	}
	if n := len(req.GetEntropy()); n < MinSeedEntropy || n > MaxSeedEntropy {
		return nil, status.Errorf(codes.InvalidArgument, "seed: %d bytes of entropy, want %d to %d", n, MinSeedEntropy, MaxSeedEntropy)
	}
	ns := req.GetWallClockUnixNano()
	if ns < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "seed: wall clock %d is before 1970", ns)
	}
	if err := a.s.cfg.Seeder.AddEntropy(req.GetEntropy()); err != nil {
		return nil, err
	}
	if ns != 0 {
		if err := a.s.cfg.Seeder.SetClock(time.Unix(0, ns)); err != nil {
			return nil, err
		}
	}
	if a.s.cfg.Restored != nil {
		if err := a.s.cfg.Restored(ctx); err != nil {
			return nil, status.Errorf(codes.Unavailable, "seed: %v", err)
		}
	}
	return &agentv1.SeedGuestResponse{}, nil
}

func (a agentService) Clock(_ context.Context, req *agentv1.ClockRequest) (*agentv1.ClockResponse, error) {
	if a.s.cfg.Seeder == nil {
		return nil, status.Error(codes.Unimplemented, "the clock cannot be set in this agent")
	}
	d := time.Duration(req.GetAdjustNanos())
	switch {
	case d == 0:
	case !req.GetStep() && (d > MaxClockSlew || d < -MaxClockSlew):
		return nil, status.Errorf(codes.InvalidArgument, "clock: a slew of %s, more than %s: step it", d, MaxClockSlew)
	case req.GetStep() && time.Now().Add(d).Before(time.Unix(0, 0)):
		return nil, status.Errorf(codes.InvalidArgument, "clock: a step of %s would set the clock before 1970", d)
	default:
		if err := a.s.cfg.Seeder.AdjustClock(d, req.GetStep()); err != nil {
			return nil, status.Errorf(codes.Internal, "clock: %v", err)
		}
	}
	return &agentv1.ClockResponse{WallClockUnixNano: time.Now().UnixNano()}, nil
}

// MemoryAdder grows the guest's memory (GuestMemory).
type MemoryAdder interface {
	Add(mib uint64) (have, block uint64, err error)
}

func (a agentService) AddMemory(_ context.Context, req *agentv1.AddMemoryRequest) (*agentv1.AddMemoryResponse, error) {
	if a.s.cfg.Memory == nil {
		return nil, status.Error(codes.Unimplemented, "memory cannot be added in this agent")
	}
	have, block, err := a.s.cfg.Memory.Add(req.GetMemoryMib())
	switch {
	case errors.Is(err, ErrNoRAM):
		return nil, status.Errorf(codes.ResourceExhausted, "%v", err)
	case errors.Is(err, ErrNoHotplug):
		return nil, status.Errorf(codes.Unimplemented, "%v", err)
	case err != nil:
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	return &agentv1.AddMemoryResponse{MemoryMib: have, MemoryBlockSizeMib: block}, nil
}

// CPUAdder brings the guest's vCPUs online (GuestCPUs).
type CPUAdder interface {
	Add(n int) (int, error)
}

func (a agentService) AddVCPUs(_ context.Context, req *agentv1.AddVCPUsRequest) (*agentv1.AddVCPUsResponse, error) {
	if a.s.cfg.CPUs == nil {
		return nil, status.Error(codes.Unimplemented, "vCPUs cannot be brought online in this agent")
	}
	have, err := a.s.cfg.CPUs.Add(int(min(req.GetVcpus(), maxCPU)))
	switch {
	case errors.Is(err, ErrNoCPU):
		return nil, status.Errorf(codes.ResourceExhausted, "%v", err)
	case errors.Is(err, ErrNoHotplug):
		return nil, status.Errorf(codes.Unimplemented, "%v", err)
	case err != nil:
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	return &agentv1.AddVCPUsResponse{Vcpus: uint32(have)}, nil
}

func (a agentService) Shutdown(_ context.Context, req *agentv1.ShutdownRequest) (*agentv1.ShutdownResponse, error) {
	if a.s.cfg.OnShutdown == nil {
		return nil, errors.New("shutdown is not available in this agent")
	}
	a.s.shuttingDown.Store(true)
	a.s.shutdownOnce.Do(func() { a.s.cfg.OnShutdown(req.GetReason()) })
	return &agentv1.ShutdownResponse{}, nil
}
