package portforward

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/netns"
)

// Offsets in the context of a BPF_PROG_TYPE_SK_LOOKUP program (struct bpf_sk_lookup in linux/bpf.h, a stable
// UAPI): family, protocol, local_ip4, local_ip6[4].
const (
	offFamily   = 8
	offProtocol = 12
	offLocalIP4 = 40
	offLocalIP6 = 44
)

// The listener slots of the socket map.
const (
	slotV4 = 0
	slotV6 = 1
)

// ProgramName is the name the kernel shows for the steering program (bpftool prog, link listings).
const ProgramName = "kiln_pf_steer"

// skPass lets the kernel go on with its own lookup (SK_PASS).
const skPass = 1

// program is the sk_lookup program: a TCP connection whose destination is 127.0.0.1 (IPv4) or ::1 (IPv6), on
// any port, is given to the listener in the socket map's slot for its family. Any other connection, or one whose
// slot is empty, goes on to the kernel's own lookup.
func program(sockets *ebpf.Map) asm.Instructions {
	// The context holds addresses in network byte order: load them as the host loads a 32-bit word.
	lo4 := int32(binary.NativeEndian.Uint32(net.IPv4(127, 0, 0, 1).To4()))
	lo6 := net.IPv6loopback
	var lo6Words [4]int32
	for i := range lo6Words {
		lo6Words[i] = int32(binary.NativeEndian.Uint32(lo6[4*i:]))
	}
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, offProtocol, asm.Word),
		asm.JNE.Imm(asm.R2, unix.IPPROTO_TCP, "pass"),
		asm.LoadMem(asm.R2, asm.R6, offFamily, asm.Word),
		asm.JEq.Imm(asm.R2, unix.AF_INET6, "v6"),
		asm.JNE.Imm(asm.R2, unix.AF_INET, "pass"),
		asm.LoadMem(asm.R2, asm.R6, offLocalIP4, asm.Word),
		asm.JNE.Imm32(asm.R2, lo4, "pass"),
		asm.StoreImm(asm.RFP, -4, slotV4, asm.Word),
		asm.Ja.Label("lookup"),
	}
	for i, w := range lo6Words {
		load := asm.LoadMem(asm.R2, asm.R6, int16(offLocalIP6+4*i), asm.Word)
		if i == 0 {
			load = load.WithSymbol("v6")
		}
		insns = append(insns, load, asm.JNE.Imm32(asm.R2, w, "pass"))
	}
	return append(insns,
		asm.StoreImm(asm.RFP, -4, slotV6, asm.Word),
		// sk = bpf_map_lookup_elem(sockets, &slot)
		asm.LoadMapPtr(asm.R1, sockets.FD()).WithSymbol("lookup"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "pass"),
		// bpf_sk_assign(ctx, sk, 0); bpf_sk_release(sk). A failed assignment leaves the kernel's lookup to
		// answer, as if the program had not run.
		asm.Mov.Reg(asm.R7, asm.R0),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Mov.Imm(asm.R3, 0),
		asm.FnSkAssign.Call(),
		asm.Mov.Reg(asm.R1, asm.R7),
		asm.FnSkRelease.Call(),
		asm.Mov.Imm(asm.R0, skPass).WithSymbol("pass"),
		asm.Return(),
	)
}

// steering is the sk_lookup program attached to one network namespace with the listeners it steers to. The
// attachment is held by a file descriptor only, never pinned: it ends when Close runs or the process dies.
type steering struct {
	// v4 always exists; v6 is nil on a host without IPv6.
	v4, v6  *net.TCPListener
	sockets *ebpf.Map
	prog    *ebpf.Program
	link    link.Link
}

