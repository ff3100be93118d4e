package containerd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// cniPluginDir is where Debian's containernetworking-plugins puts the plugins.
const cniPluginDir = "/usr/lib/cni"

// cniNet is a network namespace that Debian's bridge plugin configured (bridge + host-local), as CNI does for
// a pod: one interface per subnet (eth0, net1, ...), each on a bridge of its own.
type cniNet struct {
	Name string // namespace name, under /var/run/netns
	Path string
	IPs  []string // each interface's IPv4 address, in order
	atts []cniAttachment
	// deleted is set once DEL ran, so that cleanup does not run it again.
	deleted bool
}

type cniAttachment struct {
	ifname, bridge string
	conf           []byte
}

// cniConf is a bridge network configuration for bridge br and subnet (an IPv4 /24).
func cniConf(name, br, subnet, dataDir string, mtu int) []byte {
	conf := map[string]any{
		"cniVersion": "1.0.0", "name": name, "type": "bridge", "bridge": br, "isGateway": true,
		"ipam": map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": subnet}}}, "dataDir": dataDir},
	}
	if mtu > 0 {
		conf["mtu"] = mtu
	}
	b, _ := json.Marshal(conf)
	return b
}

// cniPlugin runs a CNI plugin with conf on stdin and returns its result.
func cniPlugin(ctx context.Context, plugin, command, containerID, netnsPath, ifname string, conf []byte) ([]byte, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(cniPluginDir, plugin))
	cmd.Env = append(os.Environ(), "CNI_COMMAND="+command, "CNI_CONTAINERID="+containerID, "CNI_NETNS="+netnsPath,
		"CNI_IFNAME="+ifname, "CNI_PATH="+cniPluginDir)
	cmd.Stdin = bytes.NewReader(conf)
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("CNI %s %s: %w: %s", plugin, command, err, out)
	}
	return out, nil
}

// firstIPv4 reads the first IPv4 address of a CNI result.
func firstIPv4(result []byte) (string, error) {
	var r struct {
		IPs []struct{ Address string } `json:"ips"`
	}
	if err := json.Unmarshal(result, &r); err != nil {
		return "", fmt.Errorf("parse CNI result %s: %w", result, err)
	}
	for _, ip := range r.IPs {
		if a, _, ok := strings.Cut(ip.Address, "/"); ok && strings.Contains(a, ".") {
			return a, nil
		}
	}
	return "", fmt.Errorf("CNI result %s has no IPv4 address", result)
}

// newCNINet makes a namespace and runs the bridge plugin's ADD on it once per subnet; the test's end runs DEL
// and removes namespace and bridges.
func newCNINet(t *testing.T, name string, subnets ...string) *cniNet {
	t.Helper()
	n := &cniNet{Name: name, Path: "/var/run/netns/" + name}
	// Made before the namespace's cleanup is registered, so that it is removed after that cleanup: host-local's
	// DEL takes a lock file in the IPAM directory, which would otherwise come back after t.TempDir removed it.
	dir := t.TempDir()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { n.remove(t) })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i, subnet := range subnets {
		a := cniAttachment{ifname: "eth0", bridge: fmt.Sprintf("kbr-%s-%d", name[len(name)-4:], i)}
		if i > 0 {
			a.ifname = fmt.Sprintf("net%d", i)
		}
		a.conf = cniConf(fmt.Sprintf("%s-%d", name, i), a.bridge, subnet, filepath.Join(dir, "ipam"), 0)
		n.atts = append(n.atts, a)
		res, err := cniPlugin(ctx, "bridge", "ADD", name, n.Path, a.ifname, a.conf)
		if err != nil {
			t.Fatal(err)
		}
		ip, err := firstIPv4(res)
		if err != nil {
			t.Fatal(err)
		}
		n.IPs = append(n.IPs, ip)
	}
	return n
}

