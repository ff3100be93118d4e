package pod

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/bundle"
)

// A share whose owner is gone is removed before a pod boots; one whose owner lives, or that has no owner file
// (being created right now), stays.
func TestSweepRemovesSharesOfDeadOwners(t *testing.T) {
	state := t.TempDir()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		id    string
		owner string // "" for no owner file
		stays bool
	}{
		{"dead", strconv.Itoa(dead.Process.Pid), false},
		{"alive", strconv.Itoa(os.Getpid()), true},
		{"creating", "", true},
	}
	for _, c := range cases {
		dir := ShareDir(state, c.id)
		if err := os.MkdirAll(filepath.Join(dir, "mounts"), 0o700); err != nil {
			t.Fatal(err)
		}
		if c.owner != "" {
			if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(c.owner), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	sweep(state, logrus.NewEntry(logrus.New()))
	for _, c := range cases {
		_, err := os.Stat(ShareDir(state, c.id))
		if stays := err == nil; stays != c.stays {
			t.Errorf("share %s: stays = %t, want %t (%v)", c.id, stays, c.stays, err)
		}
	}
}

// A first container whose id is not one path component is refused before anything is made: no state
// directory, no share, no VM.
func TestNewRefusesBadFirstIDBeforeBooting(t *testing.T) {
	for _, id := range []string{"a/b", "..", "../escape", ""} {
		t.Run(id, func(t *testing.T) {
			cfg := config.Default()
			cfg.Runtime.StateDir = filepath.Join(t.TempDir(), "state")
			b := &bundle.Bundle{Spec: &specs.Spec{}}
			_, err := New(context.Background(), Options{ID: "p", Config: cfg, First: &First{ID: id, Bundle: b}})
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), fmt.Sprintf("container id %q", id)) {
				t.Fatalf("New = %v, want InvalidArgument naming container id %q", err, id)
			}
			if _, err := os.Stat(cfg.Runtime.StateDir); !os.IsNotExist(err) {
				t.Errorf("state dir %s made for a refused pod (%v)", cfg.Runtime.StateDir, err)
			}
		})
	}
}

// A pod's start is over with its first container of its own: only CRI's sandbox (pause) container is the pod's
// sandbox; a standalone container (`ctr run`) or a container without a bundle here is not.
func TestIsSandbox(t *testing.T) {
	spec := func(annotations map[string]string) *bundle.Bundle {
		return &bundle.Bundle{Spec: &specs.Spec{Annotations: annotations}}
	}
	p := &Pod{bundles: map[string]*bundle.Bundle{
		"pause":      spec(map[string]string{containerTypeAnnotation: "sandbox", "io.kubernetes.cri.sandbox-id": "pause"}),
		"web":        spec(map[string]string{containerTypeAnnotation: "container", "io.kubernetes.cri.sandbox-id": "pause"}),
		"standalone": spec(nil),
	}}
	for id, want := range map[string]bool{"pause": true, "web": false, "standalone": false, "unknown": false} {
		if got := p.IsSandbox(id); got != want {
			t.Errorf("IsSandbox(%q) = %v, want %v", id, got, want)
		}
	}
}

// A failed create runs the poststop hooks unless the container was refused before its create hooks could run,
// whatever the error's class: an InvalidArgument from the guest comes after them.
func TestFailedCreateRunsPoststop(t *testing.T) {
	dir := t.TempDir()
	hook := dir + "/hook"
	if err := os.WriteFile(hook, []byte("#!/bin/sh\necho ran >> "+dir+"/runs\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	b := &bundle.Bundle{Dir: dir, Spec: &specs.Spec{Hooks: &specs.Hooks{Poststop: []specs.Hook{{Path: hook}}}}}
	ctx := context.Background()
	for _, c := range []struct {
		err  error
		runs string
	}{
		{Refuse(fmt.Errorf("wrapped: %w", errdefs.ErrInvalidArgument)), ""},
		{fmt.Errorf("create task: %w", Refuse(errdefs.ErrNotImplemented)), ""},
		{fmt.Errorf("the guest: %w", errdefs.ErrInvalidArgument), "ran\n"},
		{errors.New("the VM did not boot"), "ran\nran\n"},
	} {
		if err := FailedCreate(ctx, nil, "c1", b, c.err); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(dir + "/runs")
		if string(got) != c.runs {
			t.Errorf("after %v: hooks ran %q, want %q", c.err, got, c.runs)
		}
	}
}
