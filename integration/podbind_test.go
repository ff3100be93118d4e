package integration

import (
	"bytes"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// Two containers of a pod that bind one host directory (an emptyDir between an app and its sidecar) see one file
// system in the guest, as runc's see one inode: a lock one of them holds keeps the other out, an inotify watch in
// one sees a file the other creates, and what one writes the other reads.
func TestPodContainersShareABoundDirectory(t *testing.T) {
	v := newContainerVM(t, 256)
	v.installStatic(t, "./integration/lockguest")
	vol := t.TempDir()
	withVol := func(args ...string) *specs.Spec {
		spec := v.spec(args...)
		spec.Mounts = append(spec.Mounts, specs.Mount{Destination: "/vol", Type: "bind", Source: vol, Options: []string{"rbind"}})
		return spec
	}
	var holderOut bytes.Buffer
	holder := v.create(t, "holder", withVol("lockguest", "hold", "/vol/lock", "/vol/state"), "", stdio.IO{Stdout: &holderOut, Stderr: &holderOut})
	ctx := testCtx(t, 3*time.Minute)
	if err := holder.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	probe := v.create(t, "probe", withVol("sh", "-c", `
for i in $(seq 60); do [ -s /vol/state ] && break; sleep 1; done
cat /vol/state
lockguest try /vol/lock
lockguest watch /vol`), "", stdio.IO{Stdout: &out, Stderr: &errOut})
	if err := probe.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := probe.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Fields(out.String()), []string{"locked", "held", "seen"}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("the second container saw %q, want %q (stderr %q; the first container's output %q)", got, want, errOut.String(), holderOut.String())
	}
}
