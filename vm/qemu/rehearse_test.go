package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// RehearseNIC plugs its NIC on a hub port, runs the guest's part, unplugs the NIC and waits until QEMU has removed
// it, and removes the back end whatever failed on the way, a cancelled context included; PlugNets is refused
// meanwhile, and after an unplug that failed the port stays lost to it; a VM without hot-plug takes none.
func TestRehearseNIC(t *testing.T) {
	const (
		ok         = `{"return": {}}`
		gone       = `{"return": [{"name": "vsock0", "type": "child<vhost-user-vsock-pci>"}]}`
		refused    = `{"error": {"class": "GenericError", "desc": "Bus 'rp5' does not support hotplugging"}}`
		delRefused = `{"error": {"class": "GenericError", "desc": "Device nic3 is being removed already"}}`
	)
	// The rehearsal's NIC is on the last root port.
	present := fmt.Sprintf(`{"return": [{"name": "vsock0", "type": "child<vhost-user-vsock-pci>"}, {"name": "nic%d", "type": "child<virtio-net-pci>"}]}`, maxCloneNets-1)
	guestErr := errors.New("the agent said no")
	cases := []struct {
		name     string
		answers  []string
		guest    func(cancel context.CancelFunc) error
		want     []string
		wantErr  string
		guestRan bool
		stuck    bool
		// cancelAfter, when set, cancels the rehearsal's context that long after it began.
		cancelAfter time.Duration
	}{
		{name: "rehearsed", answers: []string{ok, ok, ok, present, present, gone, ok}, guestRan: true,
			want: []string{"netdev_add", "device_add", "device_del", "qom-list", "qom-list", "qom-list", "netdev_del"}},
		{name: "device refused", answers: []string{ok, refused, ok}, wantErr: "does not support hotplugging",
			want: []string{"netdev_add", "device_add", "netdev_del"}},
		{name: "guest failed", answers: []string{ok, ok, ok, gone, ok}, guest: func(context.CancelFunc) error { return guestErr },
			guestRan: true, wantErr: "the agent said no",
			want: []string{"netdev_add", "device_add", "device_del", "qom-list", "netdev_del"}},
		{name: "cancelled", answers: []string{ok, ok, ok, gone, ok},
			guest:    func(cancel context.CancelFunc) error { cancel(); return context.Canceled },
			guestRan: true, wantErr: "context canceled",
			want: []string{"netdev_add", "device_add", "device_del", "qom-list", "netdev_del"}},
		{name: "unplug refused", answers: []string{ok, ok, delRefused, ok}, guestRan: true, wantErr: "being removed", stuck: true,
			want: []string{"netdev_add", "device_add", "device_del", "netdev_del"}},
		// The caller gives up while QEMU plugs the device: the rehearsal unplugs what QEMU then plugged.
		{name: "cancelled during device_add", answers: []string{ok, answerLate + ok, present, ok, gone, ok}, cancelAfter: 50 * time.Millisecond,
			wantErr: "context canceled", want: []string{"netdev_add", "device_add", "qom-list", "device_del", "qom-list", "netdev_del"}},
		{name: "cancelled during netdev_add", answers: []string{answerLate + ok, ok}, cancelAfter: 50 * time.Millisecond,
			wantErr: "context canceled", want: []string{"netdev_add", "netdev_del"}},
		{name: "cancelled, device refused", answers: []string{ok, answerLate + refused, gone, ok}, cancelAfter: 50 * time.Millisecond,
			wantErr: "context canceled", want: []string{"netdev_add", "device_add", "qom-list", "netdev_del"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path, got := fakeQMP(t, append([]string{ok}, tc.answers...)...)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			next := func() string {
				select {
				case c := <-got:
					return c
				case <-time.After(10 * time.Second):
					t.Fatal("QMP command did not come")
					return ""
				}
			}
			q, err := dialQMP(ctx, path, make(chan struct{}))
			if err != nil {
				t.Fatal(err)
			}
			defer q.close()
			next() // qmp_capabilities
			m := &Machine{cfg: Config{ID: "t"}, qmp: q, restored: true}
			if !m.Hotplug() {
				t.Fatal("a restored VM says it has no hot-plug")
			}
			rctx, rcancel := context.WithCancel(ctx)
			defer rcancel()
			if tc.cancelAfter > 0 {
				time.AfterFunc(tc.cancelAfter, rcancel)
			}
			ran := false
			err = m.RehearseNIC(rctx, net.HardwareAddr{2, 0, 0, 0, 0, 1}, 1500, func(context.Context) error {
				ran = true
				if err := m.PlugNets(ctx, []Net{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}}}); err == nil || !strings.Contains(err.Error(), "rehearsal holds") {
					t.Errorf("PlugNets during a rehearsal = %v, want a refusal", err)
				}
				if tc.guest == nil {
					return nil
				}
				return tc.guest(rcancel)
			})
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Errorf("RehearseNIC = %v, want error %q", err, tc.wantErr)
			}
			if ran != tc.guestRan {
				t.Errorf("guest ran: %v, want %v", ran, tc.guestRan)
			}
			var cmds []string
			for range tc.want {
				cmds = append(cmds, next())
			}
			if !slices.Equal(cmds, tc.want) {
				t.Errorf("QMP commands %v, want %v", cmds, tc.want)
			}
			if tc.stuck {
				if err := m.PlugNets(ctx, make([]Net, maxCloneNets)); err == nil || !strings.Contains(err.Error(), "root ports") {
					t.Errorf("PlugNets of %d NICs after a failed unplug = %v, want a refusal", maxCloneNets, err)
				}
				if err := m.RehearseNIC(ctx, net.HardwareAddr{2, 0, 0, 0, 0, 1}, 1500, func(context.Context) error { return nil }); err == nil {
					t.Error("a second rehearsal on a lost port succeeded")
				}
			} else if m.rehearsal != rehearsalFree {
				t.Errorf("the rehearsal's port is %v after the rehearsal, want free", m.rehearsal)
			}
		})
	}

	cold := &Machine{cfg: Config{ID: "cold"}}
	if cold.Hotplug() {
		t.Error("a VM booted cold says it has hot-plug")
	}
	if err := cold.RehearseNIC(context.Background(), net.HardwareAddr{2, 0, 0, 0, 0, 1}, 1500, func(context.Context) error { return nil }); err == nil {
		t.Error("RehearseNIC in a VM without hot-plug succeeded")
	}
	full := &Machine{cfg: Config{ID: "full", Nets: make([]Net, maxCloneNets)}, qmp: &qmpConn{}, restored: true}
	if err := full.RehearseNIC(context.Background(), net.HardwareAddr{2, 0, 0, 0, 0, 1}, 1500, func(context.Context) error { return nil }); err == nil || !strings.Contains(err.Error(), "holds a NIC") {
		t.Errorf("RehearseNIC with every root port taken = %v, want a refusal", err)
	}
}

