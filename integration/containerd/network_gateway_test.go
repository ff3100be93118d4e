package containerd

import (
	"context"
	"os/exec"
	"strings"
	"testing"
)

// TestKilnGatewayOnTheLink: a pod wired as Calico and the AWS VPC CNI wire theirs (a /32 address on a veth, the
// default route through 169.254.1.1, which only a link route reaches) runs, answers from the host on its
// address, and its guest has the same routes.
func TestKilnGatewayOnTheLink(t *testing.T) {
	const (
		ns   = "kilngw-c3d4"
		host = "kvgw-c3d4"
		ip   = "10.233.1.5"
	)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	k := startKiln(t)
	run("ip", "netns", "add", ns)
	t.Cleanup(func() {
		_ = exec.Command("ip", "link", "del", host).Run()
		_ = exec.Command("ip", "netns", "del", ns).Run()
	})
	run("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
	run("ip", "link", "set", host, "up")
	run("ip", "route", "add", ip+"/32", "dev", host)
	mac, err := exec.Command("cat", "/sys/class/net/"+host+"/address").Output()
	if err != nil {
		t.Fatal(err)
	}
	// No duplicate address detection on eth0: its link-local address would show tentative in the listing taken
	// before the pod and not in the one after.
	run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
	for _, c := range []string{
		"link set lo up",
		"link set eth0 up",
		"addr add " + ip + "/32 dev eth0",
		"route add 169.254.1.1 dev eth0 scope link",
		"route add default via 169.254.1.1 dev eth0",
		// Calico's host answers for 169.254.1.1 by proxy ARP; a permanent entry does not depend on the host's
		// own routes.
		"neigh add 169.254.1.1 lladdr " + strings.TrimSpace(string(mac)) + " dev eth0 nud permanent",
	} {
		run(append([]string{"ip", "-n", ns}, strings.Fields(c)...)...)
	}
	before := netnsListing(t, ns)

	k.runDetached(t, "gw", []string{"--with-ns", "network:/var/run/netns/" + ns}, httpServer("kiln-gw")...)
	if got := strings.TrimSpace(httpGet(t, "http://"+ip+":8080/")); got != "kiln-gw" {
		t.Errorf("pod answered %q", got)
	}
	out, _, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "route", "gw", "ip", "route")
	if code != 0 || !strings.Contains(out, "default via 169.254.1.1 dev eth0") || !strings.Contains(out, "169.254.1.1 dev eth0 scope link") {
		t.Errorf("guest routes (exit %d):\n%s", code, out)
	}
	k.remove(t, "gw")
	if pids := k.d.WaitShimsGone(context.Background(), shimExitTimeout); len(pids) > 0 {
		t.Fatalf("shims still running: %v", pids)
	}
	if after := netnsListing(t, ns); after != before {
		t.Errorf("namespace changed by the pod:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}
