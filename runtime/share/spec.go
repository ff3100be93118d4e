package share

import (
	"context"
	"fmt"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// ShareSpecMounts shares every bind mount of spec for the container and points its source at the guest path;
// other mounts (proc, tmpfs...) are the guest's and stay as they are. A "bind" exports the source's own mount,
// an "rbind" the mounts below it as well. bundle is the bundle directory: a relative
// source is relative to it (as OCI allows), and a source inside it, relative or absolute, is resolved beneath it
// (see Source), since the bundle's rootfs is writable by the guest. Other absolute sources are resolved as
// AddBindSource does. On error spec is unchanged; what was already shared stays until RemoveContainer.
func (s *Share) ShareSpecMounts(ctx context.Context, containerID, bundle string, spec *specs.Spec) error {
	if !filepath.IsAbs(bundle) {
		return fmt.Errorf("share bind mounts of container %s: bundle %q is not absolute", containerID, bundle)
	}
	bundle = filepath.Clean(bundle)
	mounts := append([]specs.Mount(nil), spec.Mounts...)
	for i, m := range mounts {
		if !isBind(m.Type, m.Options) {
			continue
		}
		src := Source{Path: m.Source}
		if !filepath.IsAbs(m.Source) || under(filepath.Clean(m.Source), bundle) {
			src.Root = bundle
		}
		guest, err := s.AddBindSource(ctx, containerID, src, BindOptions{
			Readonly: isReadonly(m.Options), RecursiveReadonly: isRecursiveReadonly(m.Options), Recursive: isRecursive(m.Options),
		})
		if err != nil {
			return fmt.Errorf("share bind mount %d (%s on %s) of container %s: %w", i, m.Source, m.Destination, containerID, err)
		}
		mounts[i].Source = guest
		mounts[i].Options = append([]string(nil), m.Options...)
	}
	spec.Mounts = mounts
	return nil
}