// A PlugNets that QEMU does not answer holds neither the Machine's lock, which Stop takes, nor another hot-plug's
// port: a second PlugNets and a rehearsal are refused meanwhile, and the NIC index it used is not used again.
func TestPlugNetsDoesNotHoldTheMachine(t *testing.T) {
	path, got := fakeQMP(t, `{"return": {}}`) // qmp_capabilities; getfd is never answered
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	q, err := dialQMP(ctx, path, make(chan struct{}))
	if err != nil {
		t.Fatal(err)
	}
	defer q.close()
	<-got
	tap, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer tap.Close()
	m := &Machine{cfg: Config{ID: "t"}, qmp: q, restored: true}
	pctx, pcancel := context.WithCancel(ctx)
	defer pcancel() // first of the deferred calls: a failure below must not leave PlugNets waiting
	plugged := make(chan error, 1)
	go func() { plugged <- m.PlugNets(pctx, []Net{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, Tap: tap}}) }()
	locked := make(chan struct{})
	go func() {
		for !m.isPlugging() {
			time.Sleep(time.Millisecond)
		}
		_ = m.Foreground() // Stop's first step under the lock
		_ = m.PID()
		close(locked)
	}()
	select {
	case <-locked:
	case <-time.After(10 * time.Second):
		t.Fatal("the Machine's lock is held while QEMU does not answer a hot-plug")
	}
	if err := m.PlugNets(ctx, []Net{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 3}, Tap: tap}}); err == nil || !strings.Contains(err.Error(), "being hot-plugged") {
		t.Errorf("PlugNets beside another = %v, want a refusal", err)
	}
	if err := m.RehearseNIC(ctx, net.HardwareAddr{2, 0, 0, 0, 0, 1}, 1500, func(context.Context) error { return nil }); err == nil || !strings.Contains(err.Error(), "being hot-plugged") {
		t.Errorf("RehearseNIC beside a PlugNets = %v, want a refusal", err)
	}
	pcancel()
	if err := <-plugged; !errors.Is(err, context.Canceled) {
		t.Errorf("PlugNets QEMU did not answer = %v, want context.Canceled", err)
	}
	if m.isPlugging() || m.plugged != 1 {
		t.Errorf("after PlugNets: plugging %v, %d NIC indexes used, want false and 1", m.isPlugging(), m.plugged)
	}
}

func (m *Machine) isPlugging() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.plugging
}
