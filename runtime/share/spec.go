package share

import (
	"context"
	"fmt"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/mounttree"
)

// ShareSpecMounts shares every bind mount of spec for the container and points its source at the guest path;
// other mounts (proc, tmpfs...) are the guest's and stay as they are. A "bind" exports the source's own mount,
// an "rbind" the mounts below it as well, and each of those also becomes a bind mount of its own in the spec,
// right after its parent (see submountBinds). bundle is the bundle directory: a relative
// source is relative to it (as OCI allows), and a source inside it, relative or absolute, is resolved beneath it
// (see Source), since the bundle's rootfs is writable by the guest. Other absolute sources are resolved as
// AddBindSource does. Mounts that own says are the guest's own (by their index in spec.Mounts; nil for none)
// stay as they are, in their place among the others. On error spec is unchanged; what was already shared stays
// until RemoveContainer.
func (s *Share) ShareSpecMounts(ctx context.Context, containerID, bundle string, spec *specs.Spec, own func(i int) bool) error {
	if !filepath.IsAbs(bundle) {
		return fmt.Errorf("share bind mounts of container %s: bundle %q is not absolute", containerID, bundle)
	}
	bundle = filepath.Clean(bundle)
	mounts := make([]specs.Mount, 0, len(spec.Mounts))
	for i, m := range spec.Mounts {
		if own != nil && own(i) {
			mounts = append(mounts, m)
			continue
		}
		if !IsBind(m.Type, m.Options) {
			if len(m.UIDMappings) > 0 || len(m.GIDMappings) > 0 {
				return fmt.Errorf("share mount %d (%s on %s) of container %s: uidMappings/gidMappings on a %s mount: only bind mounts can be idmapped",
					i, m.Source, m.Destination, containerID, m.Type)
			}
			mounts = append(mounts, m)
			continue
		}
		src := Source{Path: m.Source}
		if !filepath.IsAbs(m.Source) || mounttree.Under(filepath.Clean(m.Source), bundle) {
			src.Root = bundle
		}
		opts := BindOptions{
			Readonly: isReadonly(m.Options), RecursiveReadonly: isRecursiveReadonly(m.Options), Recursive: isRecursive(m.Options),
			UIDMap: idMapList(m.UIDMappings), GIDMap: idMapList(m.GIDMappings), RecursiveIDMap: slices.Contains(m.Options, "ridmap"),
		}
		guest, err := s.AddBindSource(ctx, containerID, src, opts)
		if err != nil {
			return fmt.Errorf("share bind mount %d (%s on %s) of container %s: %w", i, m.Source, m.Destination, containerID, err)
		}
		// The export is idmapped already; the guest binds it as it is.
		m.Source, m.UIDMappings, m.GIDMappings = guest, nil, nil
		m.Options = slices.DeleteFunc(slices.Clone(m.Options), func(o string) bool { return o == "idmap" || o == "ridmap" })
		mounts = append(mounts, m)
		if !opts.Recursive {
			continue
		}
		subs, err := s.submountBinds(guest, m, opts)
		if err != nil {
			return fmt.Errorf("share bind mount %d (%s on %s) of container %s: %w", i, src.Path, m.Destination, containerID, err)
		}
		mounts = append(mounts, subs...)
	}
	spec.Mounts = mounts
	return nil
}

// submountBinds returns a bind mount for each mount below the shared bind parent (whose source is guest), in
// the order to mount them, parents first. The guest reaches a host mount below a shared directory as a virtio-fs
// submount, which the guest kernel mounts on first access with the flags of the mount it was reached through:
// inside the container's read-only bind of the parent, a read-write submount would turn read-only, where runc
// keeps the mounts below a non-recursive "ro" as they are. Mounted on their own, from the share, they keep their
// flags; with "rro" they are read-only too.
func (s *Share) submountBinds(guest string, parent specs.Mount, opts BindOptions) ([]specs.Mount, error) {
	host := filepath.Join(s.mounts, strings.TrimPrefix(guest, GuestDir+"/"))
	mps, err := mounttree.Points(host)
	if err != nil {
		return nil, err
	}
	var rels []string
	for _, mp := range mps {
		if mp == host || slices.Contains(rels, mp) {
			continue
		}
		rels = append(rels, mp)
	}
	sort.Slice(rels, func(i, j int) bool {
		di, dj := strings.Count(rels[i], "/"), strings.Count(rels[j], "/")
		return di < dj || di == dj && rels[i] < rels[j]
	})
	options := []string{"bind"}
	for _, o := range parent.Options {
		if isPropagation(o) {
			options = append(options, o)
		}
	}
	if opts.RecursiveReadonly {
		options = append(options, "ro")
	}
	subs := make([]specs.Mount, 0, len(rels))
	for _, mp := range rels {
		rel := strings.TrimPrefix(mp, host+"/")
		subs = append(subs, specs.Mount{
			Destination: path.Join(parent.Destination, rel),
			Type:        "bind",
			Source:      guest + "/" + rel,
			Options:     append([]string(nil), options...),
		})
	}
	return subs, nil
}

// idMapList writes OCI id mappings in containerd's "<container id>:<host id>:<size>" form, comma-separated.
func idMapList(maps []specs.LinuxIDMapping) string {
	parts := make([]string, len(maps))
	for i, m := range maps {
		parts[i] = fmt.Sprintf("%d:%d:%d", m.ContainerID, m.HostID, m.Size)
	}
	return strings.Join(parts, ",")
}

// isPropagation reports whether an OCI mount option sets mount propagation.
func isPropagation(o string) bool {
	switch o {
	case "private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable":
		return true
	}
	return false
}