// del runs CNI DEL for every interface and removes the namespace, as a CRI runtime does at StopPodSandbox.
func (n *cniNet) del(t *testing.T) {
	t.Helper()
	if n.deleted {
		return
	}
	n.deleted = true
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, a := range n.atts {
		if _, err := cniPlugin(ctx, "bridge", "DEL", n.Name, n.Path, a.ifname, a.conf); err != nil {
			t.Errorf("CNI DEL: %v", err)
		}
	}
	if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
		t.Errorf("ip netns del %s: %v: %s", n.Name, err, out)
	}
}

func (n *cniNet) remove(t *testing.T) {
	n.del(t)
	for _, a := range n.atts {
		_ = exec.Command("ip", "link", "del", a.bridge).Run()
	}
}

// httpGet fetches url from the host, retrying while the server starts.
func httpGet(t *testing.T, url string) string {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				return string(body)
			}
			err = fmt.Errorf("status %s, %v", resp.Status, rerr)
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v", url, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// httpServer is a busybox shell command serving text at :8080/.
func httpServer(text string) []string {
	return []string{"sh", "-c", "mkdir -p /tmp/www && echo " + text + " > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"}
}

// TestKilnCNINamespace: a namespace that CNI's bridge plugin configured becomes the VM's network; the container
// answers on its IP from the host, and teardown leaves the namespace as CNI left it.
func TestKilnCNINamespace(t *testing.T) {
	k := startKiln(t)
	n := newCNINet(t, "kilnnet-a1b2", "10.231.1.0/24")
	before := netnsListing(t, n.Name)
	k.runDetached(t, "web", []string{"--with-ns", "network:" + n.Path}, httpServer("kiln-web")...)
	if got := strings.TrimSpace(httpGet(t, "http://"+n.IPs[0]+":8080/")); got != "kiln-web" {
		t.Errorf("pod answered %q", got)
	}
	// The guest interface has the namespace's name, address and MAC.
	out, _, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "ip", "web", "ip", "addr", "show", "eth0")
	if code != 0 || !strings.Contains(out, n.IPs[0]+"/24") {
		t.Errorf("guest eth0 (exit %d):\n%s", code, out)
	}
	k.remove(t, "web")
	if pids := k.d.WaitShimsGone(context.Background(), shimExitTimeout); len(pids) > 0 {
		t.Fatalf("shims still running: %v", pids)
	}
	if after := netnsListing(t, n.Name); after != before {
		t.Errorf("namespace changed by the pod:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestKilnFourInterfaces: a namespace holding four interfaces (four CNI ADDs, as Multus makes for a pod of several
// networks) gives the guest all of them, each reachable, on the fast path: first in a VM restored from its
// template, then in a spare's running VM, each NIC hot-plugged on a PCIe root port.
func TestKilnFourInterfaces(t *testing.T) {
	k := startKiln(t)
	k.spareConfig(t)
	nets := []*cniNet{
		newCNINet(t, "kilnnet-e5f6", "10.231.3.0/24", "10.231.4.0/24", "10.231.8.0/24", "10.231.9.0/24"),
		newCNINet(t, "kilnnet-e5f7", "10.231.10.0/24", "10.231.11.0/24", "10.231.12.0/24", "10.231.13.0/24"),
	}
	for i, n := range nets {
		id := fmt.Sprintf("four-%d", i)
		if i > 0 && !WaitSpare(k.d.Address, 3*time.Minute) {
			t.Fatalf("no spare shim became ready for %s", k.d.Address)
		}
		k.runDetached(t, id, []string{"--with-ns", "network:" + n.Path}, httpServer(id)...)
		for _, ip := range n.IPs {
			if got := strings.TrimSpace(httpGet(t, "http://"+ip+":8080/")); got != id {
				t.Errorf("%s answered %q on %s", id, got, ip)
			}
		}
		out, _, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "ip", id, "ip", "-o", "addr")
		for j, ip := range n.IPs {
			name := "eth0"
			if j > 0 {
				name = fmt.Sprintf("net%d", j)
			}
			if code != 0 || !strings.Contains(out, name+"    inet "+ip) {
				t.Errorf("%s: no %s on %s in the guest's addresses (exit %d):\n%s", id, ip, name, code, out)
			}
		}
		// A NIC of a restored VM is a PCI device; a VM booted instead has virtio-mmio ones.
		out, errOut, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "sys", id, "sh", "-c", "readlink /sys/class/net/eth0 && readlink /sys/class/net/net3")
		if code != 0 || strings.Count(out, "/pci0000:00/") != 2 {
			t.Errorf("%s: the guest's NICs are not on PCI, so its VM was not restored (exit %d):\n%s%s", id, code, out, errOut)
		}
		k.remove(t, id)
	}
	if n := strings.Count(k.logSince(t, 0), "the spare shim's warm VM runs the task"); n != 1 {
		t.Errorf("%d tasks ran in a spare's VM, want the second one", n)
	}
}

