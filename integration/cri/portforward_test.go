package cri

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kiln-runtime/kiln/integration/containerd"
	"github.com/kiln-runtime/kiln/runtime/portforward"
)

// TestCRIPortForward: `crictl port-forward` reaches servers that listen on the pod's loopback only (127.0.0.1, and
// with Kiln ::1, the fallback), a forward to a port nothing listens on fails without an answer (last: crictl ends
// on the error, as kubectl does), and stopp/rmp leave the host as it was and no steering program attached, with
// each handler.
func TestCRIPortForward(t *testing.T) {
	e := startEnv(t, Options{Handlers: podHandlers})
	for _, h := range podHandlers {
		t.Run(h, func(t *testing.T) { testPortForward(t, e, h) })
	}
}

// loopbackServer is a shell command serving body with busybox httpd on addr (host:port) in the foreground.
func loopbackServer(addr, body string) []string {
	return []string{"sh", "-c", fmt.Sprintf("mkdir -p /www && echo %s > /www/index.html && exec httpd -f -p %s -h /www", body, addr)}
}

func testPortForward(t *testing.T, e *Env, handler string) {
	before, err := e.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	name := "pf-" + handler
	pod := NewPodConfig(name, e.PodLogDir(name))
	web4 := NewContainerConfig("web4", containerd.BusyboxRef, loopbackServer("127.0.0.1:8080", "hello-v4-"+name)...)
	web6 := NewContainerConfig("web6", containerd.BusyboxRef, loopbackServer("[::1]:8081", "hello-v6-"+name)...)
	podID, ids := podWithContainers(t, e, handler, pod, web4, web6)
	// Both servers are up before the forward starts: a forward to a port not served yet ends crictl port-forward
	// (as it ends kubectl port-forward).
	for _, u := range []string{"http://127.0.0.1:8080/", "http://[::1]:8081/"} {
		execRetry(t, e, ids[0], "wget", "-q", "-O", "-", u)
	}

	// The pod's network namespace on the host: with Kiln, the one place the shim attached its program.
	netnsFiles := dirNames(e.NetnsDir())
	if len(netnsFiles) != 1 {
		t.Fatalf("network namespace files in %s: %v, want the pod's one", e.NetnsDir(), netnsFiles)
	}
	// Held open to the end: the namespace then outlives rmp, and its inode number, by which the links are matched,
	// cannot pass to a namespace made meanwhile (the kernel reuses the numbers of namespaces that are gone, and
	// pods of other tests on the host have Kiln's program attached to theirs).
	nsFile, err := os.Open(filepath.Join(e.NetnsDir(), netnsFiles[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer nsFile.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(nsFile.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	wantLinks := 0
	if handler == HandlerKiln {
		wantLinks = 1
	}
	if n := steeringLinks(t, st.Ino); n != wantLinks {
		t.Errorf("%d port-forward programs attached to the pod's network namespace, want %d", n, wantLinks)
	}

	// The IPv4 server with each handler. The IPv6 one with Kiln only: containerd reaches it in a runc pod by
	// resolving "localhost" for tcp6 through the host's /etc/hosts, which on some hosts (this test machine's) has
	// no ::1 line, where Kiln's agent dials ::1 itself. Port 8082 has no server.
	want := map[int]string{8080: "hello-v4-" + name}
	if handler == HandlerKiln {
		want[8081] = "hello-v6-" + name
	}
	ports := []int{8082}
	for p := range want {
		ports = append(ports, p)
	}
	local, stop := portForward(t, e, podID, ports...)
	for remote, body := range want {
		url := fmt.Sprintf("http://127.0.0.1:%d/", local[remote])
		if got, err := httpGet(url); err != nil || strings.TrimSpace(got) != body {
			t.Errorf("GET %s (pod port %d through crictl port-forward): %q, %v; want %q", url, remote, got, err, body)
		}
	}
	// Nothing listens on 8082 in the pod: the connection ends without an answer.
	if got := rawGet(t, local[8082]); strings.Contains(got, "200 OK") {
		t.Errorf("forward to a port with no server answered %q", got)
	}
	stop()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := e.RemovePod(ctx, podID); err != nil {
		t.Fatal(err)
	}
	after, err := e.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if d := after.Diff(before); len(d) > 0 {
		t.Errorf("host state after stopp and rmp differs from before the pod:\n%s", strings.Join(d, "\n"))
	}
	if n := steeringLinks(t, st.Ino); n != 0 {
		t.Errorf("%d port-forward programs still attached to the pod's network namespace after rmp", n)
	}
}

// steeringLinks counts the BPF links of Kiln's port-forward program (runtime/portforward) attached to the network
// namespace with inode ino.
func steeringLinks(t *testing.T, ino uint64) int {
	t.Helper()
	var it link.Iterator
	defer it.Close()
	n := 0
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil {
			continue // gone in between
		}
		ns := info.NetNs()
		if ns == nil || uint64(ns.NetnsInode) != ino {
			continue
		}
		prog, err := ebpf.NewProgramFromID(info.Program)
		if err != nil {
			continue
		}
		pinfo, err := prog.Info()
		prog.Close()
		if err == nil && pinfo.Name == portforward.ProgramName {
			n++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatalf("list BPF links: %v", err)
	}
	return n
}

// forwardLine is crictl's (client-go's) report of one forwarded port.
var forwardLine = regexp.MustCompile(`^Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)$`)

// portForward runs `crictl port-forward` for the pod's ports, each to a free local port, and returns the local
// port of each once crictl listens on all of them. stop ends crictl.
func portForward(t *testing.T, e *Env, podID string, ports ...int) (map[int]int, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	args := []string{"port-forward", podID}
	for _, p := range ports {
		args = append(args, fmt.Sprintf("0:%d", p))
	}
	cmd := e.CrictlCommand(ctx, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			_ = cmd.Wait()
		})
	}
	t.Cleanup(stop)
	local := map[int]int{}
	sc := bufio.NewScanner(out)
	for len(local) < len(ports) && sc.Scan() {
		m := forwardLine.FindStringSubmatch(strings.TrimSpace(sc.Text()))
		if m == nil {
			continue
		}
		var l, r int
		fmt.Sscan(m[1], &l)
		fmt.Sscan(m[2], &r)
		local[r] = l
	}
	if len(local) < len(ports) {
		stop()
		t.Fatalf("crictl port-forward %v: listening on %v only: %v: %s", ports, local, sc.Err(), stderr.String())
	}
	// Keep reading crictl's output so that it never blocks on a full pipe.
	go func() { _, _ = io.Copy(io.Discard, out) }()
	return local, stop
}

// rawGet sends one HTTP/1.0 request to 127.0.0.1:port and returns what comes back until the connection ends.
func rawGet(t *testing.T, port int) string {
	t.Helper()
	c, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return ""
	}
	b, _ := io.ReadAll(c)
	return string(b)
}
