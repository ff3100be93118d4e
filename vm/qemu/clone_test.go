package qemu

import (
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/sirupsen/logrus"
)

// A clone's template found wanting is discarded only if it is still the one the clone took: one built again
// meanwhile, by a VM that found the first wanting before, stays.
func TestDiscardTemplateLeavesItsReplacement(t *testing.T) {
	log := logrus.New()
	log.SetOutput(io.Discard)
	for _, replaced := range []bool{false, true} {
		dir := filepath.Join(t.TempDir(), "key")
		if err := os.Mkdir(dir, 0o711); err != nil {
			t.Fatal(err)
		}
		id, err := dirID(dir)
		if err != nil {
			t.Fatal(err)
		}
		if replaced {
			// Discarded and built again: a new directory of the same name.
			if err := os.Rename(dir, dir+".old"); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(dir, 0o711); err != nil {
				t.Fatal(err)
			}
		}
		discardTemplate(template{dir: dir, id: id}, logrus.NewEntry(log), "a guest restored from it did not come up")
		if _, err := os.Stat(dir); (err == nil) != replaced {
			t.Errorf("replaced %v: after the discard the template directory: %v", replaced, err)
		}
	}
}
