package cri

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// TestKilnPodForgetsRemovedContainers: containers removed from a pod (kubelet restarts a crashing container under
// a new id each time) leave nothing of theirs held on the host. virtiofsd holds a descriptor on each file the guest
// looked up until the guest's kernel forgets it, and with them the removed container's detached root: the disk
// space of its deleted writable layer and its image layers, one root for each container removed, until the pod
// ended. So do containers whose task fails to be created (kubelet creates such a container again under a new id after
// each back-off).
func TestKilnPodForgetsRemovedContainers(t *testing.T) {
	e := startEnv(t, Options{Handlers: []string{HandlerKiln}, KilnConfigExtra: "[hypervisor]\nspare = false\n"})
	const name = "forget"
	pod := NewPodConfig(name, e.PodLogDir(name))
	podID, _ := podWithContainers(t, e, HandlerKiln, pod, NewContainerConfig("keep", containerd.BusyboxRef, "sleep", "3600"))
	// The pod's virtiofsd (its sandboxed child holds the descriptors), by the share it serves.
	descriptors := func() int {
		n := 0
		for _, pid := range containerd.ProcessesMatching("source=" + e.KilnStateDir() + "/") {
			entries, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
			if err == nil {
				n += len(entries)
			}
		}
		return n
	}
	churn := func(i int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := NewContainerConfig(fmt.Sprintf("churn-%d", i), containerd.BusyboxRef, "sleep", "3600")
		id, err := e.CreateContainer(ctx, podID, c, pod)
		if err != nil {
			t.Fatal(err)
		}
		e.crictl(t, "start", id)
		if _, stderr, code, err := e.Exec(ctx, id, "sh", "-c", "dd if=/dev/zero of=/big bs=1M count=4 2>/dev/null && ls / /bin /etc >/dev/null"); err != nil || code != 0 {
			t.Fatalf("write in container %s: exit %d, %v: %s", id, code, err, stderr)
		}
		e.crictl(t, "stop", "-t", "0", id)
		e.crictl(t, "rm", id)
	}
	settled := func() int {
		// The guest forgets a removed root once a lookup past virtio-fs's 1 s entry timeout finds it gone, and
		// drops its unused entries 1.1 s later.
		time.Sleep(7 * time.Second)
		return descriptors()
	}
	churn(0)
	before := settled()
	if before == 0 {
		t.Fatal("no virtiofsd of the pod's found, or it holds no descriptors")
	}
	const n = 4
	for i := 1; i <= n; i++ {
		churn(i)
	}
	after := settled()
	t.Logf("virtiofsd's descriptors: %d after one container came and went, %d after %d more", before, after, n)
	if after > before+n {
		t.Errorf("virtiofsd holds %d descriptors after %d more containers came and went, %d before: the removed containers' files are still held", after, n, before)
	}
	// CRI creates the task at start, which fails in the guest after libcontainer mounted the root and looked up
	// the program's path.
	for i := range n {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		c := NewContainerConfig(fmt.Sprintf("fail-%d", i), containerd.BusyboxRef, "no-such-program")
		id, err := e.CreateContainer(ctx, podID, c, pod)
		if err != nil {
			cancel()
			t.Fatal(err)
		}
		_, err = e.Crictl(ctx, "start", id)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "no-such-program") {
			t.Fatalf("start of a program the image lacks: %v, want an error naming it", err)
		}
		e.crictl(t, "rm", id)
	}
	failed := settled()
	t.Logf("virtiofsd's descriptors: %d after %d starts failed", failed, n)
	if failed > after+n {
		t.Errorf("virtiofsd holds %d descriptors after %d starts failed, %d before: the failed containers' files are still held", failed, n, after)
	}
}