// steer makes the listeners inside the namespace at nsPath, puts them in a socket map and attaches the program to
// the namespace. On error nothing is left.
func steer(nsPath string) (_ *steering, retErr error) {
	s := &steering{}
	defer func() {
		if retErr != nil {
			s.Close()
		}
	}()
	var err error
	s.v4, s.v6, err = listenIn(nsPath)
	if err != nil {
		return nil, err
	}
	s.sockets, err = ebpf.NewMap(&ebpf.MapSpec{
		Name: "kiln_pf_socks", Type: ebpf.SockMap, KeySize: 4, ValueSize: 8, MaxEntries: 2,
	})
	if err != nil {
		return nil, fmt.Errorf("create socket map: %w", err)
	}
	if err := putSocket(s.sockets, slotV4, s.v4); err != nil {
		return nil, err
	}
	if s.v6 != nil {
		if err := putSocket(s.sockets, slotV6, s.v6); err != nil {
			return nil, err
		}
	}
	s.prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         ProgramName,
		Type:         ebpf.SkLookup,
		AttachType:   ebpf.AttachSkLookup,
		Instructions: program(s.sockets),
		License:      "Apache-2.0",
	})
	if err != nil {
		return nil, fmt.Errorf("load sk_lookup program: %w", err)
	}
	ns, err := os.Open(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	l, err := link.AttachNetNs(int(ns.Fd()), s.prog)
	if err != nil {
		return nil, fmt.Errorf("attach sk_lookup program to network namespace %s: %w", nsPath, err)
	}
	s.link = l
	return s, nil
}

// listeners are the listeners the program steers to.
func (s *steering) listeners() []*net.TCPListener {
	if s.v6 == nil {
		return []*net.TCPListener{s.v4}
	}
	return []*net.TCPListener{s.v4, s.v6}
}

// putSocket stores l's socket in slot of m.
func putSocket(m *ebpf.Map, slot uint32, l *net.TCPListener) error {
	raw, err := l.SyscallConn()
	if err != nil {
		return fmt.Errorf("socket of listener %s: %w", l.Addr(), err)
	}
	var putErr error
	if err := raw.Control(func(fd uintptr) {
		putErr = m.Update(slot, uint64(fd), ebpf.UpdateAny)
	}); err != nil {
		return fmt.Errorf("socket of listener %s: %w", l.Addr(), err)
	}
	if putErr != nil {
		return fmt.Errorf("put listener %s in the socket map: %w", l.Addr(), putErr)
	}
	return nil
}

// listenIn makes the two listeners inside the namespace at nsPath: a socket belongs to the namespace of the thread
// that creates it. They are bound to an ephemeral port of the loopback, where nothing from outside the namespace
// can reach them (and the pod's interfaces are mirrored to the guest anyway). A host without IPv6 gets no IPv6
// listener.
func listenIn(nsPath string) (v4, v6 *net.TCPListener, err error) {
	err = netns.DoPath(nsPath, func() error {
		var err error
		if v4, err = listenTCP("tcp4", "127.0.0.1:0"); err != nil {
			return fmt.Errorf("listen on 127.0.0.1 in network namespace %s: %w", nsPath, err)
		}
		v6, err = listenTCP("tcp6", "[::1]:0")
		if err != nil {
			v6 = nil
			if !errors.Is(err, syscall.EADDRNOTAVAIL) && !errors.Is(err, syscall.EAFNOSUPPORT) {
				v4.Close()
				return fmt.Errorf("listen on ::1 in network namespace %s: %w", nsPath, err)
			}
		}
		return nil
	})
	return v4, v6, err
}

// listenTCP listens on a loopback address with IP_FREEBIND: a namespace whose loopback is down has no 127.0.0.1
// yet, and the listener must not depend on it (the steered connections do not reach it through its address).
func listenTCP(network, addr string) (*net.TCPListener, error) {
	lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error {
		level, opt := unix.SOL_IP, unix.IP_FREEBIND
		if network == "tcp6" {
			level, opt = unix.SOL_IPV6, unix.IPV6_FREEBIND
		}
		var err error
		if cerr := c.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), level, opt, 1) }); cerr != nil {
			return cerr
		}
		return err
	}}
	// Plain TCP: Go listens with MPTCP where the kernel has it, and an MPTCP socket neither goes into a socket map
	// nor takes a TCP connection from the program.
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		return nil, err
	}
	return l.(*net.TCPListener), nil
}

// Close detaches the program and closes the listeners.
func (s *steering) Close() {
	if s.link != nil {
		_ = s.link.Close()
	}
	if s.prog != nil {
		_ = s.prog.Close()
	}
	if s.sockets != nil {
		_ = s.sockets.Close()
	}
	if s.v4 != nil {
		_ = s.v4.Close()
	}
	if s.v6 != nil {
		_ = s.v6.Close()
	}
}
