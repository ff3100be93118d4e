package cri

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// spareConfig turns spares on whatever the defaults (a suite run with fast_start = "off" keeps its spare tests).
const spareConfig = "[hypervisor]\nfast_start = \"template\"\nspare = true\n"

// With hypervisor.spare, a pod's sandbox runs in a spare shim's warm VM: the pod's network namespace, set up by
// CNI, is mirrored into the running VM (its NIC hot-plugged), and the pod serves the host at its CRI address as
// any pod does. The spare rehearsed a network on a throwaway NIC while it warmed, which left nothing in the guest
// that the pod's own network minds.
func TestKilnSparePod(t *testing.T) {
	e := startEnv(t, Options{Handlers: []string{HandlerKiln}, KilnConfigExtra: spareConfig})
	// The harness's stop stops the spare (containerd.StopSpare) and fails the test if it leaves anything.
	addr := e.Daemon.Address
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for i, name := range []string{"spare-1", "spare-2"} {
		if i > 0 && !containerd.WaitSpare(addr, 3*time.Minute) {
			t.Fatalf("no spare shim became ready for %s", addr)
		}
		pod := NewPodConfig(name, e.PodLogDir(name))
		podID, ids := podWithContainers(t, e, HandlerKiln, pod, NewContainerConfig("web", containerd.BusyboxRef, httpServer(name)...))
		ips, err := e.PodIPs(ctx, podID)
		if err != nil || len(ips) == 0 {
			t.Fatalf("pod %s IPs: %v, %v", name, ips, err)
		}
		url := "http://" + net.JoinHostPort(ips[0], "8080") + "/"
		if body, err := httpGet(url); err != nil || strings.TrimSpace(body) != name {
			t.Errorf("GET %s from the host: %q, %v", url, body, err)
		}
		if out := execRetry(t, e, ids[0], "sh", "-c", "ip -o addr show eth0"); !strings.Contains(out, ips[0]+"/") {
			t.Errorf("eth0 in pod %s does not hold %s: %q", name, ips[0], out)
		}
		if err := e.RemovePod(ctx, podID); err != nil {
			t.Fatal(err)
		}
	}
	log, err := os.ReadFile(e.Daemon.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(log), "the spare shim's warm VM runs the task"); n != 1 {
		t.Errorf("%d pods ran in a spare's VM, want the second one", n)
	}
	heldThroughSandbox(t, e)
	heldByContainerCreate(t, e)
	if !strings.Contains(string(log), "network_rehearsed=true") {
		t.Error("no spare rehearsed the network on a throwaway NIC while it warmed")
	}
}

// heldThroughSandbox: a pod started beside a booting spare holds it until the pod's first container of its own has
// started. The sandbox's start is not the end of the pod's start, so its shim does not let go there. A first pod
// takes the ready spare, so that its shim starts the next; the test holds that one as soon as it boots, as a
// `start` does, so that the second pod surely finds it booting.
func heldThroughSandbox(t *testing.T, e *Env) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	addr := waitSpare(t, e)
	for _, name := range []string{"held-0", "held"} {
		pod := NewPodConfig(name, e.PodLogDir(name))
		podID, err := e.RunPod(ctx, HandlerKiln, pod)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = e.RemovePod(context.WithoutCancel(ctx), podID) }()
		if name == "held-0" {
			holds, err := containerd.HoldBootingSpare(addr, time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			defer containerd.CloseHolds(holds)
			continue
		}
		const letGo = "the booting spares it held go on"
		if log := logOf(t, e); strings.Contains(log, letGo) {
			t.Errorf("pod %s's shim let go of the spare at its sandbox's start; containerd's log:\n%s", podID, e.Daemon.LogTail(20))
		}
		id, err := e.CreateContainer(ctx, podID, NewContainerConfig("web", containerd.BusyboxRef, "sleep", "3600"), pod)
		if err != nil {
			t.Fatal(err)
		}
		e.crictl(t, "start", id)
		if log := logOf(t, e); !strings.Contains(log, letGo+`" container=`+id) {
			t.Errorf("pod %s's shim did not let go of the spare at its container %s's start; containerd's log:\n%s", podID, id, e.Daemon.LogTail(20))
		}
	}
}

// heldByContainerCreate: a pod's container that comes once its spare boots (as when kubelet pulls its image) holds
// the booting spare from its create to its start.
func heldByContainerCreate(t *testing.T, e *Env) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	addr := waitSpare(t, e)
	pod := NewPodConfig("pulled", e.PodLogDir("pulled"))
	podID, err := e.RunPod(ctx, HandlerKiln, pod)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = e.RemovePod(context.WithoutCancel(ctx), podID) }()
	// The spare the pod's shim started boots 2 s after the sandbox's start; the test holds it too, so that it is
	// still booting when the container comes.
	holds, err := containerd.HoldBootingSpare(addr, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer containerd.CloseHolds(holds)
	id, err := e.CreateContainer(ctx, podID, NewContainerConfig("web", containerd.BusyboxRef, "sleep", "3600"), pod)
	if err != nil {
		t.Fatal(err)
	}
	e.crictl(t, "start", id)
	if log := logOf(t, e); !strings.Contains(log, `the booting spares the container's create held go on" container=`+id) {
		t.Errorf("container %s's create did not hold the booting spare until its start; containerd's log:\n%s", id, e.Daemon.LogTail(20))
	}
}

// waitSpare waits for a spare shim of e's containerd to be ready, and returns the containerd's address.
func waitSpare(t *testing.T, e *Env) string {
	t.Helper()
	addr := e.Daemon.Address
	if !containerd.WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("no spare shim became ready for %s", addr)
	}
	return addr
}

func logOf(t *testing.T, e *Env) string {
	t.Helper()
	b, err := os.ReadFile(e.Daemon.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
