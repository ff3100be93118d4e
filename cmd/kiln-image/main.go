// Command kiln-image builds Kiln's guest kernel and initramfs (see package
// vm/image):
//
//	kiln-image --init _output/bin/kiln-agent --kernel _output/cache/kernel-<key>/bzImage \
//		--kernel-release 6.1.192-kiln --out _output/share/kiln
//
// writes vmlinuz, kernel-release and initrd.img under --out, rewriting only
// files whose content changed. --kernel is Kiln's own kernel (vm/image/kernel/build.sh), everything built in;
// without it kiln-image installs Debian's cloud kernel from --cache with the --modules it needs.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"

	"github.com/kiln-runtime/kiln/vm/image"
)

// defaultModules, with Debian's cloud kernel, are what the agent needs to reach the host: the virtio-mmio
// transport of microvm, vsock to talk ttrpc, and virtiofs plus overlay for
// container root filesystems, virtio_net for the pod's interfaces, and bridge, which containers with
// CAP_NET_ADMIN use (the guest has no modprobe to load it on demand), and virtio_balloon, whose free page
// reporting returns the memory the guest frees to the host. virtio_pci is for guests restored from a template,
// which run on a PCI machine (q35) and get their devices by hot-plug; it comes after the vsock transport, so a
// microvm guest loads it only in the setup that follows the agent's first answer.
const defaultModules = "virtio_mmio,vmw_vsock_virtio_transport,virtiofs,overlay,virtio_net,bridge,virtio_balloon,virtio_pci"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "kiln-image:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kiln-image", flag.ContinueOnError)
	var o image.Options
	var modules, compression string
	var quiet bool
	fs.StringVar(&o.InitPath, "init", "", "executable to install as /init (required)")
	fs.StringVar(&modules, "modules", defaultModules, "comma-separated kernel modules to include with their dependencies ('' for none; none with --kernel)")
	fs.StringVar(&o.OutDir, "out", "_output/share/kiln", "directory for vmlinuz, kernel-release and (by default) initrd.img")
	fs.StringVar(&o.InitrdPath, "initrd", "", "initramfs path (default <out>/initrd.img)")
	fs.StringVar(&o.CacheDir, "cache", "_output/cache", "directory caching the kernel package")
	fs.StringVar(&o.KernelPackage, "kernel-package", image.DefaultKernelPackage, "Debian metapackage naming the kernel (without --kernel)")
	fs.StringVar(&o.KernelImage, "kernel", "", "a built kernel image with everything built in, instead of Debian's package")
	fs.StringVar(&o.KernelRelease, "kernel-release", "", "release of --kernel (its `make kernelrelease`)")
	fs.StringVar(&compression, "compress", string(image.DefaultCompression), "initramfs compression: none or gzip")
	fs.StringVar(&o.AgentVersion, "agent-version", "", "version of the agent given as --init, recorded in <out>/agent-version")
	fs.BoolVar(&quiet, "q", false, "print nothing on success")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	c, err := image.ParseCompression(compression)
	if err != nil {
		return err
	}
	o.Compression = c
	explicit := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { explicit[f.Name] = true })
	if o.KernelImage != "" && !explicit["modules"] {
		modules = ""
	}
	for _, m := range strings.Split(modules, ",") {
		if m = strings.TrimSpace(m); m != "" {
			o.Modules = append(o.Modules, m)
		}
	}
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		if o.MTime, err = strconv.ParseInt(s, 10, 64); err != nil {
			return fmt.Errorf("parse SOURCE_DATE_EPOCH %q: %w", s, err)
		}
	}
	if !quiet {
		o.Log = os.Stderr
	}
	res, err := image.Build(ctx, o)
	if err != nil {
		return err
	}
	if !quiet {
		names := []string{"none"}
		if len(res.Modules) > 0 {
			names = names[:0]
		}
		for _, m := range res.Modules {
			names = append(names, m.Name)
		}
		from := res.Kernel.Image
		if from == "" {
			from = res.Kernel.Package + " " + res.Kernel.Version
		}
		fmt.Fprintf(os.Stderr, "kiln-image: kernel %s (%s); initrd %s %d bytes (%s); modules: %s; rewrote %d file(s)\n",
			res.Kernel.Release, from, res.Initrd, res.InitrdSize, o.Compression,
			strings.Join(names, " "), len(res.Written))
	}
	return nil
}
