package cri

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// podHandlers are the runtime handlers the pod tests run with, each against the same expectations. Kiln joins
// with one more entry, HandlerKiln, once its pod networking lands (issue 9); startEnv then builds the shim and
// writes its configuration.
var podHandlers = []string{
	HandlerRunc,
	HandlerKiln,
}

// httpServer is a shell command serving body on port 8080 with busybox httpd in the foreground.
func httpServer(body string) []string {
	return []string{"sh", "-c", fmt.Sprintf("mkdir -p /www && echo %s > /www/index.html && exec httpd -f -p 8080 -h /www", body)}
}

// podWithContainers runs a pod and starts its containers, returning the pod's id and the containers' ids
// in order. The pod is removed (stopp, rmp) when the test ends unless the test removed it.
func podWithContainers(t *testing.T, e *Env, handler string, pod *PodConfig, ctrs ...*ContainerConfig) (string, []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	podID, err := e.RunPod(ctx, handler, pod)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if ids, _ := e.Pods(context.Background()); contains(ids, podID) {
			_ = e.RemovePod(context.Background(), podID)
		}
	})
	var ids []string
	for _, c := range ctrs {
		id, err := e.CreateContainer(ctx, podID, c, pod)
		if err != nil {
			t.Fatal(err)
		}
		e.crictl(t, "start", id)
		ids = append(ids, id)
	}
	t.Logf("%s: pod %s with %d containers started in %s", handler, pod.Metadata.Name, len(ctrs), time.Since(start).Round(time.Millisecond))
	return podID, ids
}

func contains(l []string, s string) bool {
	for _, v := range l {
		if v == s {
			return true
		}
	}
	return false
}

