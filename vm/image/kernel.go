package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// DefaultKernelPackage is the Debian metapackage whose dependency names the
// current cloud kernel. Resolving through it (never a pinned ABI such as
// 6.1.0-56) keeps builds working after the mirror drops an old kernel.
const DefaultKernelPackage = "linux-image-cloud-amd64"

// Kernel is a Debian kernel image package unpacked in the cache, or a kernel built outside (Image).
type Kernel struct {
	Package string // e.g. linux-image-6.1.0-56-cloud-amd64; empty for a built kernel
	Version string // Debian version, e.g. 6.1.192-2; empty for a built kernel
	Release string // kernel release (uname -r), e.g. 6.1.0-56-cloud-amd64 or 6.1.192-kiln
	Root    string // where the package was extracted
	Image   string // a built kernel's image file (bzImage)
}

// VmlinuzPath is the kernel image: the built one, or the one inside the extracted package.
func (k *Kernel) VmlinuzPath() string {
	if k.Image != "" {
		return k.Image
	}
	return filepath.Join(k.Root, "boot", "vmlinuz-"+k.Release)
}

// ModulesDir is the module tree of the release inside the extracted package.
// Debian moved it from /lib to /usr/lib with the merged-/usr layout, so both
// are tried.
func (k *Kernel) ModulesDir() string {
	for _, d := range []string{"lib", "usr/lib"} {
		p := filepath.Join(k.Root, d, "modules", k.Release)
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			return p
		}
	}
	return filepath.Join(k.Root, "lib", "modules", k.Release)
}

// FetchOptions says where to cache the kernel and which metapackage to follow.
type FetchOptions struct {
	CacheDir    string    // holds the .deb and its extracted tree
	MetaPackage string    // default DefaultKernelPackage
	Log         io.Writer // progress lines; nil for none
}

// FetchKernel resolves the kernel package the metapackage depends on today,
// downloads it with apt-get download into the cache unless the same version
// (checked by SHA256) is already there, and extracts it with dpkg-deb -x
// unless that was done before. apt-get update runs only when apt knows no
// candidate for a package, or when a download fails because the package
// lists name a version the mirror no longer has.
func FetchKernel(ctx context.Context, opts FetchOptions) (*Kernel, error) {
	if opts.MetaPackage == "" {
		opts.MetaPackage = DefaultKernelPackage
	}
	if opts.Log == nil {
		opts.Log = io.Discard
	}
	if err := os.MkdirAll(opts.CacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("create kernel cache %s: %w", opts.CacheDir, err)
	}
	updated := false
	for {
		pkg, err := resolveKernelPackage(ctx, opts, &updated)
		if err != nil {
			return nil, err
		}
		deb, err := ensureDeb(ctx, opts, pkg)
		if err != nil {
			var dl *downloadError
			if errors.As(err, &dl) && !updated {
				fmt.Fprintf(opts.Log, "kiln-image: download failed (%v); running apt-get update and retrying\n", dl.err)
				if err := aptUpdate(ctx); err != nil {
					return nil, err
				}
				updated = true
				continue
			}
			return nil, err
		}
		return extractKernel(ctx, opts, pkg, deb)
	}
}

// pkgInfo is the part of a package's apt record that the fetch needs.
type pkgInfo struct {
	Package, Version, Arch, SHA256 string
}

func (p pkgInfo) debName() string {
	// apt-get download escapes the epoch colon the same way.
	return fmt.Sprintf("%s_%s_%s.deb", p.Package, strings.ReplaceAll(p.Version, ":", "%3a"), p.Arch)
}

func resolveKernelPackage(ctx context.Context, opts FetchOptions, updated *bool) (pkgInfo, error) {
	meta, err := candidate(ctx, opts.MetaPackage, updated)
	if err != nil {
		return pkgInfo{}, err
	}
	name, err := kernelDependency(meta["Depends"])
	if err != nil {
		return pkgInfo{}, fmt.Errorf("resolve kernel of %s %s: %w", opts.MetaPackage, meta["Version"], err)
	}
	rec, err := candidate(ctx, name, updated)
	if err != nil {
		return pkgInfo{}, err
	}
	p := pkgInfo{Package: name, Version: rec["Version"], Arch: rec["Architecture"], SHA256: rec["SHA256"]}
	if p.Version == "" || p.Arch == "" {
		return pkgInfo{}, fmt.Errorf("resolve kernel package %s: apt record has no Version or Architecture", name)
	}
	fmt.Fprintf(opts.Log, "kiln-image: %s -> %s %s\n", opts.MetaPackage, p.Package, p.Version)
	return p, nil
}

// kernelDependency picks the linux-image-* package out of a Depends field
// such as "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)".
func kernelDependency(depends string) (string, error) {
	for _, alt := range strings.Split(depends, ",") {
		for _, d := range strings.Split(alt, "|") {
			name, _, _ := strings.Cut(strings.TrimSpace(d), " ")
			name, _, _ = strings.Cut(name, ":")
			if strings.HasPrefix(name, "linux-image-") {
				return name, nil
			}
		}
	}
	return "", fmt.Errorf("no linux-image-* package in Depends %q", depends)
}

// candidate returns apt's record for the candidate version of pkg, running
// apt-get update once when apt has none (fresh machine, empty lists).
func candidate(ctx context.Context, pkg string, updated *bool) (map[string]string, error) {
	rec, err := aptShow(ctx, pkg)
	if err == nil {
		return rec, nil
	}
	if *updated {
		return nil, err
	}
	if uerr := aptUpdate(ctx); uerr != nil {
		return nil, fmt.Errorf("%v; tried apt-get update: %w", err, uerr)
	}
	*updated = true
	return aptShow(ctx, pkg)
}

