package cri

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// TestCRIDualStackMTU runs a pod on a dual-stack bridge network with MTU 1400 with each handler: the pod gets
// an IPv4 and an IPv6 address, answers HTTP on both from the host, and its interface has MTU 1400.
func TestCRIDualStackMTU(t *testing.T) {
	e := startEnv(t, Options{Handlers: podHandlers, Network: NetworkOptions{DualStack: true, MTU: 1400}})
	for _, h := range podHandlers {
		t.Run(h, func(t *testing.T) {
			name := "dual-" + h
			pod := NewPodConfig(name, e.PodLogDir(name))
			podID, ids := podWithContainers(t, e, h, pod, NewContainerConfig("web", containerd.BusyboxRef, httpServer("dual-"+h)...))
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			ips, err := e.PodIPs(ctx, podID)
			if err != nil {
				t.Fatal(err)
			}
			var v4, v6 int
			for _, s := range ips {
				ip := net.ParseIP(s)
				switch {
				case ip != nil && ip.To4() != nil && e.Net.Subnet4.Contains(ip):
					v4++
				case ip != nil && ip.To4() == nil && e.Net.Subnet6.Contains(ip):
					v6++
				default:
					t.Errorf("pod IP %s in neither %s nor %s", s, e.Net.Subnet4, e.Net.Subnet6)
					continue
				}
				url := "http://" + net.JoinHostPort(s, "8080") + "/"
				if body, err := httpGet(url); err != nil || strings.TrimSpace(body) != "dual-"+h {
					t.Errorf("GET %s from the host: %q, %v", url, body, err)
				}
			}
			if v4 != 1 || v6 != 1 {
				t.Errorf("pod IPs %v: want one IPv4 and one IPv6", ips)
			}
			if out := execRetry(t, e, ids[0], "cat", "/sys/class/net/eth0/mtu"); strings.TrimSpace(out) != "1400" {
				t.Errorf("eth0 MTU in the pod: %q, want 1400", out)
			}
			if err := e.RemovePod(ctx, podID); err != nil {
				t.Fatal(err)
			}
		})
	}
}
