package sandbox

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/containerd/ttrpc"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// seedingAgent takes SeedGuest's requests; nothing else.
type seedingAgent struct {
	agentv1.AgentService
	seeds chan *agentv1.SeedGuestRequest
}

func (a seedingAgent) SeedGuest(_ context.Context, r *agentv1.SeedGuestRequest) (*agentv1.SeedGuestResponse, error) {
	a.seeds <- r
	return &agentv1.SeedGuestResponse{}, nil
}

// Reseed gives the guest the host's clock as it is now, and fresh entropy each time.
func TestReseed(t *testing.T) {
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	a := seedingAgent{seeds: make(chan *agentv1.SeedGuestRequest, 2)}
	agentv1.RegisterAgentService(srv, a)
	dir := t.TempDir()
	l, err := net.Listen("unix", dir+"/agent.sock")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(context.Background(), l) }()
	defer srv.Close()
	conn, err := net.Dial("unix", dir+"/agent.sock")
	if err != nil {
		t.Fatal(err)
	}
	client := newClient(conn, time.Minute)
	defer client.Close()
	s := &Sandbox{m: exitedMachine{exited: make(chan struct{})}, agent: agentv1.NewAgentClient(client)}

	var entropy []byte
	for range 2 {
		before := time.Now()
		if err := s.Reseed(context.Background()); err != nil {
			t.Fatal(err)
		}
		r := <-a.seeds
		if at := time.Unix(0, r.GetWallClockUnixNano()); at.Before(before) || at.After(time.Now()) {
			t.Errorf("wall clock %v, want the host's at the request (after %v)", at, before)
		}
		if len(r.GetEntropy()) != seedEntropy || string(r.GetEntropy()) == string(entropy) {
			t.Errorf("entropy %x after %x: want %d fresh bytes", r.GetEntropy(), entropy, seedEntropy)
		}
		entropy = r.GetEntropy()
	}
}
