package image

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Module is one kernel module file found in a kernel's module tree.
type Module struct {
	// Name is the module name in the kernel's canonical spelling, with '_'
	// where the file name may have '-' (the kernel treats them as equal).
	Name string
	// Path is the module file, possibly compressed (.ko.xz, .ko.zst, .ko.gz).
	Path string
}

// moduleSuffixes are the file endings a Debian module tree may use; which
// one a kernel uses depends on its CONFIG_MODULE_COMPRESS_* choice.
var moduleSuffixes = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

// ModuleIndex maps module names to files for one kernel release.
type ModuleIndex struct {
	dir     string
	files   map[string]string
	builtin map[string]bool
}

// CanonicalModuleName returns the kernel's spelling of a module name: the
// kernel compares names with '-' and '_' as the same character and stores
// them with '_'.
func CanonicalModuleName(name string) string { return strings.ReplaceAll(name, "-", "_") }

// OpenModules indexes the module files under dir (a lib/modules/<release>
// directory). It reads modules.builtin when present so that asking for a
// module compiled into the kernel is not an error.
func OpenModules(dir string) (*ModuleIndex, error) {
	ix := &ModuleIndex{dir: dir, files: map[string]string{}, builtin: map[string]bool{}}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		base := d.Name()
		for _, suf := range moduleSuffixes {
			if strings.HasSuffix(base, suf) {
				name := CanonicalModuleName(strings.TrimSuffix(base, suf))
				if prev, dup := ix.files[name]; dup {
					return fmt.Errorf("module %s found twice: %s and %s", name, prev, path)
				}
				ix.files[name] = path
				break
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index kernel modules in %s: %w", dir, err)
	}
	if len(ix.files) == 0 {
		return nil, fmt.Errorf("index kernel modules in %s: no module files (%s)", dir, strings.Join(moduleSuffixes, ", "))
	}
	if b, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			base := filepath.Base(strings.TrimSpace(sc.Text()))
			for _, suf := range moduleSuffixes {
				if strings.HasSuffix(base, suf) {
					ix.builtin[CanonicalModuleName(strings.TrimSuffix(base, suf))] = true
					break
				}
			}
		}
	}
	return ix, nil
}

// Lookup returns the module called name ('-' or '_' spelling).
func (ix *ModuleIndex) Lookup(name string) (Module, bool) {
	c := CanonicalModuleName(name)
	p, ok := ix.files[c]
	return Module{Name: c, Path: p}, ok
}

// Builtin reports whether name is compiled into the kernel.
func (ix *ModuleIndex) Builtin(name string) bool { return ix.builtin[CanonicalModuleName(name)] }

// Resolve returns the requested modules and everything they depend on, in an
// order where each module comes after its dependencies. Requested modules
// that are built into the kernel are left out. It fails on a module that is
// neither a file nor built in, and on a dependency cycle.
func (ix *ModuleIndex) Resolve(ctx context.Context, requested []string) ([]Module, error) {
	var want []string
	for _, r := range requested {
		if ix.Builtin(r) {
			continue
		}
		want = append(want, r)
	}
	order, err := LoadOrder(want, func(name string) ([]string, error) {
		m, ok := ix.Lookup(name)
		if !ok {
			if ix.Builtin(name) {
				return nil, nil
			}
			return nil, fmt.Errorf("module %s not found under %s (no %s file, not in modules.builtin)", name, ix.dir, name+".ko*")
		}
		raw, err := ReadModule(ctx, m.Path)
		if err != nil {
			return nil, err
		}
		info, err := ModInfo(raw)
		if err != nil {
			return nil, fmt.Errorf("read modinfo of %s: %w", m.Path, err)
		}
		return splitDepends(info["depends"]), nil
	})
	if err != nil {
		return nil, err
	}
	mods := make([]Module, 0, len(order))
	for _, n := range order {
		if m, ok := ix.Lookup(n); ok {
			mods = append(mods, m)
		}
	}
	return mods, nil
}

func splitDepends(s string) []string {
	var out []string
	for _, d := range strings.Split(s, ",") {
		if d = strings.TrimSpace(d); d != "" {
			out = append(out, d)
		}
	}
	return out
}

// LoadOrder returns requested plus their transitive dependencies (as given by
// depends) in canonical spelling, dependencies first, each once. Requested
// modules keep their relative order where dependencies allow, so the result
// only changes when the inputs do. It fails on a dependency cycle, naming it.
func LoadOrder(requested []string, depends func(name string) ([]string, error)) ([]string, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order, stack []string
	var visit func(name string) error
	visit = func(name string) error {
		name = CanonicalModuleName(name)
		switch state[name] {
		case done:
			return nil
		case visiting:
			i := len(stack) - 1
			for i > 0 && stack[i] != name {
				i--
			}
			return fmt.Errorf("module dependency cycle: %s -> %s", strings.Join(stack[i:], " -> "), name)
		}
		state[name] = visiting
		stack = append(stack, name)
		deps, err := depends(name)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		stack = stack[:len(stack)-1]
		state[name] = done
		order = append(order, name)
		return nil
	}
	for _, r := range requested {
		if strings.TrimSpace(r) == "" {
			continue
		}
		if err := visit(strings.TrimSpace(r)); err != nil {
			return nil, fmt.Errorf("resolve module %s: %w", r, err)
		}
	}
	return order, nil
}

// ModInfo parses the NUL-separated key=value strings of an ELF module's
// .modinfo section. A key that repeats (alias=, parm=) keeps its last value;
// only single-valued keys such as depends= and name= matter here.
func ModInfo(elfBytes []byte) (map[string]string, error) {
	f, err := elf.NewFile(bytes.NewReader(elfBytes))
	if err != nil {
		return nil, fmt.Errorf("parse ELF: %w", err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("read .modinfo section: %w", err)
	}
	info := map[string]string{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			info[k] = v
		}
	}
	return info, nil
}

// ReadModule returns a module file's ELF bytes, decompressing .ko.xz,
// .ko.zst and .ko.gz with the xz, zstd or gzip tools. Kiln ships modules
// uncompressed so the guest kernel needs no module decompressor and the agent
// can hand the file straight to finit_module.
func ReadModule(ctx context.Context, path string) ([]byte, error) {
	var tool string
	switch {
	case strings.HasSuffix(path, ".ko"):
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read module: %w", err)
		}
		return b, nil
	case strings.HasSuffix(path, ".ko.xz"):
		tool = "xz"
	case strings.HasSuffix(path, ".ko.zst"):
		tool = "zstd"
	case strings.HasSuffix(path, ".ko.gz"):
		tool = "gzip"
	default:
		return nil, fmt.Errorf("read module %s: unknown file ending", path)
	}
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, tool, "-dc", path)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("decompress module %s with %s -dc (install %s if missing): %w: %s",
			path, tool, tool, err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}
