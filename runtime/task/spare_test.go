package task

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/kiln-runtime/kiln/config"
)

// A spare's shape goes through its command line as JSON and gives back the sized configuration; a shape that no
// configuration could have is refused, naming the key.
func TestSpareShape(t *testing.T) {
	cfg := config.Default()
	cfg.Hypervisor.Kernel, cfg.Hypervisor.Initrd = "", ""
	sized := cfg
	sized.Hypervisor.VCPUs, sized.Hypervisor.MemoryMiB = 3, 320
	sized.Hypervisor.KernelParams = []string{"quiet", "kiln.x=1"}
	b, err := json.Marshal(shapeOf(sized))
	if err != nil {
		t.Fatal(err)
	}
	var sh SpareShape
	if err := json.Unmarshal(b, &sh); err != nil {
		t.Fatal(err)
	}
	got, err := sh.sized(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, sized) {
		t.Errorf("shape %s gave %+v, want %+v", b, got.Hypervisor, sized.Hypervisor)
	}
	// A configuration that lists no kernel parameters ([]) gets a spare that compares equal to it.
	cfg.Hypervisor.KernelParams = []string{}
	if got, err := shapeOf(cfg).sized(cfg); err != nil || !reflect.DeepEqual(got, cfg) {
		t.Errorf("shape of a configuration with kernel_params = []: %+v, %v", got.Hypervisor, err)
	}
	if _, err := (SpareShape{VCPUs: 0, MemoryMiB: 256}).sized(cfg); err == nil || !strings.Contains(err.Error(), "hypervisor.vcpus") {
		t.Errorf("a shape of 0 vCPUs: %v, want hypervisor.vcpus refused", err)
	}
}
