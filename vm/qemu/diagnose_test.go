package qemu

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/vm/vsock"
)

// countingVsock is a vsock back end with packet counts.
type countingVsock struct {
	noVsock
	t vsock.Traffic
}

func (c countingVsock) traffic() vsock.Traffic { return c.t }

// A clone whose agent did not answer: the diagnostics say how far the guest's drivers got with each hot-plugged
// device, from QEMU's own replies, and what the vsock device exchanged with the guest.
func TestGuestDevices(t *testing.T) {
	// Trimmed from QEMU 7.2's replies, each on one line as QEMU sends it: a clone's vsock device once its guest
	// took it up, a device its guest never touched, and a device that is not there.
	ready := oneLine(`{"return": {"name": "vhost-vsock", "started": true, "broken": false, "vhost-started": true,
		"vhost-dev": {"nvqs": 2}, "status": {"statuses": ["VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found",
		"VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device", "VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete",
		"VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready"]}}}`)
	untouched := oneLine(`{"return": {"name": "vhost-user-fs", "started": false, "broken": false, "vhost-started": false,
		"vhost-dev": {"nvqs": 2}, "status": {"statuses": []}}}`)
	missing := `{"error": {"class": "GenericError", "desc": "Path '/machine/peripheral/nic0/virtio-backend' not found"}}`
	nic := []Net{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}}
	traffic := countingVsock{t: vsock.Traffic{FromGuest: 0, ToGuest: 1}}
	tests := []struct {
		name     string
		restored bool
		exited   bool
		answers  []string
		want     string
	}{
		{"clone", true, false, []string{ready, untouched, missing},
			"\nthe guest's devices: vsock0: ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK, back end started; " +
				"fs0: no driver (status 0), back end not started; " +
				"nic0: QMP x-query-virtio-status: Path '/machine/peripheral/nic0/virtio-backend' not found; " +
				"vsock packets: 0 from the guest, 1 to it"},
		{"booted VM", false, false, nil, "\nthe guest's devices: vsock packets: 0 from the guest, 1 to it"},
		{"QEMU exited", true, true, nil, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path, got := fakeQMP(t, append([]string{`{"return": {}}`}, tc.answers...)...)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			exited := make(chan struct{})
			q, err := dialQMP(ctx, path, exited)
			if err != nil {
				t.Fatal(err)
			}
			defer q.close()
			<-got // qmp_capabilities
			if tc.exited {
				close(exited)
			}
			m := &Machine{cfg: Config{ID: "t", SharedDir: "/share", Nets: nic}, qmp: q, restored: tc.restored,
				vsock: traffic, exited: exited}
			if d := m.guestDevices(); d != tc.want {
				t.Errorf("guestDevices =\n%q\nwant\n%q", d, tc.want)
			}
			for range tc.answers {
				if c := <-got; c != "x-query-virtio-status" {
					t.Errorf("asked QEMU %s", c)
				}
			}
		})
	}
}

// oneLine joins a JSON text written over several lines.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
