package containerd

import (
	"strings"
	"syscall"
	"testing"
	"time"
)

// faultRequestTimeout is the agent request timeout of the fault suite's Kiln: the hung agent's calls wait it out.
const faultRequestTimeout = 10 * time.Second

// deadVMFault is a way for a pod's VM to die (or stop answering) under its containers.
type deadVMFault struct {
	name string
	// inflict does it to pod's VM; a is a running privileged container of the pod.
	inflict func(t *testing.T, k *kilnEnv, pod, a string)
	// reason is what the shim log says about it.
	reason string
	// byContainerd: the shim itself is gone, so containerd reports the exits (137) and cleans up through the
	// shim's `delete`; an exec waiter then returns an error rather than an exit status.
	byContainerd bool
}

var deadVMFaults = []deadVMFault{
	{name: "qemu-sigkill", reason: "QEMU exited: signal: killed", inflict: func(t *testing.T, k *kilnEnv, _, a string) {
		signalAll(t, syscall.SIGKILL, k.podQEMU(t, a))
	}},
	{name: "virtiofsd-sigkill", reason: "virtiofsd exited while the VM ran", inflict: func(t *testing.T, k *kilnEnv, _, a string) {
		signalAll(t, syscall.SIGKILL, k.podVirtiofsd(t, a)...)
	}},
	{name: "guest-panic", reason: "sysrq triggered crash", inflict: func(t *testing.T, k *kilnEnv, _, a string) {
		// The exec dies with the guest; its status is the VM's end. It runs in the background so that a guest
		// that hangs in its panic instead of resetting fails the wait for the exits, not this call.
		k.background(t, "tasks", "exec", "--exec-id", "sysrq", a, "sh", "-c", "echo c > /proc/sysrq-trigger")
	}},
	{name: "agent-hung", reason: "did not answer", inflict: func(t *testing.T, k *kilnEnv, _, a string) {
		// QEMU stopped: the VM lives on, and nothing in it answers.
		qemuPid := k.podQEMU(t, a)
		signalAll(t, syscall.SIGSTOP, qemuPid)
		t.Cleanup(func() { _ = syscall.Kill(qemuPid, syscall.SIGCONT) })
		// Every call returns within its timeout, with an error.
		if _, errOut, code := k.ctrCode(t, nil, "tasks", "ps", a); code == 0 || !strings.Contains(errOut, "deadline exceeded") {
			t.Errorf("ctr tasks ps through a hung agent: exit %d, stderr %s; want a deadline error", code, errOut)
		}
		// A SIGKILL the agent cannot deliver stops the VM: it succeeds.
		if _, errOut, code := k.ctrCode(t, nil, "tasks", "kill", "--signal", "SIGKILL", a); code != 0 {
			t.Errorf("ctr tasks kill -s SIGKILL through a hung agent: exit %d: %s", code, errOut)
		}
	}},
	{name: "shim-sigkill", reason: "cleaning up after shim disconnected", byContainerd: true, inflict: func(t *testing.T, k *kilnEnv, _, _ string) {
		shims := k.shimProcesses()
		if len(shims) != 1 {
			t.Fatalf("want one shim, found %v", shims)
		}
		signalAll(t, syscall.SIGKILL, shims[0])
	}},
}

// TestKilnFaults is issue 11's fault suite: a pod's VM dies or hangs under running containers, and while a
// container of the pod starts; the guest runs out of memory; a container floods a reader that reads nothing;
// containerd restarts mid-exec; the state directory is full. Each gives a clear event or error and leaves
// nothing behind. One containerd serves every case; each case checks for leftovers when it ends. The pods whose
// VM dies, and the OOM's, have a CNI-configured network namespace, so that the check covers their taps and
// qdiscs too.
func TestKilnFaults(t *testing.T) {
	k := startKiln(t)
	cfg, err := k.d.KilnConfig(k.assets, "\n[agent]\nrequest_timeout = \""+faultRequestTimeout.String()+"\"\n")
	if err != nil {
		t.Fatal(err)
	}
	k.cfg = cfg
	for _, f := range deadVMFaults {
		t.Run(f.name+"/running", func(t *testing.T) { deadVMWhileRunning(t, k, f) })
		t.Run(f.name+"/starting", func(t *testing.T) { deadVMWhileStarting(t, k, f) })
	}
	t.Run("guest-oom", func(t *testing.T) { guestOOM(t, k) })
	t.Run("containerd-restart-mid-exec", func(t *testing.T) { containerdRestartMidExec(t, k) })
	t.Run("stdout-flood-stalled-reader", func(t *testing.T) { stdoutFlood(t, k) })
	t.Run("state-dir-full", func(t *testing.T) { stateDirFull(t, k) })
}

