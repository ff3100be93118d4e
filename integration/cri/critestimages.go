package cri

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// Registries whose images critest (cri-tools v1.37.0, pkg/validate and pkg/framework) asks for; the harness's
// registry stands in for all of them.
var CritestMirroredHosts = []string{"registry.k8s.io", "gcr.io", "k8s.gcr.io"}

// TestImage is an image and the references it is served under.
type TestImage struct {
	Refs  []string
	Image *containerd.Image
}

const critestRegistry = "gcr.io/k8s-staging-cri-tools/"

// passwd and group of the user test images: testbundle's users plus those of cri-tools' image-user and
// image-predefined-group images (busybox's www-data, and default-user in group-defined-in-image).
const (
	critestPasswd = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\n" +
		"default-user:x:1000:1000:Linux User:/home/default-user:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
	critestGroup = "root:x:0:\nwww-data:x:33:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\nnogroup:x:65534:\n"
)

// CritestImages builds equivalents of the images critest pulls, from the harness's busybox root file system
// and pause image. What critest checks of them: the busybox applets (sh, sleep, echo, cat, ls, top, httpd...),
// a web server answering 200 on port 80 (busybox httpd stands in for nginx), distinct images with distinct
// content where the tags say so and one image under several tags where they say that, and the image user
// (uid, name, uid:gid, name:gid, and a user whose supplementary group the image's /etc/group defines). The
// image pulled by a fixed upstream digest (test-image-digest@sha256:9700f9...) cannot be rebuilt: it is
// pushed by tag only, and its test is in the skip list.
func CritestImages(ctx context.Context, repoRoot string, pause *containerd.Image) ([]TestImage, error) {
	busybox, err := critestBusyboxLayer()
	if err != nil {
		return nil, err
	}
	nnp, err := staticProgramLayer(ctx, repoRoot, "./integration/cri/nnp", "nnp", 0o4755)
	if err != nil {
		return nil, err
	}
	var images []TestImage
	add := func(cfg containerd.ImageConfig, files []containerd.LayerFile, refs ...string) error {
		layers := [][]byte{busybox}
		if len(files) > 0 {
			l, err := containerd.FilesLayer(files...)
			if err != nil {
				return err
			}
			layers = append(layers, l)
		}
		im, err := containerd.BuildImage(cfg, layers...)
		if err != nil {
			return err
		}
		images = append(images, TestImage{Refs: refs, Image: im})
		return nil
	}
	sh := containerd.ImageConfig{Cmd: []string{"sh"}}
	marker := func(name string) []containerd.LayerFile {
		return []containerd.LayerFile{{Path: name, Mode: 0o644}}
	}
	users := []containerd.LayerFile{
		{Path: "etc/passwd", Mode: 0o644, Data: []byte(critestPasswd)},
		{Path: "etc/group", Mode: 0o644, Data: []byte(critestGroup)},
	}
	steps := []func() error{
		func() error { return add(sh, nil, "registry.k8s.io/e2e-test-images/busybox:1.29-2") },
		func() error {
			// PID 1 is a shell named like nginx's master process (critest's ContainerPID check looks for it in
			// /proc/1/cmdline), running httpd and ending it on SIGTERM.
			return add(containerd.ImageConfig{
				Entrypoint: []string{"sh", "-c",
					"trap 'kill $pid; exit 0' TERM INT; httpd -f -p 80 -h /usr/share/nginx/html & pid=$!; wait",
					"nginx: master process"},
				ExposedPorts: []string{"80/tcp"},
			}, []containerd.LayerFile{{Path: "usr/share/nginx/html/index.html", Mode: 0o644, Data: []byte("<h1>busybox httpd standing in for nginx</h1>\n")}},
				"registry.k8s.io/e2e-test-images/nginx:1.14-2")
		},
		func() error {
			// Apache's image logs its name on start; critest's multi-container log check looks for "httpd".
			return add(containerd.ImageConfig{
				Entrypoint: []string{"sh", "-c",
					"echo 'httpd (busybox) serving /usr/local/apache2/htdocs on port 80' >&2; " +
						"trap 'kill $pid; exit 0' TERM INT; httpd -f -p 80 -h /usr/local/apache2/htdocs & pid=$!; wait"},
				ExposedPorts: []string{"80/tcp"},
			}, []containerd.LayerFile{{Path: "usr/local/apache2/htdocs/index.html", Mode: 0o644, Data: []byte("<html><body><h1>It works!</h1></body></html>\n")}},
				"registry.k8s.io/e2e-test-images/httpd:2.4.39-4")
		},
		func() error {
			return add(sh, marker("same-image"), critestRegistry+"test-image-tags:1", critestRegistry+"test-image-tags:2", critestRegistry+"test-image-tags:3")
		},
		func() error { return add(sh, marker("test"), critestRegistry+"test-image-tag:test") },
		func() error { return add(sh, marker("all"), critestRegistry+"test-image-tag:all") },
	}
	for _, name := range []string{"test-image-1", "test-image-2", "test-image-3", "test-image-latest", "test-image-digest"} {
		steps = append(steps, func() error { return add(sh, marker(name), critestRegistry+name+":latest") })
	}
	for name, user := range map[string]string{
		"test-image-user-uid":            "1002",
		"test-image-user-username":       "www-data",
		"test-image-user-uid-group":      "1003:1004",
		"test-image-user-username-group": "www-data:1004",
		"test-image-predefined-group":    "1000",
	} {
		steps = append(steps, func() error {
			return add(containerd.ImageConfig{Cmd: []string{"sh"}, User: user}, users, critestRegistry+name+":latest")
		})
	}
	// nonewprivs: a setuid-root program that prints its effective uid, run as the user critest chooses.
	nnpImage, err := containerd.BuildImage(containerd.ImageConfig{Entrypoint: []string{"/nnp"}}, busybox, nnp)
	if err != nil {
		return nil, err
	}
	images = append(images, TestImage{Refs: []string{"registry.k8s.io/e2e-test-images/nonewprivs:1.3"}, Image: nnpImage})
	for _, step := range steps {
		if err := step(); err != nil {
			return nil, fmt.Errorf("build critest images: %w", err)
		}
	}
	// pause:3.9 must not be the sandbox image itself: critest removes it, and with it every tag of the same
	// image. A marker layer makes it another image.
	marked, err := containerd.FilesLayer(containerd.LayerFile{Path: "pause-3.9", Mode: 0o644})
	if err != nil {
		return nil, err
	}
	p39, err := containerd.BuildImage(containerd.ImageConfig{Entrypoint: []string{"/pause"}}, append(append([][]byte{}, pause.Layers...), marked)...)
	if err != nil {
		return nil, err
	}
	images = append(images, TestImage{Refs: []string{"registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"}, Image: p39})
	return images, nil
}

