package network

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// FuzzConfigureNetwork feeds the Network service's methods arbitrary request bytes, decoded as ttrpc decodes
// them. A request parseRequest accepts keeps every interface, route and neighbour (routes on a link first) and
// only valid names and MACs; a request it refuses is refused by ConfigureNetwork and RehearseNetwork too, before
// the pod's or the rehearsal's network namespace is created. Accepted requests are not applied: that would move
// this host's interfaces.
func FuzzConfigureNetwork(f *testing.F) {
	tooMany := &agentv1.ConfigureNetworkRequest{}
	for range maxInterfaces + 1 {
		tooMany.Interfaces = append(tooMany.Interfaces, &agentv1.Interface{Name: "eth0", Mac: "02:42:ac:11:00:02"})
	}
	for _, req := range []*agentv1.ConfigureNetworkRequest{
		tooMany,
		{},
		{Interfaces: []*agentv1.Interface{{Name: "eth0", Mac: "02:42:ac:11:00:02", Mtu: 1500,
			Addresses: []string{"10.88.0.5/16", "fd00::5/64"}}},
			Routes: []*agentv1.Route{{Gateway: "10.88.0.1", Device: "eth0", Family: 4},
				{Destination: "10.88.0.0/16", Device: "eth0", Scope: 253, Source: "10.88.0.5"},
				{Destination: "::/0", Gateway: "fd00::1", Family: 6, Metric: 1024, Mtu: 1400}},
			Neighbours: []*agentv1.Neighbour{{Device: "eth0", Ip: "10.88.0.1", Mac: "02:42:ac:11:00:01"}}},
		{Interfaces: []*agentv1.Interface{{Name: "eth0/..", Mac: "02:42:ac:11:00:02"}}},
		{Interfaces: []*agentv1.Interface{{Name: "eth0", Mac: "not-a-mac"}}},
		{Interfaces: []*agentv1.Interface{{Name: "eth0", Mac: "02:42:ac:11:00:02", Addresses: []string{"10.0.0.300/8"}}}},
		{Routes: []*agentv1.Route{{Destination: "10.0.0.0", Gateway: "x"}}},
		{Neighbours: []*agentv1.Neighbour{{Device: "", Ip: "10.0.0.1", Mac: "02:42:ac:11:00:01"}}},
	} {
		b, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	f.Fuzz(func(t *testing.T, data []byte) {
		var req agentv1.ConfigureNetworkRequest
		if proto.Unmarshal(data, &req) != nil {
			return // ttrpc answers the unmarshal error; the service never sees it
		}
		set, err := parseRequest(&req)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			path := filepath.Join(t.TempDir(), "netns", "pod")
			p := New(path, logrus.NewEntry(log))
			resp, cerr := p.ConfigureNetwork(context.Background(), &req)
			if cerr == nil || resp != nil || !strings.HasPrefix(cerr.Error(), "configure network: ") {
				t.Fatalf("ConfigureNetwork of a refused request = %v, %v", resp, cerr)
			}
			if _, serr := os.Stat(path); !errors.Is(serr, os.ErrNotExist) {
				t.Fatalf("ConfigureNetwork of a refused request touched the pod namespace: %v", serr)
			}
			resp, cerr = p.RehearseNetwork(context.Background(), &req)
			if cerr == nil || resp != nil || !strings.HasPrefix(cerr.Error(), "rehearse network: ") {
				t.Fatalf("RehearseNetwork of a refused request = %v, %v", resp, cerr)
			}
			if _, serr := os.Stat(path + ".rehearsal"); !errors.Is(serr, os.ErrNotExist) {
				t.Fatalf("RehearseNetwork of a refused request made a namespace: %v", serr)
			}
			return
		}
		checkSetup(t, &req, set)
	})
}

// checkSetup fails t unless set is req, complete, within limits and valid.
func checkSetup(t *testing.T, req *agentv1.ConfigureNetworkRequest, set *setup) {
	t.Helper()
	if len(set.interfaces) != len(req.GetInterfaces()) || len(set.routes) != len(req.GetRoutes()) ||
		len(set.neighbours) != len(req.GetNeighbours()) {
		t.Fatalf("setup has %d interfaces %d routes %d neighbours, request %d %d %d", len(set.interfaces),
			len(set.routes), len(set.neighbours), len(req.GetInterfaces()), len(req.GetRoutes()), len(req.GetNeighbours()))
	}
	if len(set.interfaces) > maxInterfaces || len(set.routes) > maxRoutes || len(set.neighbours) > maxNeighbours {
		t.Fatalf("setup over the limits: %d interfaces %d routes %d neighbours", len(set.interfaces),
			len(set.routes), len(set.neighbours))
	}
	for i, ifc := range set.interfaces {
		want := req.GetInterfaces()[i]
		mac, _ := net.ParseMAC(want.GetMac())
		if ifc.name != want.GetName() || checkLinkName(ifc.name) != nil || ifc.mac.String() != mac.String() ||
			len(ifc.addrs) != len(want.GetAddresses()) || len(ifc.addrs) > maxAddresses {
			t.Fatalf("interface %d set up as %+v from %v", i, ifc, want)
		}
	}
	viaGateway := false
	for i, r := range set.routes {
		if r.route.Gw != nil {
			viaGateway = true
		} else if viaGateway {
			t.Fatalf("route %d on a link comes after a route through a gateway", i)
		}
		if r.device != "" && checkLinkName(r.device) != nil {
			t.Fatalf("route %d through invalid device %q", i, r.device)
		}
	}
	for i, n := range set.neighbours {
		if checkLinkName(n.device) != nil || n.neigh.IP == nil || len(n.neigh.HardwareAddr) == 0 {
			t.Fatalf("neighbour %d set up as %+v", i, n)
		}
	}
}
