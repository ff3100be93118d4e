package cri

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// RegistryAddr is where the harness's registry listens (nothing else is reachable from these machines).
const RegistryAddr = "127.0.0.1:5000"

// Registry is Debian's docker-registry (the CNCF distribution registry) serving from a temporary directory
// on a loopback address, without authentication.
type Registry struct {
	Addr    string
	Dir     string
	LogPath string
	cmd     *exec.Cmd
	exited  chan struct{}
}

// StartRegistry starts docker-registry on addr with its storage under a fresh temporary directory, and waits
// until it answers.
func StartRegistry(ctx context.Context, addr string) (_ *Registry, retErr error) {
	dir, err := os.MkdirTemp("", "kcri-registry-")
	if err != nil {
		return nil, fmt.Errorf("create registry dir: %w", err)
	}
	r := &Registry{Addr: addr, Dir: dir, LogPath: filepath.Join(dir, "registry.log")}
	defer func() {
		if retErr != nil {
			_ = r.Stop()
		}
	}()
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	logf, err := os.Create(r.LogPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	r.cmd = exec.Command("docker-registry", "serve", cfgPath)
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start docker-registry (make deps installs it): %w", err)
	}
	r.exited = make(chan struct{})
	go func() {
		_ = r.cmd.Wait()
		close(r.exited)
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return r, nil
			}
		}
		select {
		case <-r.exited:
			b, _ := os.ReadFile(r.LogPath)
			return nil, fmt.Errorf("docker-registry exited while starting (is %s in use?):\n%s", addr, b)
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("docker-registry did not answer on %s: %v", addr, err)
		}
	}
}

// Stop ends the registry and removes its storage.
func (r *Registry) Stop() error {
	if r.cmd != nil && r.cmd.Process != nil {
		_ = r.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-r.exited:
		case <-time.After(10 * time.Second):
			_ = r.cmd.Process.Kill()
			<-r.exited
		}
	}
	return os.RemoveAll(r.Dir)
}

// Push uploads im's blobs and manifest to the registry as repo:tag (repo without a host, e.g.
// e2e-test-images/busybox), through the registry HTTP API (monolithic blob uploads).
func (r *Registry) Push(ctx context.Context, repo, tag string, im *containerd.Image) error {
	for _, b := range append([][]byte{im.Config}, im.Layers...) {
		if err := r.pushBlob(ctx, repo, b); err != nil {
			return fmt.Errorf("push %s:%s: %w", repo, tag, err)
		}
	}
	u := fmt.Sprintf("http://%s/v2/%s/manifests/%s", r.Addr, repo, tag)
	if _, err := r.do(ctx, http.MethodPut, u, containerd.ManifestMediaType, im.Manifest, http.StatusCreated); err != nil {
		return fmt.Errorf("push %s:%s manifest: %w", repo, tag, err)
	}
	return nil
}

func (r *Registry) pushBlob(ctx context.Context, repo string, b []byte) error {
	digest := containerd.BlobDigest(b)
	base := fmt.Sprintf("http://%s/v2/%s/blobs/", r.Addr, repo)
	if _, err := r.do(ctx, http.MethodHead, base+digest, "", nil, http.StatusOK); err == nil {
		return nil
	}
	resp, err := r.do(ctx, http.MethodPost, base+"uploads/", "", nil, http.StatusAccepted)
	if err != nil {
		return err
	}
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		return fmt.Errorf("upload location: %w", err)
	}
	loc = (&url.URL{Scheme: "http", Host: r.Addr}).ResolveReference(loc)
	q := loc.Query()
	q.Set("digest", digest)
	loc.RawQuery = q.Encode()
	_, err = r.do(ctx, http.MethodPut, loc.String(), "application/octet-stream", b, http.StatusCreated)
	return err
}

func (r *Registry) do(ctx context.Context, method, u, contentType string, body []byte, want int) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if resp.StatusCode != want {
		return resp, fmt.Errorf("%s %s: %s: %s", method, u, resp.Status, strings.TrimSpace(string(msg)))
	}
	return resp, nil
}

// PushRef pushes im under a full reference (host/path:tag); the host is dropped, since the registry serves
// every mirrored host's paths (see WriteMirrorConfig).
func (r *Registry) PushRef(ctx context.Context, ref string, im *containerd.Image) error {
	host, rest, ok := strings.Cut(ref, "/")
	if !ok || !strings.ContainsAny(host, ".:") {
		return fmt.Errorf("push %s: want a reference with a registry host", ref)
	}
	i := strings.LastIndex(rest, ":")
	if i < 0 {
		return fmt.Errorf("push %s: want a tag", ref)
	}
	return r.Push(ctx, rest[:i], rest[i+1:], im)
}

// WriteMirrorConfig writes containerd's hosts.toml tree into dir so that pulls from each of hosts go to the
// registry over plain HTTP, and never anywhere else.
func WriteMirrorConfig(dir, addr string, hosts ...string) error {
	var errs []error
	for _, h := range hosts {
		d := filepath.Join(dir, h)
		if err := os.MkdirAll(d, 0o755); err != nil {
			errs = append(errs, err)
			continue
		}
		cfg := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", "http://"+addr, "http://"+addr)
		if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(cfg), 0o644); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
