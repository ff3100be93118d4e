package integration

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/integration/testbundle"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// A binary given a file capability on the host (setcap cap_net_bind_service+ep) gives it to a process that is not
// root, as with runc, when shared_fs.xattr is on; with it off the guest sees no capability.
func TestFileCapabilities(t *testing.T) {
	for _, tc := range []struct {
		name  string
		xattr bool
		want  string
	}{
		{name: "xattr", xattr: true, want: "0000000000000400"},
		{name: "no_xattr", xattr: false, want: "0000000000000000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newContainerVMWith(t, 256, func(c *config.Config) { c.SharedFS.Xattr = tc.xattr }, nil)
			dir := filepath.Join(v.bundle, "rootfs", "opt", "cap")
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			capped := filepath.Join(dir, "busybox") // its name is the applet busybox runs as
			b, err := os.ReadFile(testbundle.Busybox)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(capped, b, 0o755); err != nil {
				t.Fatal(err)
			}
			// struct vfs_cap_data, revision 2: magic with the effective flag, then permitted and inheritable of
			// the two 32-bit halves. CAP_NET_BIND_SERVICE is 10.
			var data bytes.Buffer
			for _, v := range []uint32{0x02000000 | 1, 1 << 10, 0, 0, 0} {
				_ = binary.Write(&data, binary.LittleEndian, v)
			}
			if err := unix.Setxattr(capped, "security.capability", data.Bytes(), 0); err != nil {
				t.Fatal(err)
			}
			spec := v.spec("/opt/cap/busybox", "cat", "/proc/self/status")
			spec.Process.User.UID, spec.Process.User.GID = testbundle.UserUID, testbundle.UserGID
			spec.Process.NoNewPrivileges = false
			var out bytes.Buffer
			c := v.create(t, "capped", spec, "", stdio.IO{Stdout: &out})
			ctx := testCtx(t, 2*time.Minute)
			if err := c.Start(ctx); err != nil {
				t.Fatal(err)
			}
			if e, err := c.Wait(ctx); err != nil || e.Status != 0 {
				t.Fatalf("capped busybox: %+v, %v", e, err)
			}
			var eff string
			for _, line := range strings.Split(out.String(), "\n") {
				if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
					eff = strings.TrimSpace(v)
				}
			}
			if eff != tc.want {
				t.Errorf("effective capabilities of the capped binary run as uid %d: %q, want %s\n%s", testbundle.UserUID, eff, tc.want, out.String())
			}
		})
	}
}