// TestKilnCNIDeleteFirst: a CRI runtime may run CNI DEL and remove the namespace before the pod's VM is torn
// down; the teardown still succeeds and leaves nothing on the host.
func TestKilnCNIDeleteFirst(t *testing.T) {
	k := startKiln(t)
	n := newCNINet(t, "kilnnet-0a0b", "10.231.5.0/24")
	peer := hostPeer(t, n.Name)
	k.runDetached(t, "early", []string{"--with-ns", "network:" + n.Path}, "sleep", "3600")
	n.del(t)
	k.ctr(t, "tasks", "kill", "--signal", "SIGKILL", "early")
	k.waitStatus(t, "early", "STOPPED")
	k.ctr(t, "tasks", "delete", "early")
	k.ctr(t, "containers", "delete", "early")
	if pids := k.d.WaitShimsGone(context.Background(), shimExitTimeout); len(pids) > 0 {
		t.Fatalf("shims still running: %v", pids)
	}
	if out, err := exec.Command("ip", "link", "show", peer).CombinedOutput(); err == nil {
		t.Errorf("the pod's host veth %s outlived CNI DEL and teardown:\n%s", peer, out)
	}
}

// hostPeer is the host-side name of the veth whose other end is eth0 in namespace ns.
func hostPeer(t *testing.T, ns string) string {
	t.Helper()
	out, err := exec.Command("ip", "-n", ns, "-o", "link", "show", "eth0").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link in %s: %v: %s", ns, err, out)
	}
	_, idx, ok := strings.Cut(strings.TrimSuffix(strings.Fields(string(out))[1], ":"), "@if")
	if !ok {
		t.Fatalf("eth0 in %s is not a veth: %s", ns, out)
	}
	out, err = exec.Command("ip", "-o", "link").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link: %v: %s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.TrimSuffix(f[0], ":") == idx {
			name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
			return name
		}
	}
	t.Fatalf("no host link with index %s", idx)
	return ""
}

// netnsListing is what a namespace holds: links, addresses, routes, qdiscs. A link's operational state and carrier
// are left out: the bridge's end of a CNI veth comes up on its own a moment after the plugin returns, so a listing
// taken at once can show NO-CARRIER and a later one LOWER_UP with nothing changed by Kiln.
func netnsListing(t *testing.T, name string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", name, "sh", "-c",
		"ip -o link | sed 's/ state [A-Z]*//; s/NO-CARRIER,//; s/,LOWER_UP//'; ip -o addr; ip route; ip -6 route; tc qdisc show").CombinedOutput()
	if err != nil {
		t.Fatalf("list namespace %s: %v: %s", name, err, out)
	}
	return string(out)
}

