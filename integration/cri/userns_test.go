package cri

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// TestCRIUserNamespace runs a pod with a user namespace of its own (hostUsers: false) with handler kiln: CRI
// pins a host user namespace with the pod's mappings, makes the pod's network namespace in it, and asks the
// overlay snapshotter for an idmapped root. The pod's sandbox starts (the guest makes its own user namespace
// with the mappings), and on the host its root, shared with the guest, shows the image's root-owned files as
// the mapped root's, as the sandbox sees them.
//
// The pod's other containers are not started here: containerd 2.4's CRI starts a container with a user
// namespace with runc's options type, which it cannot make from the runtime options the harness gives Kiln
// (ConfigPath), so StartContainer fails in containerd before Kiln sees it (ctr run --uidmap with
// --runtime-config-path fails the same way in containerd's client).
func TestCRIUserNamespace(t *testing.T) {
	// containerd pins the pod's user namespace itself; a chrooted containerd (as in a fresh-check root) or a host
	// with user.max_user_namespaces = 0 cannot, whatever the runtime.
	probe := exec.Command("/bin/true")
	probe.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER}
	if err := probe.Run(); err != nil {
		t.Skipf("this host refuses new user namespaces (%v), which pods with hostUsers: false need", err)
	}
	e := startEnv(t, Options{Handlers: []string{HandlerKiln}, KilnConfigInEnv: true})
	name := "userns"
	pod := NewPodConfig(name, e.PodLogDir(name))
	userns := &NamespaceOption{UsernsOptions: &UserNamespace{
		Mode: NamespacePod,
		Uids: []IDMapping{{ContainerID: 0, HostID: 200000, Length: 65536}},
		Gids: []IDMapping{{ContainerID: 0, HostID: 300000, Length: 65536}},
	}}
	pod.Linux.SecurityContext = &PodSecurityContext{NamespaceOptions: userns}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	podID, err := e.RunPod(ctx, HandlerKiln, pod)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.RemovePod(context.Background(), podID) })
	if out := e.crictl(t, "inspectp", "-o", "go-template", "--template", "{{.status.state}}", podID); strings.TrimSpace(out) != "SANDBOX_READY" {
		t.Errorf("pod state %q, want SANDBOX_READY", out)
	}
	matches, _ := filepath.Glob(filepath.Join(e.KilnStateDir(), "*.share", "shared", podID, "rootfs", "pause"))
	if len(matches) != 1 {
		t.Fatalf("the sandbox's /pause is not in the pod's share on the host (%v)", matches)
	}
	fi, err := os.Stat(matches[0])
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 200000 || st.Gid != 300000 {
		t.Errorf("the image's root-owned /pause is %d:%d in the share, want the mapped root 200000:300000", st.Uid, st.Gid)
	}

	// kubelet gives each container of the pod the pod's user namespace options too.
	c := NewContainerConfig("app", containerd.BusyboxRef, "sleep", "3600")
	c.Linux.SecurityContext = &ContainerSecurityContext{NamespaceOptions: userns}
	id, err := e.CreateContainer(ctx, podID, c, pod)
	if err != nil {
		t.Fatal(err)
	}
	e.crictl(t, "start", id)
	out, stderr, code, err := e.Exec(ctx, id, "cat", "/proc/self/uid_map", "/proc/self/gid_map")
	if err != nil || code != 0 {
		t.Fatalf("read the container's id maps: exit %d, %v: %s", code, err, stderr)
	}
	if got, want := strings.Fields(out), []string{"0", "200000", "65536", "0", "300000", "65536"}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("the container's uid_map and gid_map are %q, want the pod's mappings %q", got, want)
	}
	// Its /sys shows the pod's network interfaces, as /proc/net/dev does, not the guest's own.
	out, stderr, code, err = e.Exec(ctx, id, "sh", "-c", "ls /sys/class/net; echo --; tail -n +3 /proc/net/dev | cut -d: -f1")
	if err != nil || code != 0 {
		t.Fatalf("list the container's interfaces: exit %d, %v: %s", code, err, stderr)
	}
	sysNet, procNet, _ := strings.Cut(out, "--")
	sysNames, procNames := strings.Fields(sysNet), strings.Fields(procNet)
	slices.Sort(sysNames)
	slices.Sort(procNames)
	if !slices.Equal(sysNames, procNames) {
		t.Errorf("the container's /sys/class/net lists %q, its network namespace has %q", sysNames, procNames)
	}
}
