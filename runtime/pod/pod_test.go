package pod

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/sirupsen/logrus"
)

// A share whose owner is gone is removed before a pod boots; one whose owner lives, or that has no owner file
// (being created right now), stays.
func TestSweepRemovesSharesOfDeadOwners(t *testing.T) {
	state := t.TempDir()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		id    string
		owner string // "" for no owner file
		stays bool
	}{
		{"dead", strconv.Itoa(dead.Process.Pid), false},
		{"alive", strconv.Itoa(os.Getpid()), true},
		{"creating", "", true},
	}
	for _, c := range cases {
		dir := ShareDir(state, c.id)
		if err := os.MkdirAll(filepath.Join(dir, "mounts"), 0o700); err != nil {
			t.Fatal(err)
		}
		if c.owner != "" {
			if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(c.owner), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	sweep(state, logrus.NewEntry(logrus.New()))
	for _, c := range cases {
		_, err := os.Stat(ShareDir(state, c.id))
		if stays := err == nil; stays != c.stays {
			t.Errorf("share %s: stays = %t, want %t (%v)", c.id, stays, c.stays, err)
		}
	}
}
