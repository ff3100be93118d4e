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
	root, err := os.MkdirTemp("", "kiln-busybox-rootfs-")
	if err != nil {
		return fmt.Errorf("build busybox image: %w", err)
	}
	defer os.RemoveAll(root)
	if err := testbundle.Rootfs(root); err != nil {
		return fmt.Errorf("build busybox image: %w", err)
	}
	var layer bytes.Buffer
	if err := tarDir(&layer, root); err != nil {
		return fmt.Errorf("build busybox image layer: %w", err)
	}
	blobs := map[string][]byte{}
	add := func(b []byte) (string, int64) {
		sum := sha256.Sum256(b)
		d := "sha256:" + hex.EncodeToString(sum[:])
		blobs[d] = b
		return d, int64(len(b))
	}
	layerDigest, layerSize := add(layer.Bytes())
	cfg, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config": map[string]any{
			"Env": []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			"Cmd": []string{"sh"},
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layerDigest}},
	})
	if err != nil {
		return err
	}
	cfgDigest, cfgSize := add(cfg)
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaManifest,
		"config":        descriptor{MediaType: mediaConfig, Digest: cfgDigest, Size: cfgSize},
		"layers":        []descriptor{{MediaType: mediaLayer, Digest: layerDigest, Size: layerSize}},
	})
	if err != nil {
		return err
	}
	mDigest, mSize := add(manifest)
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaIndex,
		"manifests": []descriptor{{
			MediaType: mediaManifest, Digest: mDigest, Size: mSize,
			Annotations: map[string]string{"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": "latest"},
			Platform:    &platform{Architecture: runtime.GOARCH, OS: "linux"},
		}},
	})
	if err != nil {
		return err
	}
	f, err := os.Create(archivePath)
	if err != nil {
		return fmt.Errorf("create image archive: %w", err)
	}
	tw := tar.NewWriter(f)
	files := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
	}
	for d, b := range blobs {
		files = append(files, struct {
			name string
			data []byte
		}{"blobs/sha256/" + d[len("sha256:"):], b})
	}
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