// TestKilnCreateRuntimeHookConfiguresNetwork: as nerdctl and Docker do, a createRuntime hook wires the network
// itself (here by running CNI's bridge plugin on /proc/<state pid>/ns/net) and a poststop hook unwires it; the
// VM gets what the hook configured.
func TestKilnCreateRuntimeHookConfiguresNetwork(t *testing.T) {
	k := startKiln(t)
	h := k.startHooked(t, "hooked", "kbr-c3d4", "10.231.2.0/24", "")
	if got := strings.TrimSpace(httpGet(t, "http://"+h.ip+":8080/")); got != "hooked" {
		t.Errorf("pod answered %q", got)
	}
	k.remove(t, "hooked")
	if n := h.runs(t, "DEL"); n != 1 {
		t.Errorf("poststop hook ran %d times, want 1", n)
	}
}

// TestKilnShimKilledRunsPoststop: a shim killed outright never ran its container's poststop hooks; the
// `delete` containerd then runs for the task does, as runc's delete does, so CNI's DEL releases the address
// the createRuntime hook's ADD leased.
func TestKilnShimKilledRunsPoststop(t *testing.T) {
	k := startKiln(t)
	const id = "hooked-killed"
	h := k.startHooked(t, id, "kbr-k1ll", "10.231.15.0/24", "")
	lease := filepath.Join(h.dir, "ipam", "kiln-kbr-k1ll", h.ip)
	if _, err := os.Stat(lease); err != nil {
		t.Fatalf("the ADD's lease: %v", err)
	}
	k.killShim(t, id)
	if n := h.runs(t, "DEL"); n != 1 {
		t.Errorf("poststop hook ran %d times after the shim was killed, want 1", n)
	}
	if _, err := os.Stat(lease); err == nil {
		t.Errorf("the address %s is still leased", h.ip)
	}
	k.remove(t, id)
}

// hooked is a container whose createRuntime hook wires its network and whose poststop hook unwires it.
type hooked struct {
	ip  string
	dir string
}

// runs is how many times the hooks ran CNI's command (ADD or DEL).
func (h hooked) runs(t *testing.T, command string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h.dir, "runs"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return strings.Count(string(b), command+"\n")
}

