package virtiofs

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// requireVirtiofsd skips unless the test runs as root on a host with virtiofsd: its namespace sandbox needs
// root.
func requireVirtiofsd(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("virtiofsd's namespace sandbox needs root")
	}
	if _, err := os.Stat(DefaultBinary); err != nil {
		t.Skipf("virtiofsd not installed: %v", err)
	}
}

func testConfig(t *testing.T) Config {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	return Config{SourceDir: src, SocketPath: filepath.Join(dir, "fs.sock"), Log: logrus.NewEntry(log)}
}

// processesFor lists the pids whose command line names dir: virtiofsd and its sandboxed child carry the
// source path.
func processesFor(dir string) []string {
	var pids []string
	matches, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range matches {
		b, err := os.ReadFile(f)
		if err == nil && bytes.Contains(b, []byte("source="+dir)) {
			pids = append(pids, filepath.Base(filepath.Dir(f)))
		}
	}
	return pids
}

func checkGone(t *testing.T, cfg Config) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for len(processesFor(cfg.SourceDir)) > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if pids := processesFor(cfg.SourceDir); len(pids) > 0 {
		t.Errorf("leftover virtiofsd processes %v", pids)
	}
	if _, err := os.Lstat(cfg.SocketPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover socket %s (%v)", cfg.SocketPath, err)
	}
	pidfile := "/var/run/virtiofsd/" + strings.ReplaceAll(cfg.SocketPath, "/", ".") + ".pid"
	if _, err := os.Lstat(pidfile); err == nil {
		t.Errorf("leftover pid file %s", pidfile)
	}
}

// getFeatures sends VHOST_USER_GET_FEATURES and reads the reply's header: proof that virtiofsd serves the socket.
func getFeatures(t *testing.T, path string) {
	t.Helper()
	c, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		t.Fatalf("dial vhost-user socket: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var req [12]byte
	binary.LittleEndian.PutUint32(req[0:], 1)   // VHOST_USER_GET_FEATURES
	binary.LittleEndian.PutUint32(req[4:], 0x1) // version 1
	if _, err := c.Write(req[:]); err != nil {
		t.Fatalf("write GET_FEATURES: %v", err)
	}
	var hdr [12]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		t.Fatalf("read GET_FEATURES reply: %v", err)
	}
	if got := binary.LittleEndian.Uint32(hdr[0:]); got != 1 {
		t.Errorf("reply request %d, want 1", got)
	}
	if flags := binary.LittleEndian.Uint32(hdr[4:]); flags&0x4 == 0 {
		t.Errorf("reply flags %#x lack the reply bit", flags)
	}
}

func TestStartServeStop(t *testing.T) {
	requireVirtiofsd(t)
	cfg := testConfig(t)
	d, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(cfg.SocketPath); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket %s after Start: %v %v", cfg.SocketPath, fi, err)
	}
	getFeatures(t, cfg.SocketPath)
	if err := d.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(context.Background()); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	select {
	case <-d.Exited():
	default:
		t.Error("Exited not closed after Stop")
	}
	checkGone(t, cfg)
}

// A virtiofsd whose client went away exits by itself; Stop must still succeed and clean up.
func TestStopAfterClientLeft(t *testing.T) {
	requireVirtiofsd(t)
	cfg := testConfig(t)
	d, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	getFeatures(t, cfg.SocketPath)
	select {
	case <-d.Exited():
	case <-time.After(5 * time.Second):
		t.Error("virtiofsd still runs 5 s after its only client disconnected")
	}
	if err := d.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkGone(t, cfg)
}

func TestStartFailures(t *testing.T) {
	requireVirtiofsd(t)
	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr string
	}{
		{"missing binary", func(c *Config) { c.Binary = "/nonexistent/virtiofsd" }, "apt-get install qemu-system-common"},
		{"missing source", func(c *Config) { c.SourceDir += "-missing" }, "shared directory"},
		{"source is a file", func(c *Config) {
			f := c.SourceDir + "-file"
			_ = os.WriteFile(f, nil, 0o644)
			c.SourceDir = f
		}, "not a directory"},
		// virtiofsd itself refuses the option: it exits before accepting, and its stderr is in the error.
		{"virtiofsd exits early", func(c *Config) { c.ExtraArgs = []string{"-o", "no_such_option"} }, "virtiofsd stderr"},
		{"not ready in time", func(c *Config) {
			// A stand-in that never accepts.
			c.Binary = filepath.Join(filepath.Dir(c.SourceDir), "hang.sh")
			_ = os.WriteFile(c.Binary, []byte("#!/bin/sh\nsleep 30\n"), 0o755)
			c.ReadyTimeout = 200 * time.Millisecond
		}, "did not accept connections"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t)
			tt.mutate(&cfg)
			d, err := Start(context.Background(), cfg)
			if err == nil {
				_ = d.Stop(context.Background())
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not mention %q", err, tt.wantErr)
			}
			checkGone(t, cfg)
		})
	}
}
