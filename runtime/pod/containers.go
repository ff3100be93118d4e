package pod

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/rlimit"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/hooks"
	"github.com/kiln-runtime/kiln/runtime/hostlsm"
	"github.com/kiln-runtime/kiln/runtime/share"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// Mount is one mount of a root file system as a snapshotter gives it (containerd's mount.Mount).
type Mount struct {
	Type    string
	Source  string
	Options []string
}

// ContainerOptions describe a container to add to the pod.
type ContainerOptions struct {
	ID     string
	Bundle *bundle.Bundle
	// Rootfs, when set, are the mounts that make the root file system; otherwise the bundle's root directory is
	// shared.
	Rootfs []Mount
	IO     stdio.IO
	// Release is closed once the init process's output is delivered or the container deleted; see
	// container.CreateOptions.
	Release io.Closer
}

// mountsBelowRoot are binds of the host mounts below a read-only root given as a directory, which the share
// exports alone (share.AddRootfs): mounted in the guest before the spec's own mounts, they show the container
// what runc's recursive bind of the root would, read-only (runc leaves mounts below the root as they are; here the
// guest kernel's word that they are read-only would not bind a guest taken over). A socket or a FIFO mounted
// there, which virtio-fs cannot carry, is left out.
func mountsBelowRoot(root string) ([]specs.Mount, error) {
	real, points, err := share.MountsBelow(root)
	if err != nil {
		return nil, err
	}
	mounts := make([]specs.Mount, 0, len(points))
	for _, p := range points {
		if fi, err := os.Stat(p); err != nil || !fi.IsDir() && !fi.Mode().IsRegular() {
			continue
		}
		mounts = append(mounts, specs.Mount{
			Destination: strings.TrimPrefix(p, real), Type: "bind", Source: p, Options: []string{"rbind", "rro"},
		})
	}
	return mounts, nil
}

// CreateContainer puts the container's root file system and bind sources in the share and creates it in the
// guest, its init process waiting to be started. On error the share holds nothing of it.
func (p *Pod) CreateContainer(ctx context.Context, o ContainerOptions) (_ *container.Container, retErr error) {
	if err := share.CheckID(o.ID); err != nil {
		return nil, Refuse(fmt.Errorf("create container: %w: %v", errdefs.ErrInvalidArgument, err))
	}
	b := o.Bundle
	defer func() {
		if retErr != nil {
			p.forget(o.ID)
		}
	}()
	if err := p.prepareContainer(ctx, o.ID, b); err != nil {
		return nil, err
	}
	// A root the spec asks to be read-only is exported read-only: a guest kernel taken over must not write a
	// host directory that may be every pod's root, or the container's writable layer. The mount points
	// libcontainer makes before the root becomes read-only go into a layer in guest memory (the agent's
	// readOnlyRoot).
	readonly := b.Spec.Root != nil && b.Spec.Root.Readonly
	var rootfs string
	var below []specs.Mount
	var err error
	if len(o.Rootfs) > 0 {
		mounts := make([]share.Mount, 0, len(o.Rootfs))
		for _, m := range o.Rootfs {
			mounts = append(mounts, share.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
		}
		rootfs, err = p.share.AddRootfsMounts(ctx, o.ID, mounts, readonly)
	} else {
		if readonly {
			if below, err = mountsBelowRoot(b.Rootfs); err != nil {
				return nil, fmt.Errorf("create container %s: %w", o.ID, err)
			}
		}
		rootfs, err = p.share.AddRootfs(ctx, o.ID, b.Rootfs, readonly)
	}
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", o.ID, err)
	}
	defer func() {
		if retErr != nil {
			if err := p.share.RemoveContainer(context.WithoutCancel(ctx), o.ID); err != nil {
				p.log.WithError(err).WithField("container", o.ID).Warn("remove container from share after a failed create")
			}
		}
	}()
	standIn, err := p.startStandIn(o.ID, filepath.Join(p.share.ExportDir(), rootfs))
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", o.ID, err)
	}
	defer func() {
		if retErr != nil {
			if err := p.endStandIn(o.ID); err != nil {
				p.log.WithError(err).WithField("container", o.ID).Warn("end the stand-in after a failed create")
			}
		}
	}()
	spec, err := guestUserNamespace(o.ID, *b.Spec, p.isContainerPid)
	if err != nil {
		return nil, err
	}
	if spec, err = guestNamespaces(o.ID, spec, p.ctrs.GuestInitPid); err != nil {
		return nil, err
	}
	if fields, err := hostlsm.Spec(p.cfg.Runtime.IgnoreHostLSM(), &spec); err != nil {
		return nil, fmt.Errorf("create container %s: %w", o.ID, err)
	} else if len(fields) > 0 {
		p.log.WithFields(logrus.Fields{"container": o.ID, "ignored": fields}).Info("host LSM settings taken out (runtime.host_lsm = \"ignore\")")
	}
	spec.Process = rlimit.Fill(spec.Process, p.rlimits)
	spec.Mounts = append(below, spec.Mounts...)
	guestShm := podShm(spec.Mounts, spec.Annotations[bundle.SandboxAnnotation])
	if err := p.share.ShareSpecMounts(ctx, o.ID, b.Dir, &spec, guestShm); err != nil {
		return nil, fmt.Errorf("create container %s: %w", o.ID, err)
	}
	p.allowVolumeMemory()
	raw, err := json.Marshal(&spec)
	if err != nil {
		return nil, fmt.Errorf("create container %s: encode spec: %w", o.ID, err)
	}
	c, err := p.ctrs.Create(ctx, container.CreateOptions{
		ID: o.ID, Bundle: b.Dir, Spec: raw, Rootfs: rootfs, IO: o.IO, Release: o.Release, HostPid: standIn.Pid(),
	})
	if err != nil {
		return nil, err
	}
	p.bundlesMu.Lock()
	p.bundles[o.ID] = b
	p.followOOMScoresLocked()
	p.bundlesMu.Unlock()
	return c, nil
}

