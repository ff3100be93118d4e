package containerd

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestKilnLogURIs(t *testing.T) {
	k := startKiln(t)
	dir := t.TempDir()
	run := func(id, uri string) {
		t.Helper()
		args := append(append([]string{"run", "--rm", "--log-uri", uri}, KilnRunArgs(k.cfg)...),
			BusyboxRef, id, "sh", "-c", "echo to-out; echo to-err >&2")
		if _, errOut, code := k.ctrCode(t, nil, args...); code != 0 {
			t.Fatalf("%s: exit %d: %s", uri, code, errOut)
		}
	}
	t.Run("file", func(t *testing.T) {
		path := filepath.Join(dir, "file.log")
		run("kiln-log-file", "file://"+path)
		b, err := os.ReadFile(path)
		if err != nil || !strings.Contains(string(b), "to-out") || !strings.Contains(string(b), "to-err") {
			t.Errorf("file log %q (%v)", b, err)
		}
	})
	t.Run("binary", func(t *testing.T) {
		logger := filepath.Join(dir, "logger")
		dest := filepath.Join(dir, "bin")
		script := "#!/bin/sh\nexec 5>&-\ncat <&3 > \"$2.out\" &\ncat <&4 > \"$2.err\" &\nwait\n"
		if err := os.WriteFile(logger, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		run("kiln-log-binary", "binary://"+logger+"?dest="+dest)
		deadline := time.Now().Add(10 * time.Second)
		for {
			out, _ := os.ReadFile(dest + ".out")
			errb, _ := os.ReadFile(dest + ".err")
			if string(out) == "to-out\n" && string(errb) == "to-err\n" {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("binary logger got stdout %q, stderr %q", out, errb)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
}

func TestKilnNativeSnapshotter(t *testing.T) {
	k := startKiln(t)
	args := append(append([]string{"run", "--rm", "--snapshotter", "native"}, KilnRunArgs(k.cfg)...),
		BusyboxRef, "kiln-native", "sh", "-c", "touch /written && cat /etc/passwd | head -1")
	out, errOut, code := k.ctrCode(t, nil, args...)
	if code != 0 || !strings.HasPrefix(out, "root:") {
		t.Fatalf("native snapshotter: exit %d, out %q, stderr %s", code, out, errOut)
	}
}

func TestKilnOOM(t *testing.T) {
	k := startKiln(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	evCmd := k.d.CtrCommand(ctx, "events")
	var events strings.Builder
	evCmd.Stdout = &events
	if err := evCmd.Start(); err != nil {
		t.Fatal(err)
	}
	// 32 MiB limit; the shell's string doubles until the guest's OOM killer ends it.
	args := append(append([]string{"run", "--rm", "--memory-limit", "33554432"}, KilnRunArgs(k.cfg)...),
		BusyboxRef, "kiln-oom", "sh", "-c", "x=xxxxxxxxxxxxxxxx; while true; do x=$x$x; done")
	_, errOut, code := k.ctrCode(t, nil, args...)
	if code != 137 {
		t.Fatalf("exit %d after exceeding the memory limit, want 137 (OOM kill); stderr %s", code, errOut)
	}
	time.Sleep(300 * time.Millisecond)
	_ = evCmd.Process.Kill()
	_ = evCmd.Wait()
	if !strings.Contains(events.String(), "/tasks/oom") || !strings.Contains(events.String(), `"container_id":"kiln-oom"`) {
		t.Errorf("no /tasks/oom event for kiln-oom; events:\n%s", events.String())
	}
}