func aptShow(ctx context.Context, pkg string) (map[string]string, error) {
	out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", pkg)
	if err != nil {
		return nil, fmt.Errorf("look up %s with apt-cache (is it in the sources, and has apt-get update run?): %w", pkg, err)
	}
	rec := parseControl(out)
	if rec["Package"] == "" {
		return nil, fmt.Errorf("look up %s with apt-cache: no candidate version", pkg)
	}
	return rec, nil
}

// parseControl reads the first paragraph of a Debian control-format record.
// Continuation lines are dropped; no field used here spans lines.
func parseControl(b []byte) map[string]string {
	rec := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			if len(rec) > 0 {
				break
			}
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			continue
		}
		if k, v, ok := strings.Cut(line, ":"); ok {
			rec[k] = strings.TrimSpace(v)
		}
	}
	return rec
}

func aptUpdate(ctx context.Context) error {
	if _, err := run(ctx, "", "apt-get", "update"); err != nil {
		return fmt.Errorf("apt-get update (needs root and a reachable Debian mirror): %w", err)
	}
	return nil
}

// downloadError marks a failed apt-get download, the case that a stale
// package list causes and apt-get update can fix.
type downloadError struct{ err error }

func (e *downloadError) Error() string { return e.err.Error() }
func (e *downloadError) Unwrap() error { return e.err }

// ensureDeb returns the cached .deb of p, downloading it when missing or when
// its checksum does not match apt's record.
func ensureDeb(ctx context.Context, opts FetchOptions, p pkgInfo) (string, error) {
	path := filepath.Join(opts.CacheDir, p.debName())
	if ok, err := checksumOK(path, p.SHA256); err == nil && ok {
		fmt.Fprintf(opts.Log, "kiln-image: using cached %s\n", path)
		return path, nil
	}
	tmp, err := os.MkdirTemp(opts.CacheDir, ".download-")
	if err != nil {
		return "", fmt.Errorf("download %s: %w", p.Package, err)
	}
	defer os.RemoveAll(tmp)
	fmt.Fprintf(opts.Log, "kiln-image: downloading %s %s\n", p.Package, p.Version)
	// The cache is usually root-owned, which apt's _apt sandbox user cannot
	// write; downloading as root there is what apt would fall back to anyway.
	if _, err := run(ctx, tmp, "apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", p.Package+"="+p.Version); err != nil {
		return "", &downloadError{fmt.Errorf("download %s=%s with apt-get download: %w", p.Package, p.Version, err)}
	}
	got := filepath.Join(tmp, p.debName())
	if ok, err := checksumOK(got, p.SHA256); err != nil || !ok {
		return "", fmt.Errorf("download %s=%s: file %s missing or SHA256 not %s (%v)", p.Package, p.Version, got, p.SHA256, err)
	}
	if err := os.Rename(got, path); err != nil {
		return "", fmt.Errorf("download %s: move into cache: %w", p.Package, err)
	}
	return path, nil
}

// checksumOK reports whether path exists with the given SHA256; with no
// checksum in the apt record, existence is enough.
func checksumOK(path, want string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	if want == "" {
		return true, nil
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return false, err
	}
	return hex.EncodeToString(h.Sum(nil)) == strings.ToLower(want), nil
}

// extractKernel unpacks the .deb next to it once; the directory appears only
// after a complete extraction (temp dir + rename), so an interrupted build
// never leaves a half tree that a later build would trust.
func extractKernel(ctx context.Context, opts FetchOptions, p pkgInfo, deb string) (*Kernel, error) {
	root := strings.TrimSuffix(deb, ".deb")
	if _, err := os.Stat(root); err != nil {
		tmp, err := os.MkdirTemp(opts.CacheDir, ".extract-")
		if err != nil {
			return nil, fmt.Errorf("extract %s: %w", deb, err)
		}
		defer os.RemoveAll(tmp)
		fmt.Fprintf(opts.Log, "kiln-image: extracting %s\n", filepath.Base(deb))
		if _, err := run(ctx, "", "dpkg-deb", "-x", deb, tmp); err != nil {
			return nil, fmt.Errorf("extract %s with dpkg-deb -x (delete it to download again): %w", deb, err)
		}
		if err := os.Rename(tmp, root); err != nil {
			return nil, fmt.Errorf("extract %s: move into cache: %w", deb, err)
		}
	}
	release, err := findRelease(root)
	if err != nil {
		return nil, fmt.Errorf("kernel package %s %s: %w", p.Package, p.Version, err)
	}
	return &Kernel{Package: p.Package, Version: p.Version, Release: release, Root: root}, nil
}

// findRelease reads the kernel release from the one boot/vmlinuz-<release>.
func findRelease(root string) (string, error) {
	m, err := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if err != nil {
		return "", err
	}
	if len(m) != 1 {
		return "", fmt.Errorf("want exactly one boot/vmlinuz-* in %s, found %d", root, len(m))
	}
	return strings.TrimPrefix(filepath.Base(m[0]), "vmlinuz-"), nil
}

// run executes a command and returns its stdout; on failure the error holds
// the command line and the tail of its stderr, which is what names the cause.
func run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(errb.String())
		if len(msg) > 500 {
			msg = "..." + msg[len(msg)-500:]
		}
		return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return out.Bytes(), nil
}
