package qemu

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/kiln-runtime/kiln/vm/accel"
)

// Translation is what QEMU's TCG has translated for a VM since QEMU started (HMP's "info jit"). Under TCG a
// block of guest code costs its translation the first time it runs in a QEMU, so Blocks counts the distinct
// guest code the VM ran: most of a start's CPU time, and the bulk of an idle VM's QEMU memory (CodeBytes). It is
// a measure that the host's load does not blur, unlike a start's time.
type Translation struct {
	// Blocks is the number of translated blocks in the cache.
	Blocks int
	// CodeBytes is the cache's use: the generated code with its blocks' descriptors.
	CodeBytes int64
	// Flushes counts the times the whole cache was dropped (when full, or when a saved state loads).
	Flushes int
	// Invalidated counts blocks dropped because the guest wrote to the memory their code came from.
	Invalidated int
}

// ErrNoTranslation is Translation's answer under KVM, where the guest's code runs as it is.
var ErrNoTranslation = errors.New("the VM runs under KVM: QEMU translates no guest code")

// Translation reads QEMU's translation statistics. It fails under KVM.
func (m *Machine) Translation(ctx context.Context) (Translation, error) {
	if m.cfg.Accel != accel.TCG {
		return Translation{}, fmt.Errorf("vm %s: %w", m.cfg.ID, ErrNoTranslation)
	}
	var text string
	if err := m.qmpCommand(ctx, "human-monitor-command", map[string]any{"command-line": "info jit"}, &text); err != nil {
		return Translation{}, fmt.Errorf("translation statistics: %w", err)
	}
	t, err := parseJIT(text)
	if err != nil {
		return Translation{}, fmt.Errorf("translation statistics of vm %s: %w", m.cfg.ID, err)
	}
	return t, nil
}

// parseJIT reads the figures Translation needs from the text of "info jit" (QEMU 7.2 to 10.0):
//
//	gen code size       44305619/134135808
//	TB count            78564
//	TB flush count      2
//	TB invalidate count 0
func parseJIT(text string) (Translation, error) {
	var t Translation
	found := 0
	for _, line := range strings.Split(text, "\n") {
		label, value, ok := jitField(line)
		if !ok {
			continue
		}
		var err error
		switch label {
		case "gen code size":
			used, _, _ := strings.Cut(value, "/")
			t.CodeBytes, err = strconv.ParseInt(used, 10, 64)
		case "TB count":
			t.Blocks, err = strconv.Atoi(value)
		case "TB flush count":
			t.Flushes, err = strconv.Atoi(value)
		case "TB invalidate count":
			t.Invalidated, err = strconv.Atoi(value)
		default:
			continue
		}
		if err != nil {
			return Translation{}, fmt.Errorf("info jit: %q: %w", line, err)
		}
		found++
	}
	if found != 4 {
		return Translation{}, fmt.Errorf("info jit: %d of the 4 figures found in %q", found, text)
	}
	return t, nil
}

// jitField splits a line of "info jit" into its label and its first value: the label is the words before the
// first one that starts with a digit.
func jitField(line string) (label, value string, ok bool) {
	f := strings.Fields(line)
	for i, w := range f {
		if w[0] >= '0' && w[0] <= '9' {
			return strings.Join(f[:i], " "), w, i > 0
		}
	}
	return "", "", false
}
