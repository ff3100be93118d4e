package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// buildTemplate boots c's template guest, waits until its agent says it is ready, and saves it into dir: its
// RAM file and its device state (migrated with x-ignore-shared, so the RAM stays in the file). The directory
// appears complete or not at all.
func buildTemplate(ctx context.Context, c Config, key, inputs, dir string) (retErr error) {
	// The RAM file is given to the build's QEMU before it starts: its id is leased first, and given back last, once
	// the file is Kiln's again (rewriteRAM) or gone with the build.
	c, lease, err := leaseUser(c)
	if err != nil {
		return err
	}
	defer func() { _ = lease.Release() }()
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.Mkdir(tmp, 0o711); err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			_ = os.RemoveAll(tmp)
		}
	}()
	if err := os.WriteFile(filepath.Join(tmp, templateInputsFile), []byte(inputs), 0o400); err != nil {
		return err
	}
	ram := filepath.Join(tmp, templateRAM)
	tc := templateConfig(c, "tpl-"+key[:12], ram)
	tc.templateInputs = inputs
	if err := createRAMFile(ram, qemuCredential(tc)); err != nil {
		return err
	}
	tm, err := New(tc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, templateBootTimeout)
	defer cancel()
	if err := tm.Start(ctx); err != nil {
		return err
	}
	defer func() { _ = tm.Stop(context.WithoutCancel(ctx)) }()
	select {
	case <-tm.console.await(agentv1.TemplateReadyLine):
	case <-tm.Exited():
		return fmt.Errorf("template guest exited before it was ready: %w", tm.ExitError())
	case <-ctx.Done():
		return fmt.Errorf("template guest not ready: %w%s", ctx.Err(), tm.Diagnostics())
	}
	state, err := os.OpenFile(filepath.Join(tmp, templateState), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer state.Close()
	sctx, scancel := context.WithTimeout(ctx, templateSaveTimeout)
	defer scancel()
	if err := tm.save(sctx, state); err != nil {
		return fmt.Errorf("save template guest: %w%s", err, tm.Diagnostics())
	}
	if err := tm.Stop(ctx); err != nil {
		return err
	}
	if _, err := punchZeros(ram); err != nil {
		return fmt.Errorf("leave the zero pages out of the template's RAM: %w", err)
	}
	if err := rewriteRAM(ram); err != nil {
		return fmt.Errorf("make the template's RAM Kiln's: %w", err)
	}
	return os.Rename(tmp, dir)
}

// rewriteRAM replaces the template's RAM file, which QEMU's user owned while the template was built, with a sparse
// copy Kiln makes, read-only: QEMU's user, whoever it is, only ever gets copies of it from now on. A copy, not the
// file given to Kiln: a descriptor opened for writing while QEMU's user owned it (by any process of that user,
// such as another VM's QEMU a guest took over) would still write into the file, and so into every later clone.
func rewriteRAM(ram string) error {
	in, err := os.Open(ram)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	tmp := ram + ".kiln"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o400)
	if err != nil {
		return err
	}
	defer os.Remove(tmp) // gone by the rename unless something failed
	if err := out.Truncate(st.Size()); err != nil {
		out.Close()
		return err
	}
	if _, err := copyExtents(in, out, st.Size()); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, ram)
}

// punchZeros deallocates the pages of path that hold only zeros (the file keeps its size and reads the same), so
// that sparse copies of it skip them. It returns the bytes deallocated.
func punchZeros(path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	const page = ramPage
	buf := make([]byte, 256*page)
	var punched int64
	// zeros is the start of the run of zero pages being scanned, -1 outside one.
	zeros := int64(-1)
	flush := func(end int64) error {
		if zeros < 0 || end <= zeros {
			zeros = -1
			return nil
		}
		err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, zeros, end-zeros)
		if err == nil {
			punched += end - zeros
		}
		zeros = -1
		return err
	}
	for off := int64(0); ; {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return punched, nil
		}
		if err != nil {
			return punched, err
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return punched, err
		}
		// Whole pages of the extent only: a partial page at either end stays as it is.
		start, end := (data+page-1)&^(page-1), hole&^(page-1)
		for pos := start; pos < end; {
			n := min(int64(len(buf)), end-pos)
			if _, err := f.ReadAt(buf[:n], pos); err != nil {
				return punched, err
			}
			for p := int64(0); p < n; p += page {
				switch zero := bytes.Equal(buf[p:p+page], zeroPage[:]); {
				case zero && zeros < 0:
					zeros = pos + p
				case !zero:
					if err := flush(pos + p); err != nil {
						return punched, err
					}
				}
			}
			pos += n
		}
		if err := flush(end); err != nil {
			return punched, err
		}
		off = hole
	}
}

// ramPage is the page size punchZeros works in (x86's base page).
const ramPage = 4096

var zeroPage [ramPage]byte

// createRAMFile creates an empty guest RAM file that QEMU, running with cred, may map.
func createRAMFile(path string, cred *syscall.Credential) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("create guest RAM file: %w", err)
	}
	defer f.Close()
	if cred != nil {
		if err := f.Chown(int(cred.Uid), int(cred.Gid)); err != nil {
			return fmt.Errorf("give the guest RAM file to QEMU's user: %w", err)
		}
	}
	return nil
}

// save stops the template guest and migrates its device state into state, passed to QEMU over QMP.
func (m *Machine) save(ctx context.Context, state *os.File) error {
	q := m.qmp
	if err := q.execute(ctx, "stop", nil, nil); err != nil {
		return err
	}
	// QEMU 7.2 has no migration property for this: the capability is set per migration, here and in each clone.
	if err := q.execute(ctx, "migrate-set-capabilities", ignoreShared, nil); err != nil {
		return err
	}
	if err := q.executeWithFile(ctx, "getfd", map[string]any{"fdname": "state"}, state); err != nil {
		return err
	}
	if err := q.execute(ctx, "migrate", map[string]any{"uri": "fd:state"}, nil); err != nil {
		return err
	}
	for {
		var mig struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := q.execute(ctx, "query-migrate", nil, &mig); err != nil {
			return err
		}
		switch mig.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", mig.Status, mig.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("migration %s: %w", mig.Status, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// ignoreShared is the migration capability that leaves shared RAM (the template's file) out of the state.
var ignoreShared = map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
