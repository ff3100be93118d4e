package qemu

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/kiln-runtime/kiln/vm/vsock"
)

// diagnoseTimeout bounds guestDevices' questions to QEMU: it serves error paths, where QEMU may be wedged.
const diagnoseTimeout = 2 * time.Second

// trafficCounter is a vsock back end that counts its packets (vhostUserVsock).
type trafficCounter interface {
	traffic() vsock.Traffic
}

// guestDevices says, while QEMU still runs, what the guest made of its devices: for a VM restored from its
// template, how far the guest's drivers got with each hot-plugged device (QEMU's virtio status), and for any VM
// the packets its vsock device exchanged with the guest. It tells a guest that never took up a device (a lost
// hot-plug) from one whose agent never answered on it. Empty once QEMU has exited.
//
// Like the rest of Diagnostics it reads the machine without its lock: it serves the error paths of start, which
// runs under the lock, and of the machine's owner, while nothing else changes the machine.
func (m *Machine) guestDevices() string {
	select {
	case <-m.exited:
		return ""
	default:
	}
	restored, cfg, q, vs := m.restored, m.cfg, m.qmp, m.vsock
	var parts []string
	if restored && q != nil {
		ctx, cancel := context.WithTimeout(context.Background(), diagnoseTimeout)
		defer cancel()
		for _, d := range hotplugDevices(cfg) {
			id, _ := d["id"].(string)
			var st virtioStatus
			if err := q.execute(ctx, "x-query-virtio-status", map[string]any{"path": "/machine/peripheral/" + id + "/virtio-backend"}, &st); err != nil {
				parts = append(parts, fmt.Sprintf("%s: %v", id, err))
				continue
			}
			parts = append(parts, id+": "+st.String())
		}
	}
	if tc, ok := vs.(trafficCounter); ok {
		t := tc.traffic()
		parts = append(parts, fmt.Sprintf("vsock packets: %d from the guest, %d to it", t.FromGuest, t.ToGuest))
	}
	if len(parts) == 0 {
		return ""
	}
	return "\nthe guest's devices: " + strings.Join(parts, "; ")
}

// virtioStatus is what guestDevices reads of QEMU's x-query-virtio-status.
type virtioStatus struct {
	Status struct {
		// Statuses are the device status bits the guest's driver set, as "VIRTIO_CONFIG_S_<BIT>: <meaning>".
		Statuses []string `json:"statuses"`
	} `json:"status"`
	VhostDev     *struct{} `json:"vhost-dev"` // present for a vhost(-user) device
	VhostStarted bool      `json:"vhost-started"`
	Broken       bool      `json:"broken"`
}

// String is the status bits the driver set (DRIVER_OK once it is ready), and for a vhost-user device whether
// its back end was started.
func (s virtioStatus) String() string {
	var bits []string
	for _, st := range s.Status.Statuses {
		name, _, _ := strings.Cut(st, ":")
		bits = append(bits, strings.TrimPrefix(name, "VIRTIO_CONFIG_S_"))
	}
	out := "no driver (status 0)"
	if len(bits) > 0 {
		out = strings.Join(bits, "|")
	}
	if s.VhostDev != nil {
		if s.VhostStarted {
			out += ", back end started"
		} else {
			out += ", back end not started"
		}
	}
	if s.Broken {
		out += ", broken"
	}
	return out
}
