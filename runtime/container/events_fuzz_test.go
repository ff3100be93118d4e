package container

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/proto/lifecycle"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// The pod the event fuzzer's guest reports on: c1 runs with exec e1, and exec e2 is being started (registered,
// the guest's answer with its pid still out), c2 ran and its exit is known, c3 is being created (its init is
// registered, the container is not yet held).
var fuzzHeld = []exitKey{{"c1", ""}, {"c1", "e1"}, {"c1", "e2"}, {"c2", ""}, {"c3", ""}}

// fuzzStarting is the process of fuzzHeld whose pid the guest has not said yet.
var fuzzStarting = exitKey{"c1", "e2"}

// eventManager is a manager holding the fuzzer's pod, with no agent: events are dispatched by the test.
func eventManager(t *testing.T, onEvent func(Event)) (*Manager, map[exitKey]*Process) {
	l := logrus.New()
	l.SetOutput(io.Discard)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	m := &Manager{opts: Options{OnEvent: onEvent}, log: logrus.NewEntry(l), ctx: ctx, cancel: cancel,
		loopDone: make(chan struct{}), containers: map[string]*Container{}, procs: map[exitKey]*Process{}, waiting: map[exitKey]bool{}}
	procs := map[exitKey]*Process{}
	for _, k := range fuzzHeld {
		c := m.containers[k.container]
		if c == nil {
			c = &Container{id: k.container, m: m, execs: map[string]*Process{}}
			m.containers[k.container] = c
		}
		table := lifecycle.Init()
		if k.exec != "" {
			table = lifecycle.Exec()
		}
		p := newProcess(c, k.exec, table, stdio.IO{}, nil)
		if k != fuzzStarting {
			p.pid = uint32(100 + len(procs))
			if err := p.sm.Transition(lifecycle.Running); err != nil {
				t.Fatal(err)
			}
		}
		if k.exec == "" && k.container != "c3" {
			c.init = p
		} else if k.exec != "" {
			c.execs[k.exec] = p
		}
		if err := m.register(p); err != nil {
			t.Fatal(err)
		}
		procs[k] = p
	}
	procs[exitKey{"c2", ""}].finish(Exit{Status: 3}, nil)
	return m, procs
}

// FuzzEvents feeds the host arbitrary event messages from the guest, as the Events stream decodes them, and
// checks that only events about processes the host holds get through: an OOM only for a container it holds, an
// exit only for a process it holds, naming its pid or none, and only the first one, which is the exit the
// process keeps. Events never
// make the host hold more containers or processes.
func FuzzEvents(f *testing.F) {
	enc := func(events ...*agentv1.Event) []byte {
		var b []byte
		for _, e := range events {
			m, err := proto.Marshal(e)
			if err != nil {
				f.Fatal(err)
			}
			b = append(b, byte(len(m)))
			b = append(b, m...)
		}
		return b
	}
	exit := func(c, e string, pid, status uint32) *agentv1.Event {
		return &agentv1.Event{Event: &agentv1.Event_Exit{Exit: &agentv1.ExitEvent{ContainerId: c, ExecId: e, Pid: pid,
			ExitStatus: status, ExitedAt: timestamppb.New(time.Unix(1700000000, 5))}}}
	}
	oom := func(c string) *agentv1.Event {
		return &agentv1.Event{Event: &agentv1.Event_Oom{Oom: &agentv1.OOMEvent{ContainerId: c}}}
	}
	f.Add(enc(exit("c1", "", 100, 0), exit("c1", "", 100, 1), oom("c1")))
	f.Add(enc(exit("c1", "e1", 7, 137), exit("c1", "e1", 101, 137), exit("c1", "e2", 8, 1), exit("c9", "", 9, 1), oom("c9"), oom("")))
	f.Add(enc(exit("c2", "", 103, 9), oom("c2"), oom("c3"), exit("c3", "", 104, 4), exit("c3", "", 104, 5)))
	f.Add(enc(exit("c1", "e2", 7, 5), exit("c1", "e2", 8, 6), exit("c1", "e2", 9, 7), exit("c1", "e2", 10, 8),
		exit("c1", "e2", 11, 9), exit("c1", "e2", 0, 1)))
	f.Add(enc(&agentv1.Event{}, &agentv1.Event{Event: &agentv1.Event_Exit{}},
		&agentv1.Event{Event: &agentv1.Event_Exit{Exit: &agentv1.ExitEvent{ContainerId: "c1",
			ExitedAt: &timestamppb.Timestamp{Seconds: -1 << 62, Nanos: -5}}}}))
	f.Add([]byte{3, 0xff, 0xff, 0xff, 2, 0x0a, 0x00})
	f.Fuzz(func(t *testing.T, data []byte) {
		var seen []Event
		m, procs := eventManager(t, func(e Event) { seen = append(seen, e) })
		first := map[exitKey]*Exit{}
		for len(data) > 0 {
			n := min(int(data[0]), len(data)-1)
			msg := data[1 : 1+n]
			data = data[1+n:]
			var ev agentv1.Event
			if proto.Unmarshal(msg, &ev) != nil {
				continue // the stream's Recv fails on it; the host subscribes again
			}
			if x := ev.GetExit(); x != nil {
				k := exitKey{x.GetContainerId(), x.GetExecId()}
				// An exit naming another pid than the process's is an earlier process's of the same id, and dropped;
				// one naming a pid before the host knows the process's is held, not passed on.
				if p := procs[k]; p != nil && first[k] == nil && (x.GetPid() == 0 || (p.pid != 0 && x.GetPid() == p.pid)) {
					if _, done := p.ExitStatus(); !done {
						first[k] = &Exit{Pid: p.pid, Status: x.GetExitStatus()}
					}
				}
			}
			m.dispatch(&ev)
		}
		exits := map[exitKey]int{}
		for _, e := range seen {
			k := exitKey{e.ContainerID, e.ExecID}
			switch e.Kind {
			case EventOOM:
				if c := m.containers[e.ContainerID]; c == nil || c.init == nil {
					t.Fatalf("OOM event passed on for container %q, which the host does not hold", e.ContainerID)
				}
			case EventExit:
				if procs[k] == nil {
					t.Fatalf("exit passed on for %v, which the host does not hold", k)
				}
				if exits[k]++; exits[k] > 1 {
					t.Fatalf("exit of %v passed on %d times", k, exits[k])
				}
				if first[k] == nil {
					t.Fatalf("exit of %v passed on though it had already ended", k)
				}
				if e.Pid != procs[k].pid {
					t.Fatalf("exit of %v passed on with pid %d, not the one recorded at its start, %d", k, e.Pid, procs[k].pid)
				}
			default:
				t.Fatalf("event of unknown kind %v passed on", e.Kind)
			}
		}
		for k, want := range first {
			got, done := procs[k].ExitStatus()
			if !done || got.Status != want.Status || got.Pid != want.Pid {
				t.Fatalf("%v ended with %+v (done %v), want the first exit reported, %+v", k, got, done, want)
			}
			if exits[k] != 1 {
				t.Fatalf("first exit of %v passed on %d times", k, exits[k])
			}
		}
		if n := len(procs[fuzzStarting].early); n > maxEarly {
			t.Fatalf("%d exits held for %v, want at most %d", n, fuzzStarting, maxEarly)
		}
		if got, _ := procs[exitKey{"c2", ""}].ExitStatus(); got.Status != 3 {
			t.Fatalf("c2's known exit changed to %+v", got)
		}
		if len(m.containers) != 3 || len(m.procs) != len(fuzzHeld) {
			t.Fatalf("events made the host hold %d containers and %d processes", len(m.containers), len(m.procs))
		}
	})
}