// startHooked creates and starts container id serving its id over HTTP on port 8080, with the hooks nerdctl and
// Docker use: a createRuntime hook that runs CNI's bridge plugin (bridge br, subnet) on /proc/<state pid>/ns/net,
// then the shell in extra, and a poststop hook that runs its DEL. The container is removed at the end of the test.
func (k *kilnEnv) startHooked(t *testing.T, id, br, subnet, extra string) hooked {
	t.Helper()
	dir := t.TempDir()
	conf := cniConf("kiln-"+br, br, subnet, filepath.Join(dir, "ipam"), 0)
	confPath, result := filepath.Join(dir, "conf.json"), filepath.Join(dir, "result")
	if err := os.WriteFile(confPath, conf, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", br).Run() })
	hook := filepath.Join(dir, "cni-hook")
	script := `#!/bin/sh
cmd=$1
echo $cmd >> ` + filepath.Join(dir, "runs") + `
pid=$(/bin/sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
CNI_COMMAND=$cmd CNI_CONTAINERID=` + id + ` CNI_NETNS=/proc/$pid/ns/net CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni \
	/usr/lib/cni/bridge < ` + confPath + ` > ` + result + `.$cmd || exit 1
[ $cmd = ADD ] || exit 0
` + extra + "\n"
	if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	withHooks := func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
		s.Hooks = &specs.Hooks{
			CreateRuntime: []specs.Hook{{Path: hook, Args: []string{hook, "ADD"}}},
			Poststop:      []specs.Hook{{Path: hook, Args: []string{hook, "DEL"}}},
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ctr := k.newContainer(ctx, t, id, oci.WithProcessArgs(httpServer(id)...), withHooks)
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := os.ReadFile(result + ".ADD")
	if err != nil {
		t.Fatalf("createRuntime hook did not run: %v", err)
	}
	ip, err := firstIPv4(res)
	if err != nil {
		t.Fatal(err)
	}
	return hooked{ip: ip, dir: dir}
}

// TestKilnTaskPidIsTheHosts: the pid containerd gets for a Kiln task names a host task (the container's
// stand-in) in the pod's network namespace whose root is the container's root file system, as clients read it:
// nerdctl cp through /proc/<pid>/root, cAdvisor's /proc/<pid>/net/dev, nerdctl inspect's /proc/<pid>/ns/net.
// The guest's pids named unrelated host processes (kernel threads, in the host's namespaces). `ctr task ps`
// lists that pid only. So for a VM booted for the task and for one a spare booted before it knew its network (and
// whose warm-up container had a stand-in).
func TestKilnTaskPidIsTheHosts(t *testing.T) {
	k := startKiln(t)
	check := func(id string, n *cniNet) {
		t.Helper()
		k.runDetached(t, id, []string{"--with-ns", "network:" + n.Path}, "sleep", "3600")
		k.waitStatus(t, id, "RUNNING")
		var pid string
		for _, line := range strings.Split(k.ctr(t, "tasks", "ls"), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
				pid = f[1]
			}
		}
		proc := "/proc/" + pid
		ino := func(path string) uint64 {
			var st syscall.Stat_t
			if err := syscall.Stat(path, &st); err != nil {
				t.Fatalf("task pid %q: %v", pid, err)
			}
			return st.Ino
		}
		if ino(proc+"/ns/net") != ino(n.Path) {
			t.Errorf("%s: %s/ns/net is not the pod's network namespace %s", id, proc, n.Path)
		}
		if dev, err := os.ReadFile(proc + "/net/dev"); err != nil || !strings.Contains(string(dev), "eth0") {
			t.Errorf("%s: %s/net/dev: %v\n%s", id, proc, err, dev)
		}
		k.ctr(t, "tasks", "exec", "--exec-id", "mark", id, "sh", "-c", "echo from-guest > /kiln-pid-marker")
		if got, err := os.ReadFile(proc + "/root/kiln-pid-marker"); err != nil || string(got) != "from-guest\n" {
			t.Errorf("%s: %s/root/kiln-pid-marker: %q, %v; want the guest's file", id, proc, got, err)
		}
		if err := os.WriteFile(proc+"/root/kiln-from-host", []byte("from-host\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			out, _, _ := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "read", id, "cat", "/kiln-from-host")
			if out == "from-host\n" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the guest does not see a file written through %s/root: %q", id, proc, out)
			}
			time.Sleep(200 * time.Millisecond)
		}
		for _, line := range strings.Split(strings.TrimSpace(k.ctr(t, "tasks", "ps", id)), "\n")[1:] {
			if f := strings.Fields(line); len(f) == 0 || f[0] != pid {
				t.Errorf("%s: ctr task ps lists %q, want only the task's pid %s", id, line, pid)
			}
		}
		k.remove(t, id)
		if _, err := os.Stat(proc + "/root/kiln-pid-marker"); err == nil {
			t.Errorf("%s: %s still leads into the container after its removal", id, proc)
		}
	}
	check("kiln-pid", newCNINet(t, "kilnnet-5a1d", "10.231.14.0/24"))
	k.readySpare(t, "kiln-pid-first")
	check("kiln-pid-spare", newCNINet(t, "kilnnet-5a1e", "10.231.17.0/24"))
}

// TestKilnNetworkAfterCreateIsRefused: as `ctr run --cni` does, CNI configures /proc/<task pid>/ns/net between
// the create and the start, once the VM has read its network: the start is refused, naming what happened,
// instead of a container running without the network it was given.
func TestKilnNetworkAfterCreateIsRefused(t *testing.T) {
	k := startKiln(t)
	const id = "kiln-late-net"
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	task, err := k.newContainer(ctx, t, id, oci.WithProcessArgs("sleep", "60")).NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatal(err)
	}
	nsPath := fmt.Sprintf("/proc/%d/ns/net", task.Pid())
	conf := cniConf("kiln-late", "kbr-late", "10.231.16.0/24", filepath.Join(t.TempDir(), "ipam"), 0)
	if _, err := cniPlugin(ctx, "bridge", "ADD", id, nsPath, "eth0", conf); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = cniPlugin(context.Background(), "bridge", "DEL", id, nsPath, "eth0", conf)
		_ = exec.Command("ip", "link", "del", "kbr-late").Run()
	})
	if err := task.Start(ctx); err == nil || !strings.Contains(err.Error(), "ctr run --cni") || !strings.Contains(err.Error(), "eth0") {
		t.Errorf("start after CNI configured the task's namespace: %v, want a refusal naming eth0 and ctr run --cni", err)
	}
}

