// Command kiln-image installs Kiln's guest kernel and builds its initramfs (see package vm/image):
//
//	kiln-image --init _output/bin/kiln-agent --kernel ~/.cache/kiln/kernel-<key>/bzImage \
//		--kernel-release 6.1.192-kiln --out _output/share/kiln
//
// writes vmlinuz, kernel-release and initrd.img under --out, rewriting only files whose content changed; with
// --agent-image _output/share/kiln/agent.img, also the agent image (the agent on ext2, for virtio-pmem).
// --kernel is Kiln's own kernel, everything built in, which vm/image/kernel/build.sh builds (`make image` runs
// both).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"

	"github.com/kiln-runtime/kiln/vm/image"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "kiln-image:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("kiln-image", flag.ContinueOnError)
	var o image.Options
	var compression string
	var quiet bool
	fs.StringVar(&o.InitPath, "init", "", "executable to install as /init (required)")
	fs.StringVar(&o.OutDir, "out", "_output/share/kiln", "directory for vmlinuz, kernel-release and (by default) initrd.img")
	fs.StringVar(&o.InitrdPath, "initrd", "", "initramfs path (default <out>/initrd.img)")
	fs.StringVar(&o.KernelImage, "kernel", "", "the guest kernel image, everything built in (vm/image/kernel/build.sh; required)")
	fs.StringVar(&o.KernelRelease, "kernel-release", "", "release of --kernel, its `make kernelrelease` (required)")
	fs.StringVar(&compression, "compress", string(image.DefaultCompression), "initramfs compression: none or gzip")
	fs.StringVar(&o.AgentVersion, "agent-version", "", "version of the agent given as --init, recorded in <out>/agent-version")
	fs.StringVar(&o.AgentImagePath, "agent-image", "", "also write the agent image of --init, which must be the agent, here (by convention <out>/"+image.AgentImageName+")")
	fs.BoolVar(&quiet, "q", false, "print nothing on success")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	// Kiln's guest has no kernel modules, so no kernel but its own boots it; say where that kernel comes from.
	for _, f := range []struct{ name, value string }{{"kernel", o.KernelImage}, {"kernel-release", o.KernelRelease}} {
		if f.value == "" {
			return fmt.Errorf("--%s is required: the guest kernel comes from vm/image/kernel/build.sh, "+
				"whose output directory holds bzImage and release (`make image` runs both)", f.name)
		}
	}
	c, err := image.ParseCompression(compression)
	if err != nil {
		return err
	}
	o.Compression = c
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		if o.MTime, err = strconv.ParseInt(s, 10, 64); err != nil {
			return fmt.Errorf("parse SOURCE_DATE_EPOCH %q: %w", s, err)
		}
	}
	res, err := image.Build(context.Background(), o)
	if err != nil {
		return err
	}
	if !quiet {
		img := ""
		if res.AgentImage != "" {
			img = "; agent image " + res.AgentImage
		}
		fmt.Fprintf(os.Stderr, "kiln-image: kernel %s (%s); initrd %s %d bytes (%s)%s; rewrote %d file(s)\n",
			o.KernelRelease, o.KernelImage, res.Initrd, res.InitrdSize, o.Compression, img, len(res.Written))
	}
	return nil
}
