package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/kiln-runtime/kiln/config"
)

// TestTemplateClones starts two pods with fast_start = "template": the first builds the template and both are
// restored from it, with their vsock and virtio-fs devices hot-plugged. Each runs a container from the share
// (which the agent mounted after the restore); the two guests must not share a boot id, the template's files must
// not change while clones run, and the clones must leave nothing behind.
func TestTemplateClones(t *testing.T) {
	requireVM(t)
	// The template and the clones' RAM live on tmpfs, as in production; QEMU's user must reach them.
	top, err := os.MkdirTemp("/dev/shm", "kiln-it-tpl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(top) })
	if err := os.Chmod(top, 0o711); err != nil {
		t.Fatal(err)
	}
	templates := filepath.Join(top, "templates")
	fast := func(c *config.Config) {
		c.Hypervisor.FastStart = config.FastStartTemplate
		c.Hypervisor.TemplateDir = templates
	}

	var sums map[string]string
	bootIDs := map[string]string{}
	for _, name := range []string{"first", "second"} {
		t.Run(name, func(t *testing.T) {
			hook := new(logtest.Hook)
			v := newContainerVMWith(t, 256, fast, hook)
			for _, e := range hook.AllEntries() {
				if strings.Contains(e.Message, "template") {
					t.Fatalf("pod did not start from the template: %s: %v", e.Message, e.Data)
				}
			}
			if sums == nil {
				sums = templateSums(t, templates)
			}
			out, errOut, status := v.output(t, "probe", v.spec("sh", "-c", "cat /proc/cmdline /proc/sys/kernel/random/boot_id"))
			if status != 0 {
				t.Fatalf("container status %d, stderr %q", status, errOut)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if len(lines) != 2 || !strings.Contains(lines[0], "kiln.template=1") {
				t.Fatalf("container saw %q, want the template guest's command line and a boot id", out)
			}
			bootIDs[name] = lines[1]
		})
	}
	if t.Failed() {
		return
	}
	if bootIDs["first"] == bootIDs["second"] {
		t.Errorf("both clones report boot id %s", bootIDs["first"])
	}
	if got := templateSums(t, templates); !equalSums(got, sums) {
		t.Errorf("template files changed while clones ran: before %v, after %v", sums, got)
	}
	clones, err := os.ReadDir(filepath.Join(templates, "clones"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range clones {
		t.Errorf("clone left %s behind", e.Name())
	}
}

// TestTemplateRestoreFailureBootsCold damages a template's saved state after a first pod built it: the next pod's
// restore fails once its QEMU runs, and the pod boots the usual way instead, with a warning, leaving nothing of
// the failed clone behind (the harness checks the state root, QEMU processes and virtiofsd) and removing the
// template QEMU refused.
func TestTemplateRestoreFailureBootsCold(t *testing.T) {
	requireVM(t)
	top, err := os.MkdirTemp("/dev/shm", "kiln-it-tpl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(top) })
	if err := os.Chmod(top, 0o711); err != nil {
		t.Fatal(err)
	}
	templates := filepath.Join(top, "templates")
	fast := func(c *config.Config) {
		c.Hypervisor.FastStart = config.FastStartTemplate
		c.Hypervisor.TemplateDir = templates
	}
	t.Run("build", func(t *testing.T) {
		hook := new(logtest.Hook)
		newContainerVMWith(t, 256, fast, hook)
		for _, e := range hook.AllEntries() {
			if strings.Contains(e.Message, "template") {
				t.Fatalf("pod did not start from the template: %s: %v", e.Message, e.Data)
			}
		}
	})
	states, err := filepath.Glob(filepath.Join(templates, "*", "state"))
	if err != nil || len(states) != 1 {
		t.Fatalf("template state files %v (%v), want one", states, err)
	}
	if err := os.Truncate(states[0], 64); err != nil {
		t.Fatal(err)
	}
	t.Run("damaged", func(t *testing.T) {
		hook := new(logtest.Hook)
		v := newContainerVMWith(t, 256, fast, hook)
		warned := false
		for _, e := range hook.AllEntries() {
			warned = warned || strings.Contains(e.Message, "from its template failed")
		}
		if !warned {
			t.Errorf("no warning about the failed restore; log: %v", hook.AllEntries())
		}
		out, errOut, status := v.output(t, "probe", v.spec("cat", "/proc/cmdline"))
		if status != 0 || strings.Contains(out, "kiln.template") {
			t.Fatalf("container saw %q (status %d, stderr %q), want a cold-booted guest", out, status, errOut)
		}
	})
	clones, err := os.ReadDir(filepath.Join(templates, "clones"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range clones {
		t.Errorf("failed clone left %s behind", e.Name())
	}
	// The refused template is gone, so that the next pod builds a good one.
	if left, _ := filepath.Glob(filepath.Join(templates, "*", "*")); len(left) != 0 {
		t.Errorf("refused template still there: %v", left)
	}
}

// templateSums are the SHA-256 sums of every template file under dir (path relative to dir), clones excluded.
func templateSums(t *testing.T, dir string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	tpls, err := filepath.Glob(filepath.Join(dir, "*", "*"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range tpls {
		rel, _ := filepath.Rel(dir, p)
		if strings.HasPrefix(rel, "clones"+string(filepath.Separator)) {
			continue
		}
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		sums[rel] = hex.EncodeToString(h.Sum(nil))
	}
	if len(sums) != 2 {
		t.Fatalf("template files %v, want one template's ram and state", sums)
	}
	return sums
}

func equalSums(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
