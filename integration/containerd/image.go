package containerd

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"syscall"

	"github.com/kiln-runtime/kiln/integration/testbundle"
)

// BusyboxRef is the name the busybox test image is imported under.
const BusyboxRef = "docker.io/library/busybox:latest"

// OCI media types the image uses.
const (
	mediaIndex    = "application/vnd.oci.image.index.v1+json"
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar"
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// BuildBusyboxImage writes an OCI image archive (for `ctr images import`) holding one layer: the busybox root
// file system of integration/testbundle. ref is the image name recorded in the index.
func BuildBusyboxImage(archivePath, ref string) error {
	layer, err := BusyboxLayer()
	if err != nil {
		return fmt.Errorf("build busybox image: %w", err)
	}
	im, err := BuildImage(ImageConfig{Cmd: []string{"sh"}}, layer)
	if err != nil {
		return fmt.Errorf("build busybox image: %w", err)
	}
	return im.WriteArchive(archivePath, ref)
}

// BusyboxLayer is an uncompressed layer holding the busybox root file system of integration/testbundle.
func BusyboxLayer() ([]byte, error) {
	root, err := os.MkdirTemp("", "kiln-busybox-rootfs-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(root)
	if err := testbundle.Rootfs(root); err != nil {
		return nil, err
	}
	var layer bytes.Buffer
	if err := tarDir(&layer, root); err != nil {
		return nil, fmt.Errorf("tar busybox root file system: %w", err)
	}
	return layer.Bytes(), nil
}

// LayerFile is one regular file (parent directories are made as needed) of a layer FilesLayer builds.
type LayerFile struct {
	Path string
	Mode int64
	Data []byte
}

// FilesLayer is an uncompressed layer holding the files, owned by root, in the order given.
func FilesLayer(files ...LayerFile) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	for _, f := range files {
		var parents []string
		for d := filepath.Dir(f.Path); d != "." && d != "/" && !dirs[d]; d = filepath.Dir(d) {
			parents = append([]string{d}, parents...)
			dirs[d] = true
		}
		for _, d := range parents {
			if err := tw.WriteHeader(&tar.Header{Name: d + "/", Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
				return nil, err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Name: f.Path, Mode: f.Mode, Size: int64(len(f.Data)), Typeflag: tar.TypeReg}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.Data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// ImageConfig is the part of an OCI image configuration the harness's images set.
type ImageConfig struct {
	Entrypoint []string
	Cmd        []string
	// Env is added after PATH.
	Env        []string
	User       string
	WorkingDir string
	// ExposedPorts are "port/protocol" keys, e.g. "80/tcp".
	ExposedPorts []string
}

// Image is a single-platform OCI image held in memory: its layers (uncompressed tar), its configuration and the
// manifest naming them.
type Image struct {
	Layers   [][]byte
	Config   []byte
	Manifest []byte
}

// BlobDigest is the OCI digest (sha256:<hex>) of b.
func BlobDigest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// ManifestDigest is the image's digest: the digest of its manifest.
func (im *Image) ManifestDigest() string { return BlobDigest(im.Manifest) }

// ManifestMediaType is the media type of Image.Manifest.
const ManifestMediaType = mediaManifest

// BuildImage makes an image of the layers (bottom first) with the configuration.
func BuildImage(c ImageConfig, layers ...[]byte) (*Image, error) {
	diffIDs := make([]string, len(layers))
	layerDescs := make([]descriptor, len(layers))
	for i, l := range layers {
		diffIDs[i] = BlobDigest(l)
		layerDescs[i] = descriptor{MediaType: mediaLayer, Digest: diffIDs[i], Size: int64(len(l))}
	}
	cfg := map[string]any{
		"Env": append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, c.Env...),
	}
	if len(c.Entrypoint) > 0 {
		cfg["Entrypoint"] = c.Entrypoint
	}
	if len(c.Cmd) > 0 {
		cfg["Cmd"] = c.Cmd
	}
	if c.User != "" {
		cfg["User"] = c.User
	}
	if c.WorkingDir != "" {
		cfg["WorkingDir"] = c.WorkingDir
	}
	if len(c.ExposedPorts) > 0 {
		ports := map[string]struct{}{}
		for _, p := range c.ExposedPorts {
			ports[p] = struct{}{}
		}
		cfg["ExposedPorts"] = ports
	}
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       cfg,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": diffIDs},
	})
	if err != nil {
		return nil, err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaManifest,
		"config":        descriptor{MediaType: mediaConfig, Digest: BlobDigest(config), Size: int64(len(config))},
		"layers":        layerDescs,
	})
	if err != nil {
		return nil, err
	}
	return &Image{Layers: layers, Config: config, Manifest: manifest}, nil
}

// WriteArchive writes the image as an OCI image archive (for `ctr images import`) whose index names it refs
// (each a full reference such as docker.io/library/busybox:latest).
func (im *Image) WriteArchive(archivePath string, refs ...string) error {
	var manifests []descriptor
	for _, ref := range refs {
		manifests = append(manifests, descriptor{
			MediaType: mediaManifest, Digest: im.ManifestDigest(), Size: int64(len(im.Manifest)),
			Annotations: map[string]string{"io.containerd.image.name": ref},
			Platform:    &platform{Architecture: runtime.GOARCH, OS: "linux"},
		})
	}
	index, err := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": mediaIndex, "manifests": manifests})
	if err != nil {
		return err
	}
	type file struct {
		name string
		data []byte
	}
	files := []file{{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)}, {"index.json", index}}
	seen := map[string]bool{}
	for _, b := range append([][]byte{im.Manifest, im.Config}, im.Layers...) {
		d := BlobDigest(b)
		if !seen[d] {
			seen[d] = true
			files = append(files, file{"blobs/sha256/" + d[len("sha256:"):], b})
		}
	}
	f, err := os.Create(archivePath)
	if err != nil {
		return fmt.Errorf("create image archive: %w", err)
	}
	tw := tar.NewWriter(f)
	for _, fl := range files {
		if err := tw.WriteHeader(&tar.Header{Name: fl.name, Mode: 0o644, Size: int64(len(fl.data)), Typeflag: tar.TypeReg}); err != nil {
			f.Close()
			return fmt.Errorf("write image archive: %w", err)
		}
		if _, err := tw.Write(fl.data); err != nil {
			f.Close()
			return fmt.Errorf("write image archive: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		f.Close()
		return fmt.Errorf("write image archive: %w", err)
	}
	return f.Close()
}

// tarDir writes dir's tree as a tar stream with owners, modes and symlinks kept.
func tarDir(w io.Writer, dir string) error {
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		var link string
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(path); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		hdr.Name = rel
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			hdr.Uid, hdr.Gid = int(st.Uid), int(st.Gid)
		}
		hdr.Uname, hdr.Gname = "", ""
		if info.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// ImportBusybox builds the busybox image and imports it into d under BusyboxRef.
func (d *Daemon) ImportBusybox(ctx context.Context) error {
	archive := filepath.Join(d.Dir, "busybox.oci.tar")
	if err := BuildBusyboxImage(archive, BusyboxRef); err != nil {
		return err
	}
	if _, err := d.Ctr(ctx, "images", "import", archive); err != nil {
		return err
	}
	return os.Remove(archive)
}

// ImportImage imports im into the containerd namespace under refs (CRINamespace for images CRI uses).
func (d *Daemon) ImportImage(ctx context.Context, namespace string, im *Image, refs ...string) error {
	f, err := os.CreateTemp(d.Dir, "image-*.oci.tar")
	if err != nil {
		return fmt.Errorf("import image %v: %w", refs, err)
	}
	archive := f.Name()
	f.Close()
	defer os.Remove(archive)
	if err := im.WriteArchive(archive, refs...); err != nil {
		return fmt.Errorf("import image %v: %w", refs, err)
	}
	if _, err := d.CtrIn(ctx, namespace, "images", "import", archive); err != nil {
		return err
	}
	return nil
}
