package image

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Output file names inside Options.OutDir.
const (
	VmlinuzName       = "vmlinuz"
	InitrdName        = "initrd.img"
	KernelReleaseName = "kernel-release"
	// AgentVersionName records the version of the agent baked into the initramfs, so host tools can tell a
	// guest image from another Kiln version without booting it.
	AgentVersionName = "agent-version"
)

// Options drive one image build.
type Options struct {
	// CacheDir keeps the downloaded kernel .deb and its extracted tree.
	CacheDir string
	// KernelPackage is the metapackage to follow; default DefaultKernelPackage. Unused with KernelImage.
	KernelPackage string
	// KernelImage, when set, is a kernel built outside (Kiln's own, vm/image/kernel/build.sh) to install
	// instead of Debian's package, with KernelRelease its release. Such a kernel has everything built in:
	// Modules must be empty.
	KernelImage   string
	KernelRelease string
	// OutDir receives vmlinuz and kernel-release (the release string the
	// modules were built for, one line).
	OutDir string
	// InitrdPath is the initramfs to write; default OutDir/initrd.img. A
	// different path lets a benchmark build a second initramfs (another
	// /init, no modules) for the same kernel.
	InitrdPath string
	// InitPath is the executable to install as /init.
	InitPath string
	// Modules are the module names to include with their dependencies.
	Modules []string
	// Compression of the initramfs; default DefaultCompression.
	Compression Compression
	// AgentVersion, when set, is written to OutDir/agent-version.
	AgentVersion string
	// MTime is every archive entry's mtime (0 or SOURCE_DATE_EPOCH).
	MTime int64
	// Log receives progress lines; nil for none.
	Log io.Writer
}

// Result says what a build produced and which files it actually rewrote.
type Result struct {
	Kernel      *Kernel
	Modules     []Module // load order as written to /etc/kiln/modules
	Vmlinuz     string
	Initrd      string
	InitrdSize  int
	ReleaseFile string
	Written     []string // outputs whose content changed
}

// Build fetches the kernel, assembles the initramfs and writes the outputs,
// leaving every output whose content is unchanged untouched.
func Build(ctx context.Context, o Options) (*Result, error) {
	if o.InitPath == "" {
		return nil, fmt.Errorf("build image: no init executable given")
	}
	if o.OutDir == "" {
		return nil, fmt.Errorf("build image: no output directory given")
	}
	if o.Compression == "" {
		o.Compression = DefaultCompression
	}
	if _, err := ParseCompression(string(o.Compression)); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	if o.InitrdPath == "" {
		o.InitrdPath = filepath.Join(o.OutDir, InitrdName)
	}
	initBin, err := os.ReadFile(o.InitPath)
	if err != nil {
		return nil, fmt.Errorf("build image: read init executable: %w", err)
	}
	k, err := o.kernel(ctx)
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	res := &Result{
		Kernel:      k,
		Vmlinuz:     filepath.Join(o.OutDir, VmlinuzName),
		Initrd:      o.InitrdPath,
		ReleaseFile: filepath.Join(o.OutDir, KernelReleaseName),
	}
	if hasModules(o.Modules) {
		ix, err := OpenModules(k.ModulesDir())
		if err != nil {
			return nil, fmt.Errorf("build image for kernel %s: %w", k.Release, err)
		}
		if res.Modules, err = ix.Resolve(ctx, o.Modules); err != nil {
			return nil, fmt.Errorf("build image for kernel %s: %w", k.Release, err)
		}
	}
	archive, err := BuildInitramfs(ctx, InitramfsSpec{Init: initBin, Modules: res.Modules, MTime: o.MTime})
	if err != nil {
		return nil, err
	}
	initrd, err := Compress(archive, o.Compression)
	if err != nil {
		return nil, err
	}
	res.InitrdSize = len(initrd)
	vmlinuz, err := os.ReadFile(k.VmlinuzPath())
	if err != nil {
		return nil, fmt.Errorf("build image: read kernel image of %s: %w", k.Release, err)
	}
	outputs := []struct {
		path string
		data []byte
	}{
		{res.Vmlinuz, vmlinuz},
		{res.ReleaseFile, []byte(k.Release + "\n")},
		{res.Initrd, initrd},
	}
	if o.AgentVersion != "" {
		outputs = append(outputs, struct {
			path string
			data []byte
		}{filepath.Join(o.OutDir, AgentVersionName), []byte(o.AgentVersion + "\n")})
	}
	for _, out := range outputs {
		changed, err := WriteFileIfChanged(out.path, out.data, 0o644)
		if err != nil {
			return nil, fmt.Errorf("build image: %w", err)
		}
		if changed {
			res.Written = append(res.Written, out.path)
		}
	}
	return res, nil
}

// kernel is the kernel to install: the built one of KernelImage, else Debian's package.
func (o Options) kernel(ctx context.Context) (*Kernel, error) {
	if o.KernelImage == "" {
		return FetchKernel(ctx, FetchOptions{CacheDir: o.CacheDir, MetaPackage: o.KernelPackage, Log: o.Log})
	}
	if o.KernelRelease == "" {
		return nil, fmt.Errorf("kernel %s: no release given", o.KernelImage)
	}
	if hasModules(o.Modules) {
		return nil, fmt.Errorf("kernel %s has no modules, modules %q asked for", o.KernelImage, o.Modules)
	}
	return &Kernel{Release: o.KernelRelease, Image: o.KernelImage}, nil
}

func hasModules(names []string) bool {
	for _, n := range names {
		if n != "" {
			return true
		}
	}
	return false
}
