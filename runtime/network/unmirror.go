package network

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/netdump"
)

// saved is what Save writes: enough for Unmirror to undo a Mirror whose owner was killed.
type saved struct {
	Namespace string `json:"namespace"`
	// NS is the namespace Namespace named when it was saved; zero in a record of an older Kiln.
	NS         nsID             `json:"ns"`
	Interfaces []savedInterface `json:"interfaces"`
}

// nsID tells one namespace from another: the device and inode of its nsfs file, unique while it lives.
type nsID struct {
	Dev uint64 `json:"dev,omitempty"`
	Ino uint64 `json:"ino,omitempty"`
}

// identify is the namespace of the open descriptor fd.
func identify(fd int) (nsID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nsID{}, fmt.Errorf("stat the namespace: %w", err)
	}
	return nsID{Dev: st.Dev, Ino: st.Ino}, nil
}

// savedInterface is a mirrored interface as Unmirror finds it again.
type savedInterface struct {
	Name   string `json:"name"`
	Index  int    `json:"index"`
	TxQLen int    `json:"tx_queue_len"`
}

// Save writes what Unmirror needs to undo m into file.
func (m *Mirror) Save(file string) error {
	st := saved{Namespace: m.nsPath, NS: m.ns}
	for _, ifc := range m.Interfaces {
		st.Interfaces = append(st.Interfaces, savedInterface{Name: ifc.Name, Index: ifc.index, TxQLen: ifc.txQLen})
	}
	return st.write(file)
}

// SaveNamespace writes, before MirrorNamespace changes the namespace open as ns (which path named), the record
// Unmirror needs to find what a mirror killed half-way made there (its taps and redirects; the interfaces' queue
// lengths come with Save).
func SaveNamespace(file string, ns *os.File, path string) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(ns.Fd()), &st); err != nil {
		return fmt.Errorf("save network mirror state: %w", &os.PathError{Op: "fstat", Path: path, Err: err})
	}
	return saved{Namespace: path, NS: nsID{Dev: st.Dev, Ino: st.Ino}}.write(file)
}

func (st saved) write(file string) error {
	raw, err := json.Marshal(st)
	if err != nil {
		return err
	}
	if err := os.WriteFile(file, raw, 0o600); err != nil {
		return fmt.Errorf("save network mirror state: %w", err)
	}
	return nil
}

// savedLimit bounds the state file Unmirror reads.
const savedLimit = 1 << 20

// Unmirror undoes, from the file Save wrote, a Mirror whose owner was killed before Close: it deletes taps named
// as Kiln names them, removes ingress qdiscs whose filter redirects to such a tap or to a link that is gone (the
// tap went with QEMU's descriptors), and restores the interfaces' transmit queue lengths. A missing file or
// namespace is not an error: there is nothing to undo.
func Unmirror(file string) error {
	f, err := os.Open(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read network mirror state: %w", err)
	}
	raw, err := io.ReadAll(io.LimitReader(f, savedLimit))
	f.Close()
	if err != nil {
		return fmt.Errorf("read network mirror state %s: %w", file, err)
	}
	var st saved
	if err := json.Unmarshal(raw, &st); err != nil {
		return fmt.Errorf("parse network mirror state %s: %w", file, err)
	}
	if !filepath.IsAbs(st.Namespace) {
		return fmt.Errorf("network mirror state %s: namespace %q is not an absolute path", file, st.Namespace)
	}
	h, err := undoHandle(st.Namespace, st.NS)
	if h == nil {
		return err
	}
	defer h.Close()
	links, err := netdump.Consistent(h.LinkList)
	if err != nil {
		return fmt.Errorf("list links in %s: %w", st.Namespace, err)
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	isOurs := func(index int) bool {
		name, ok := names[index]
		return !ok || isTap(name)
	}
	var errs []error
	for _, l := range links {
		a := l.Attrs()
		if isTap(a.Name) {
			if err := h.LinkDel(l); err != nil && !notFound(err) {
				errs = append(errs, fmt.Errorf("delete tap %s: %w", a.Name, err))
			}
			continue
		}
		filters, err := netdump.Consistent(func() ([]netlink.Filter, error) { return h.FilterList(l, ingressHandle) })
		if err != nil {
			continue // no ingress qdisc
		}
		if redirectsToOurs(filters, isOurs) {
			if err := removeIngress(h, a.Index, a.Name); err != nil {
				errs = append(errs, err)
			}
		}
		for _, ifc := range st.Interfaces {
			if ifc.Index == a.Index && ifc.Name == a.Name {
				if err := restoreTxQLen(h, l, ifc.TxQLen); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	return errors.Join(errs...)
}

// undoHandle is netlink in the namespace at path, for undoing a mirror there (Mirror.Close, Unmirror): nil and
// no error when the namespace is gone, and what Kiln made in it with it, or when path names another namespace
// than want (unless want is zero): Kiln's taps there would be another pod's.
func undoHandle(path string, want nsID) (*netlink.Handle, error) {
	ns, err := netns.GetFromPath(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s to undo its mirror: %w", path, err)
	}
	defer ns.Close()
	if want != (nsID{}) {
		got, err := identify(int(ns))
		if err != nil {
			return nil, fmt.Errorf("network namespace %s: %w", path, err)
		}
		if got != want {
			// The mirrored one is gone, and with it what Kiln made there; this one is someone else's.
			return nil, nil
		}
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in network namespace %s: %w", path, err)
	}
	return h, nil
}

// redirectsToOurs says whether any of a link's ingress filters redirects to a link isOurs names.
func redirectsToOurs(filters []netlink.Filter, isOurs func(index int) bool) bool {
	for _, f := range filters {
		u, ok := f.(*netlink.U32)
		if !ok {
			continue
		}
		for _, act := range u.Actions {
			if m, ok := act.(*netlink.MirredAction); ok && isOurs(m.Ifindex) {
				return true
			}
		}
	}
	return false
}