// critestBusyboxLayer is the busybox root file system as upstream busybox images lay it out: applets are hard
// links to /bin/busybox, not symbolic links (critest masks /bin/ls and expects sh to keep working), plus
// shell stand-ins for two applets Debian's busybox-static lacks and critest runs: pgrep (names of processes
// matching a pattern; critest uses `pgrep sleep`) and ipcs (the System V shared memory segments of the
// caller's IPC namespace, from /proc/sysvipc/shm).
func critestBusyboxLayer() ([]byte, error) {
	layer, err := containerd.BusyboxLayer()
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	tr := tar.NewReader(bytes.NewReader(layer))
	tw := tar.NewWriter(&out)
	// A hard link must follow its target in the stream: the links go after everything else.
	var links []*tar.Header
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		if hdr.Typeflag == tar.TypeSymlink && hdr.Linkname == "busybox" && strings.HasPrefix(hdr.Name, "bin/") {
			hdr.Typeflag, hdr.Linkname, hdr.Mode = tar.TypeLink, "bin/busybox", 0o755
			links = append(links, hdr)
			continue
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return nil, err
		}
	}
	for _, hdr := range links {
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
	}
	scripts := map[string]string{
		"bin/pgrep": "#!/bin/sh\n# pgrep PATTERN: pids of processes whose name matches (stand-in for busybox's applet)\n" +
			"found=1\nfor d in /proc/[0-9]*; do\n  n=$(cat \"$d/comm\" 2>/dev/null) || continue\n" +
			"  case \"$n\" in *\"$1\"*) [ \"${d#/proc/}\" = \"$$\" ] || { echo \"${d#/proc/}\"; found=0; } ;; esac\ndone\nexit $found\n",
		"bin/ipcs": "#!/bin/sh\n# ipcs [-m]: shared memory segments of this IPC namespace (stand-in for util-linux's ipcs)\n" +
			"cat /proc/sysvipc/shm\n",
	}
	for _, name := range []string{"bin/ipcs", "bin/pgrep"} {
		b := []byte(scripts[name])
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o755, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// PushAll pushes every image under each of its references.
func (r *Registry) PushAll(ctx context.Context, images []TestImage) error {
	for _, im := range images {
		for _, ref := range im.Refs {
			if err := r.PushRef(ctx, ref, im.Image); err != nil {
				return err
			}
		}
	}
	return nil
}