// TestKilnRefusesHostNetwork: a VM cannot share the host's network stack, asked for as such or by a namespace
// path naming containerd's own; the error names the setting.
func TestKilnRefusesHostNetwork(t *testing.T) {
	k := startKiln(t)
	for _, opts := range [][]string{{"--net-host"}, {"--with-ns", fmt.Sprintf("network:/proc/%d/ns/net", k.d.Pid())}} {
		args := append(append([]string{"run", "--rm"}, opts...), KilnRunArgs(k.cfg)...)
		_, errOut, code := k.ctrCode(t, nil, append(args, BusyboxRef, "hostnet", "true")...)
		if code == 0 || !strings.Contains(errOut, "host network") {
			t.Errorf("ctr run %v: exit %d, stderr %s", opts, code, errOut)
		}
		k.remove(t, "hostnet")
	}
}

// TestKilnShimKilledLeavesNetworkAndCgroup: a shim killed outright cannot tear its pod down; containerd's
// `delete` for the task removes what it left in the namespace (qdiscs redirecting to its taps) and its host
// cgroup, so the namespace is as CNI made it.
func TestKilnShimKilledLeavesNetworkAndCgroup(t *testing.T) {
	k := startKiln(t)
	n := newCNINet(t, "kilnnet-dead", "10.231.6.0/24")
	before := netnsListing(t, n.Name)
	const id = "kiln-netkill"
	k.runDetached(t, id, []string{"--with-ns", "network:" + n.Path}, "sleep", "3600")
	k.waitStatus(t, id, "RUNNING")
	cgroupDir := filepath.Join(namespaceCgroup(), id)
	if _, err := os.Stat(cgroupDir); err != nil {
		t.Errorf("the pod's host cgroup %s: %v", cgroupDir, err)
	}
	shims := k.d.Shims()
	if len(shims) != 1 {
		t.Fatalf("want one shim, found %v", shims)
	}
	if err := syscall.Kill(shims[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// containerd runs the shim's `delete` once it sees the shim gone; the task is then stopped or gone.
	deadline := time.Now().Add(time.Minute)
	for st := k.taskStatus(t, id); st != "" && st != "STOPPED"; st = k.taskStatus(t, id) {
		if time.Now().After(deadline) {
			t.Fatalf("task %s still %s after its shim was killed", id, st)
		}
		time.Sleep(200 * time.Millisecond)
	}
	k.remove(t, id)
	// containerd drops a dead shim's task from its list before its `delete` has run to the end: give the
	// cleanup its time (under load the killed QEMU's reaping alone can take seconds).
	var after string
	var cgErr error
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		after = netnsListing(t, n.Name)
		_, cgErr = os.Stat(cgroupDir)
		if after == before && errors.Is(cgErr, os.ErrNotExist) || time.Now().After(deadline) {
			break
		}
	}
	if after != before {
		t.Errorf("namespace after the killed shim's cleanup:\n%s\nbefore:\n%s", after, before)
	}
	if !errors.Is(cgErr, os.ErrNotExist) {
		t.Errorf("host cgroup %s left: %v", cgroupDir, cgErr)
	}
}
