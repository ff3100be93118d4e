// Command fastpath times pods started cold (microvm boot) against pods restored from a template
// (hypervisor.fast_start = "template"), interleaved in one sitting, through runtime/pod as the shim starts them:
// "ready" is pod.New (VM start, agent health check, SeedGuest, which in a clone includes the share mount);
// "container" adds creating, starting and waiting for a busybox container on the share. Run it under
// `flock -s /tmp/kiln-vm-tests.lock`.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/integration/testbundle"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/stdio"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

func main() {
	n := flag.Int("n", 5, "rounds (one cold and one clone pod each)")
	share := flag.String("share", "_output/share/kiln", "guest assets")
	templates := flag.String("templates", "/dev/shm/kiln-fastpath-bench/templates", "template directory (tmpfs)")
	debug := flag.Bool("debug", false, "debug log (the clones' time breakdown)")
	flag.DurationVar(&idle, "idle", 0, "after the container, wait this long and measure QEMU's memory (0: skip)")
	flag.Parse()
	logrus.SetLevel(logrus.WarnLevel)
	if *debug {
		logrus.SetLevel(logrus.DebugLevel)
	}
	if err := run(*n, *share, *templates); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

var idle time.Duration

type result struct {
	ready, container, stop time.Duration
	mem                    string
}

// memory is QEMU's proportional set (anonymous: heap and TCG cache; shmem: the guest RAM pages it maps) and the
// data a clone's RAM file holds on tmpfs.
func memory(pid int, ramFile string) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	f := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			f[k] = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB"))
		}
	}
	out := fmt.Sprintf("QEMU Pss %s kB (Pss_Anon %s, Pss_Shmem %s)", f["Pss"], f["Pss_Anon"], f["Pss_Shmem"])
	var st unix.Stat_t
	if ramFile != "" && unix.Stat(ramFile, &st) == nil {
		out += fmt.Sprintf(", RAM file holds %d kB", st.Blocks*512/1024)
	}
	return out
}

func run(n int, share, templates string) error {
	ctx := context.Background()
	tmp, err := os.MkdirTemp("", "kiln-fastpath-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bdir := filepath.Join(tmp, "bundle")
	if err := testbundle.Rootfs(filepath.Join(bdir, "rootfs")); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(templates), 0o711); err != nil {
		return err
	}
	defer os.RemoveAll(filepath.Dir(templates))
	share, _ = filepath.Abs(share)
	cfgFor := func(mode string) config.Config {
		c := config.Default()
		c.Runtime.StateDir = filepath.Join(tmp, "state")
		c.Hypervisor.Kernel = filepath.Join(share, "vmlinuz")
		c.Hypervisor.Initrd = filepath.Join(share, "initrd.img")
		c.Hypervisor.FastStart = mode
		c.Hypervisor.TemplateDir = templates
		return c
	}
	one := func(mode string, i int) (result, error) {
		var r result
		id := fmt.Sprintf("fp-%s-%d", mode, i)
		start := time.Now()
		p, err := pod.New(ctx, pod.Options{ID: id, Config: cfgFor(mode), Log: logrus.WithField("pod", id)})
		if err != nil {
			return r, err
		}
		r.ready = time.Since(start)
		c, err := p.CreateContainer(ctx, pod.ContainerOptions{ID: "c", Bundle: &bundle.Bundle{Dir: bdir,
			Spec: testbundle.Spec("sh", "-c", "echo hello; cat /proc/cmdline"), Rootfs: filepath.Join(bdir, "rootfs")}, IO: stdio.IO{}})
		if err == nil {
			if err = c.Start(ctx); err == nil {
				if ex, werr := c.Wait(ctx); werr != nil || ex.Status != 0 {
					err = fmt.Errorf("container: status %d, %v", ex.Status, werr)
				}
			}
		}
		r.container = time.Since(start)
		if err == nil && idle > 0 {
			time.Sleep(idle)
			ram := ""
			if mode == config.FastStartTemplate {
				ram = filepath.Join(templates, "clones", id+".ram")
			}
			r.mem = memory(p.Machine().(*qemu.Machine).PID(), ram)
		}
		if err == nil {
			_, err = p.DeleteContainer(ctx, c, true)
		}
		s := time.Now()
		if cerr := p.Close(ctx); err == nil {
			err = cerr
		}
		r.stop = time.Since(s)
		return r, err
	}
	t := time.Now()
	if _, err := one(config.FastStartTemplate, -1); err != nil {
		return fmt.Errorf("warm-up (template build): %w", err)
	}
	fmt.Printf("warm-up pod (builds the template): %v\n", time.Since(t).Round(time.Millisecond))
	res := map[string][]result{}
	for i := range n {
		for _, mode := range []string{config.FastStartOff, config.FastStartTemplate} {
			r, err := one(mode, i)
			if err != nil {
				return fmt.Errorf("%s round %d: %w", mode, i, err)
			}
			res[mode] = append(res[mode], r)
			fmt.Printf("round %d %-8s ready %6d ms  container done %6d ms  stop %5d ms  %s\n", i, mode, r.ready.Milliseconds(), r.container.Milliseconds(), r.stop.Milliseconds(), r.mem)
		}
	}
	med := func(rs []result, f func(result) time.Duration) int64 {
		var d []time.Duration
		for _, r := range rs {
			d = append(d, f(r))
		}
		slices.Sort(d)
		return d[len(d)/2].Milliseconds()
	}
	for _, mode := range []string{config.FastStartOff, config.FastStartTemplate} {
		rs := res[mode]
		fmt.Printf("median %-8s ready %6d ms  container done %6d ms  stop %5d ms\n", mode,
			med(rs, func(r result) time.Duration { return r.ready }), med(rs, func(r result) time.Duration { return r.container }),
			med(rs, func(r result) time.Duration { return r.stop }))
	}
	left, _ := os.ReadDir(filepath.Join(templates, "clones"))
	fmt.Printf("clone RAM copies left: %d\n", len(left))
	return nil
}