// prepareContainer checks that a container can join the pod and runs its create hooks, unless they ran when the
// pod booted for it.
func (p *Pod) prepareContainer(ctx context.Context, id string, b *bundle.Bundle) error {
	var r *specs.LinuxResources
	if b.Spec.Linux != nil {
		r = b.Spec.Linux.Resources
	}
	if id != p.net.hooksRun {
		if err := p.checkJoin(id, b.Spec); err != nil {
			return err
		}
	}
	// The pod's first container too: its memory limit is part of what the pod needs when another container's grows.
	if err := p.Fit(ctx, id, r, false); err != nil {
		if id == p.net.hooksRun {
			// Its create hooks ran when the pod booted (or adopted a spare) for it: its poststop hooks must run
			// too (FailedCreate), so this is no refusal before them.
			return err
		}
		return Refuse(err)
	}
	if id == p.net.hooksRun {
		return nil
	}
	if !hooks.Any(b.Spec) {
		return nil
	}
	if err := p.ensureHolder(); err != nil {
		return fmt.Errorf("create container %s: %w", id, err)
	}
	if err := hooks.CreateRuntime(ctx, b.Spec, p.hookState(id, b)); err != nil {
		return fmt.Errorf("create container %s: %w", id, err)
	}
	return nil
}

// Started runs a container's poststart hooks once its init process runs. A failing hook fails the start and
// stops the container, as the runtime spec asks (and runc does): its exit is reported as any other, and its
// delete runs the poststop hooks.
func (p *Pod) Started(ctx context.Context, c *container.Container) error {
	p.started.Store(true)
	b := p.bundleOf(c.ID())
	if b == nil || !hooks.Any(b.Spec) {
		return nil
	}
	err := hooks.Poststart(ctx, b.Spec, p.hookState(c.ID(), b))
	if err == nil {
		return nil
	}
	if kerr := c.Kill(context.WithoutCancel(ctx), uint32(unix.SIGKILL), false); kerr != nil {
		p.log.WithError(kerr).WithField("container", c.ID()).Warn("stop the container whose poststart hook failed")
	}
	return fmt.Errorf("start container %s: %w", c.ID(), err)
}

// containerTypeAnnotation is the annotation CRI puts on each container of a pod: sandboxType on the pod's own
// (pause) container.
const (
	containerTypeAnnotation = "io.kubernetes.cri.container-type"
	sandboxType             = "sandbox"
)

// IsSandbox says whether container id is its pod's CRI sandbox (pause) container, whose start is not yet the
// pod's: its own containers come after it.
func (p *Pod) IsSandbox(id string) bool {
	b := p.bundleOf(id)
	return b != nil && b.Spec.Annotations[containerTypeAnnotation] == sandboxType
}

func (p *Pod) bundleOf(id string) *bundle.Bundle {
	p.bundlesMu.Lock()
	defer p.bundlesMu.Unlock()
	return p.bundles[id]
}

// DeleteContainer removes the container from the guest (killing it first with force) and from the share, and
// returns how its init process ended.
func (p *Pod) DeleteContainer(ctx context.Context, c *container.Container, force bool) (container.Exit, error) {
	e, err := c.Delete(ctx, force)
	if err != nil {
		return e, err
	}
	// The bundle goes first: an update's fit that finds it gone records nothing, and one that came before has
	// its limits dropped by forget.
	p.bundlesMu.Lock()
	b := p.bundles[c.ID()]
	delete(p.bundles, c.ID())
	p.followOOMScoresLocked()
	p.bundlesMu.Unlock()
	p.forget(c.ID())
	// First: the stand-in's root directory is the container's root file system, which the share unmounts.
	if err := p.endStandIn(c.ID()); err != nil {
		p.log.WithError(err).WithField("container", c.ID()).Warn("end the container's stand-in")
	}
	// The container is gone from the guest and from the pod by now, so a retry would find nothing to delete: what
	// the share leaves goes when the pod stops, and the poststop hooks (nerdctl's CNI DEL) run all the same.
	if err := p.share.RemoveContainer(ctx, c.ID()); err != nil {
		p.log.WithError(err).WithField("container", c.ID()).Warn("remove the container's share; it goes with the pod")
	}
	if b != nil && hooks.Any(b.Spec) {
		if err := hooks.Poststop(ctx, b.Spec, p.hookState(c.ID(), b)); err != nil {
			p.log.WithError(err).WithField("container", c.ID()).Warn("poststop hook failed")
		}
	}
	return e, nil
}

// FailedCreate runs the poststop hooks of container id, whose create failed with err in p (nil when the pod's
// boot for it failed), as runc's destroy runs them for a container whose create got past its spec's checks: a
// hook that undoes what a create hook did (nerdctl's CNI DEL releasing the address its ADD leased) then runs
// whether or not the create hooks ran (CNI's DEL accepts that). A container refused before its create hooks
// could run (Refused: its spec, id or configuration) gets none. Run before the pod stops, so that a namespace
// holder is still there for the hooks.
func FailedCreate(ctx context.Context, p *Pod, id string, b *bundle.Bundle, err error) error {
	if b == nil || !hooks.Any(b.Spec) || Refused(err) {
		return nil
	}
	st := hooks.State{ID: id, Bundle: b.Dir, Annotations: b.Spec.Annotations}
	if p != nil {
		st = p.hookState(id, b)
	}
	if err := hooks.Poststop(ctx, b.Spec, st); err != nil {
		return fmt.Errorf("container %s, after its create failed: %w", id, err)
	}
	return nil
}
