package image

import (
	"context"
	"fmt"
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
	// AgentImageName is the agent image (BuildAgentImage), which Kiln uses when it is beside the initramfs.
	AgentImageName = "agent.img"
)

// Options drive one image build.
type Options struct {
	// KernelImage is the guest kernel to install: Kiln's own (vm/image/kernel/build.sh, run by `make image`),
	// everything built in. KernelRelease is its release (its `make kernelrelease`), written to kernel-release.
	KernelImage   string
	KernelRelease string
	// OutDir receives vmlinuz and kernel-release (the kernel's release, one line).
	OutDir string
	// InitrdPath is the initramfs to write; default OutDir/initrd.img. A
	// different path lets a benchmark build a second initramfs (another
	// /init) for the same kernel.
	InitrdPath string
	// InitPath is the executable to install as /init.
	InitPath string
	// Compression of the initramfs; default DefaultCompression.
	Compression Compression
	// AgentVersion, when set, is written to OutDir/agent-version.
	AgentVersion string
	// AgentImagePath, when set, receives the agent image (BuildAgentImage) of InitPath, which must then be the
	// agent; by convention OutDir/AgentImageName, beside the initramfs, where Kiln looks for it.
	AgentImagePath string
	// MTime is every archive entry's mtime (0 or SOURCE_DATE_EPOCH).
	MTime int64
}

// Result says what a build produced and which files it actually rewrote.
type Result struct {
	Vmlinuz     string
	Initrd      string
	InitrdSize  int
	ReleaseFile string
	AgentImage  string   // "" when none was asked for
	Written     []string // outputs whose content changed
}

// Build installs the kernel, assembles the initramfs (and the agent image) and writes the outputs,
// leaving every output whose content is unchanged untouched.
func Build(ctx context.Context, o Options) (*Result, error) {
	if o.KernelImage == "" {
		return nil, fmt.Errorf("build image: no kernel image given")
	}
	if o.KernelRelease == "" {
		return nil, fmt.Errorf("build image: kernel %s: no release given", o.KernelImage)
	}
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
	res := &Result{
		Vmlinuz:     filepath.Join(o.OutDir, VmlinuzName),
		Initrd:      o.InitrdPath,
		ReleaseFile: filepath.Join(o.OutDir, KernelReleaseName),
	}
	archive, err := BuildInitramfs(InitramfsSpec{Init: initBin, MTime: o.MTime})
	if err != nil {
		return nil, err
	}
	initrd, err := Compress(archive, o.Compression)
	if err != nil {
		return nil, err
	}
	res.InitrdSize = len(initrd)
	vmlinuz, err := os.ReadFile(o.KernelImage)
	if err != nil {
		return nil, fmt.Errorf("build image: read kernel image of %s: %w", o.KernelRelease, err)
	}
	outputs := []struct {
		path string
		data []byte
	}{
		{res.Vmlinuz, vmlinuz},
		{res.ReleaseFile, []byte(o.KernelRelease + "\n")},
		{res.Initrd, initrd},
	}
	if o.AgentVersion != "" {
		outputs = append(outputs, struct {
			path string
			data []byte
		}{filepath.Join(o.OutDir, AgentVersionName), []byte(o.AgentVersion + "\n")})
	}
	if o.AgentImagePath != "" {
		img, err := BuildAgentImage(ctx, initBin, o.MTime)
		if err != nil {
			return nil, err
		}
		res.AgentImage = o.AgentImagePath
		outputs = append(outputs, struct {
			path string
			data []byte
		}{o.AgentImagePath, img})
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