// httpGet fetches url from the host, retrying for up to 30 s while the server comes up.
func httpGet(url string) (string, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			b, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				return string(b), nil
			}
			err = fmt.Errorf("GET %s: %s %v", url, resp.Status, rerr)
		}
		if time.Now().After(deadline) {
			return "", err
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// execRetry runs cmd in a container until it exits 0 or 30 s pass, returning the last stdout.
func execRetry(t *testing.T, e *Env, id string, cmd ...string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, errOut, code, err := e.Exec(context.Background(), id, cmd...)
		if err != nil {
			t.Fatal(err)
		}
		if code == 0 {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec %v in %s: exit %d, stdout %q, stderr %q", cmd, id, code, out, errOut)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// TestCRIPod drives a pod of two busybox containers through CRI with each handler: exec, logs, stats, the pod
// IP answering from the host and from a second pod, and stopp/rmp leaving the host as it was. A container's
// processes, its init and an exec, have the same resource limits with each: CRI names none, and runc's inherit
// containerd's.
func TestCRIPod(t *testing.T) {
	e := startEnv(t, Options{Handlers: podHandlers})
	limits := map[string]string{}
	for _, h := range podHandlers {
		t.Run(h, func(t *testing.T) { limits[h] = testPod(t, e, h) })
	}
	if limits[HandlerKiln] == "" || limits[HandlerKiln] != limits[HandlerRunc] {
		t.Errorf("resource limits of an init and an exec with %s:\n%s\nwith %s:\n%s", HandlerKiln, limits[HandlerKiln], HandlerRunc, limits[HandlerRunc])
	}
}

// testPod runs TestCRIPod's pod with handler, and returns the resource limits of the logger container's init and
// of an exec in it.
func testPod(t *testing.T, e *Env, handler string) (limits string) {
	before, err := e.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	name := "web-" + handler
	pod := NewPodConfig(name, e.PodLogDir(name))
	pod.Hostname = name
	web := NewContainerConfig("web", containerd.BusyboxRef, httpServer("hello-from-"+name)...)
	// The init logs its own limits: in a fresh-check root, an exec of runc's read the host PID 1's through /proc/1
	// (session 36) and did not find a file the init had written in its /tmp (session 37), while Kiln's matched.
	logger := NewContainerConfig("logger", containerd.BusyboxRef, "sh", "-c", "cat /proc/self/limits; echo log-line-1; echo log-line-2 >&2; exec sleep 3600")
	podID, ids := podWithContainers(t, e, handler, pod, web, logger)
	webID, loggerID := ids[0], ids[1]

	// exec: output, exit status, and the pod's shared network namespace (localhost reaches the other container).
	if out, _, code, err := e.Exec(context.Background(), loggerID, "sh", "-c", "echo from-exec; exit 3"); err != nil || code != 3 || strings.TrimSpace(out) != "from-exec" {
		t.Errorf("exec: stdout %q, exit %d, err %v; want from-exec, 3", out, code, err)
	}
	if out := execRetry(t, e, loggerID, "wget", "-q", "-O", "-", "http://127.0.0.1:8080/"); strings.TrimSpace(out) != "hello-from-"+name {
		t.Errorf("localhost from the other container: %q", out)
	}
	if out, _, _, _ := e.Exec(context.Background(), webID, "hostname"); strings.TrimSpace(out) != name {
		t.Errorf("hostname in the pod: %q, want %q", out, name)
	}
	execLimits := execRetry(t, e, loggerID, "cat", "/proc/self/limits")

	// logs: both streams, in CRI's log file; the init's limits come first.
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := e.crictl(t, "logs", loggerID)
		if initLimits, _, ok := strings.Cut(out, "log-line-1"); ok {
			limits = initLimits + execLimits
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("crictl logs: %q, want log-line-1 (stdout)", out)
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	logCmd := e.CrictlCommand(ctx, "logs", loggerID)
	if both, err := logCmd.CombinedOutput(); err != nil || !strings.Contains(string(both), "log-line-2") {
		t.Errorf("crictl logs (stderr stream): %q, %v", both, err)
	}

	// stats: CPU and memory of a running container.
	var stats struct {
		Stats []struct {
			Attributes struct {
				ID string `json:"id"`
			} `json:"attributes"`
			CPU struct {
				UsageCoreNanoSeconds struct {
					Value string `json:"value"`
				} `json:"usageCoreNanoSeconds"`
			} `json:"cpu"`
			Memory struct {
				WorkingSetBytes struct {
					Value string `json:"value"`
				} `json:"workingSetBytes"`
			} `json:"memory"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(e.crictl(t, "stats", "-o", "json", "--id", webID)), &stats); err != nil {
		t.Errorf("parse crictl stats: %v", err)
	} else if len(stats.Stats) != 1 || stats.Stats[0].CPU.UsageCoreNanoSeconds.Value == "" || stats.Stats[0].Memory.WorkingSetBytes.Value == "" {
		t.Errorf("crictl stats for %s: %+v", webID, stats)
	}

	// The pod IP answers from the host, in the harness's subnet.
	ips, err := e.PodIPs(ctx, podID)
	if err != nil {
		t.Fatal(err)
	}
	if ip := net.ParseIP(ips[0]); ip == nil || !e.Net.Subnet4.Contains(ip) {
		t.Errorf("pod IP %s not in %s", ips[0], e.Net.Subnet4)
	}
	url := "http://" + net.JoinHostPort(ips[0], "8080") + "/"
	if body, err := httpGet(url); err != nil || strings.TrimSpace(body) != "hello-from-"+name {
		t.Errorf("GET %s from the host: %q, %v", url, body, err)
	}

	// The snapshot sees a running pod (so that an empty difference at the end means something).
	if during, err := e.Snapshot(); err != nil {
		t.Error(err)
	} else if d := strings.Join(during.Diff(before), "\n"); !strings.Contains(d, "+ links: veth") || !strings.Contains(d, "+ netns: ") {
		t.Errorf("host state with a pod running shows no new veth or netns:\n%s", d)
	}

	// CRI keeps the pods' network namespaces in its own state directory, not in /run/netns.
	if n := len(dirNames(e.NetnsDir())); n != 1 {
		t.Errorf("%d network namespace files in %s, want the pod's one", n, e.NetnsDir())
	}

	// A second pod reaches the first by its IP.
	name2 := "client-" + handler
	pod2 := NewPodConfig(name2, e.PodLogDir(name2))
	client := NewContainerConfig("client", containerd.BusyboxRef, "sleep", "3600")
	pod2ID, ids2 := podWithContainers(t, e, handler, pod2, client)
	if out := execRetry(t, e, ids2[0], "wget", "-q", "-O", "-", url); strings.TrimSpace(out) != "hello-from-"+name {
		t.Errorf("GET %s from a second pod: %q", url, out)
	}

	for _, id := range []string{pod2ID, podID} {
		start := time.Now()
		if err := e.RemovePod(ctx, id); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: stopp+rmp %s in %s", handler, id[:12], time.Since(start).Round(time.Millisecond))
	}
	after, err := e.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if d := after.Diff(before); len(d) > 0 {
		t.Errorf("host state after stopp and rmp differs from before the pods:\n%s", strings.Join(d, "\n"))
	}
	if l := e.crictl(t, "ps", "-a", "-q"); strings.TrimSpace(l) != "" {
		t.Errorf("containers listed after rmp: %q", l)
	}
	return limits
}