// deadVMWhileRunning: a pod runs a container with an exec waiting on it; after the fault both exit 137 (events,
// the waiter's status), the shim log says why, delete reports 137, and nothing is left.
func deadVMWhileRunning(t *testing.T, k *kilnEnv, f deadVMFault) {
	pod := "f-" + f.name
	a := pod + "-a"
	events := k.followEvents(t)
	logStart := k.logSize()
	net := k.podNet(t)
	k.runDetached(t, a, append(append(podArgs(pod), net...), "--privileged"), sleeper...)
	k.waitStatus(t, a, "RUNNING")
	waiter := k.background(t, "tasks", "exec", "--exec-id", "waiter", a, "sleep", "1000")
	events.waitFor(t, time.Minute, "/tasks/exec-started", map[string]any{"container_id": a, "exec_id": "waiter"})

	f.inflict(t, k, pod, a)

	events.waitFor(t, 2*time.Minute, "/tasks/exit", map[string]any{"container_id": a, "id": a, "exit_status": float64(137)})
	code, errOut := waiter()
	if f.byContainerd {
		if code == 0 {
			t.Errorf("exec waiter returned 0 after its shim was killed")
		}
	} else {
		if code != 137 {
			t.Errorf("exec waiter: exit %d (stderr %q), want 137", code, errOut)
		}
		events.waitFor(t, time.Minute, "/tasks/exit", map[string]any{"container_id": a, "id": "waiter", "exit_status": float64(137)})
	}
	if f.byContainerd {
		// containerd deleted the task itself, through the dead shim's `delete`.
		k.waitGoneOrStopped(t, a)
		_, _, _ = k.ctrCode(t, nil, "tasks", "delete", a)
		k.ctr(t, "containers", "delete", a)
	} else {
		k.waitStatus(t, a, "STOPPED")
		if st := k.deleteTask(t, a); st != 137 {
			t.Errorf("delete of %s reported exit status %d, want 137", a, st)
		}
	}
	if log := k.logSince(t, logStart); !strings.Contains(log, f.reason) || (!f.byContainerd && !strings.Contains(log, "guest lost")) {
		t.Errorf("the shim log does not say why the pod's processes died (want %q)", f.reason)
	}
	events.stop()
	k.checkNothingLeft(t, a)
}

// deadVMWhileStarting: the fault strikes while a second container of the pod is being created. Its start fails
// with an error, or it started just before and exits 137 like the first; either way delete works and nothing is
// left.
func deadVMWhileStarting(t *testing.T, k *kilnEnv, f deadVMFault) {
	pod := "s-" + f.name
	a, b := pod+"-a", pod+"-b"
	net := k.podNet(t)
	k.runDetached(t, a, append(append(podArgs(pod), net...), "--privileged"), sleeper...)
	k.waitStatus(t, a, "RUNNING")
	args := append([]string{"run", "-d"}, KilnRunArgs(k.cfg)...)
	args = append(append(append(args, podArgs(pod)...), net...), BusyboxRef, b)
	run := k.background(t, append(args, sleeper...)...)
	t.Cleanup(func() { k.remove(t, b) })
	k.waitShareHolds(t, a, b, time.Minute)

	f.inflict(t, k, pod, a)

	code, errOut := run()
	t.Logf("ctr run %s during the fault: exit %d, stderr %q", b, code, strings.TrimSpace(errOut))
	if code != 0 && strings.TrimSpace(errOut) == "" {
		t.Errorf("ctr run %s failed without an error message", b)
	}
	if f.name == "agent-hung" && k.taskStatus(t, a) == "RUNNING" {
		// The start failed on its timeout without a SIGKILL or a removal: give the guest up now.
		k.ctr(t, "tasks", "kill", "--signal", "SIGKILL", a)
	}
	for _, id := range []string{a, b} {
		if f.byContainerd {
			k.waitGoneOrStopped(t, id)
			_, _, _ = k.ctrCode(t, nil, "tasks", "delete", id)
		} else if st := k.taskStatus(t, id); st != "" {
			k.waitStatusWithin(t, id, "STOPPED", 2*time.Minute)
			if st := k.deleteTask(t, id); st != 137 {
				t.Errorf("delete of %s reported exit status %d, want 137", id, st)
			}
			continue
		}
		_, _, _ = k.ctrCode(t, nil, "containers", "delete", id)
	}
	k.checkNothingLeft(t, a, b)
}
