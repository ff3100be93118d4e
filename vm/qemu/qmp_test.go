package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// An answer to fakeQMP that begins with answerLate is given 300 ms after its command came, as QEMU answers a
// command that takes it a while.
const answerLate = "late:"

// fakeQMP serves QMP on a socket in a temporary directory: a greeting, then the answers given, one per command,
// with an event before each; it reports each command and whether a descriptor came with it.
func fakeQMP(t *testing.T, answers ...string) (path string, got <-chan string) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	commands := make(chan string, len(answers)+1)
	go func() {
		uc, err := l.AcceptUnix()
		if err != nil {
			return
		}
		t.Cleanup(func() { uc.Close() })
		_, _ = io.WriteString(uc, `{"QMP": {"version": {}, "capabilities": ["oob"]}}`+"\n")
		buf, oob := make([]byte, 4096), make([]byte, 64)
		for _, a := range answers {
			n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			var req struct {
				Execute string `json:"execute"`
			}
			_ = json.Unmarshal(buf[:n], &req)
			if oobn > 0 {
				req.Execute += "+fd"
				if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil && len(msgs) == 1 {
					if fds, err := unix.ParseUnixRights(&msgs[0]); err == nil {
						for _, fd := range fds {
							unix.Close(fd)
						}
					}
				}
			}
			commands <- req.Execute
			if rest, ok := strings.CutPrefix(a, answerLate); ok {
				// QEMU carries on with a command whose caller gave up on it.
				time.Sleep(300 * time.Millisecond)
				a = rest
			}
			_, _ = io.WriteString(uc, `{"event": "STOP", "data": {}}`+"\n"+a+"\n")
		}
	}()
	return path, commands
}

// The VM's one monitor runs a template's save: commands with their results and errors, and getfd with the
// descriptor QEMU takes the state through; the context bounds a command QEMU does not answer.
func TestQMPPassesDescriptors(t *testing.T) {
	path, got := fakeQMP(t, `{"return": {}}`, `{"return": {}}`, `{"return": {"status": "completed"}}`,
		`{"error": {"class": "GenericError", "desc": "no such fd"}}`)
	ctx := context.Background()
	q, err := dialQMP(ctx, path, make(chan struct{}))
	if err != nil {
		t.Fatal(err)
	}
	defer q.close()
	if c := <-got; c != "qmp_capabilities" {
		t.Fatalf("first command %q, want qmp_capabilities", c)
	}
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := q.executeWithFile(ctx, "getfd", map[string]any{"fdname": "state"}, f); err != nil {
		t.Fatal(err)
	}
	if c := <-got; c != "getfd+fd" {
		t.Fatalf("QEMU saw %q, want getfd with a descriptor", c)
	}
	var mig struct{ Status string }
	if err := q.execute(ctx, "query-migrate", nil, &mig); err != nil || mig.Status != "completed" {
		t.Fatalf("query-migrate = %+v, %v", mig, err)
	}
	if c := <-got; c != "query-migrate" {
		t.Fatalf("QEMU saw %q, want query-migrate without a descriptor", c)
	}
	if err := q.execute(ctx, "migrate", nil, nil); err == nil || !strings.Contains(err.Error(), "no such fd") {
		t.Fatalf("migrate = %v, want QEMU's error", err)
	}
	<-got
	// QEMU answers nothing more: the context bounds the wait.
	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := q.execute(cctx, "query-status", nil, nil); err == nil {
		t.Fatal("no error when QEMU never answers")
	}
}

// A QEMU that accepts the monitor's connection and then says nothing (one a guest took over) fails the dial when
// its context ends, instead of holding it; a QEMU that closes each connection unanswered leaves no descriptor
// behind however often the dial retries.
func TestDialQMPBoundsTheHandshake(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var held []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			held = append(held, c) // accepted, never answered
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := dialQMP(ctx, path, make(chan struct{}))
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("dial succeeded without a handshake")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("dial still waits for a greeting 10 s after its 300 ms context ended")
	}
	before := openFDs(t)
	// Now a QEMU that hangs up at once, many times over.
	l.Close()
	hangingUp(t, path+"2")
	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if _, err := dialQMP(ctx2, path+"2", make(chan struct{})); err == nil {
		t.Fatal("dial succeeded with a monitor that hangs up")
	}
	if after := openFDs(t); after > before+2 {
		t.Errorf("%d descriptors open after the retries, %d before: the failed handshakes leaked them", after, before)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// A dial under a context with no deadline (ctr's Create, a spare's boot) still ends when QEMU never completes a
// handshake: one that takes connections and hangs up at once, for good, made it retry for ever, holding the VM's
// lock that its Stop needs.
func TestDialQMPEndsWithoutADeadline(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qmp.sock")
	hangingUp(t, path)
	done := make(chan error, 1)
	go func() {
		_, err := dialQMPWithin(context.Background(), path, make(chan struct{}), 300*time.Millisecond)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("dial of a monitor that always hangs up: %v, want the dial's own deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("dial still retries 10 s after its 300 ms bound")
	}
}

// hangingUp listens at path as a QEMU that takes each QMP connection and hangs up at once, until the test ends.
func hangingUp(t *testing.T, path string) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}
