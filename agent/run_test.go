package agent

import (
	"context"
	"errors"
	"testing"
)

type fakeSetupGuest struct {
	template   bool
	restoreErr error
	proceeded  int
}

func (g *fakeSetupGuest) Proceed()                           { g.proceeded++ }
func (g *fakeSetupGuest) Template() bool                     { return g.template }
func (g *fakeSetupGuest) Restored(ctx context.Context) error { return g.restoreErr }

type countingPod struct{ prepared int }

func (p *countingPod) Prepare() { p.prepared++ }

// A booted guest makes its pod namespace after the host's first request; a template's clone only once seeded
// (Restored runs inside SeedGuest), so that no clone's namespace draws on the generator the template saved.
func TestSetupHooksPreparePodAfterSeedInClones(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		template               bool
		restoreErr             error
		afterAnswer, afterSeed int
		wantRestoreErr         bool
	}{
		{name: "booted", afterAnswer: 1, afterSeed: 2},
		{name: "clone", template: true, afterAnswer: 0, afterSeed: 1},
		{name: "clone whose restore failed", template: true, restoreErr: errors.New("no share"), afterAnswer: 0, afterSeed: 0, wantRestoreErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &fakeSetupGuest{template: tc.template, restoreErr: tc.restoreErr}
			pod := &countingPod{}
			answered, restored := setupHooks(g, pod)
			answered()
			if g.proceeded != 1 || pod.prepared != tc.afterAnswer {
				t.Errorf("after the first answer: proceeded %d, prepared %d; want 1, %d", g.proceeded, pod.prepared, tc.afterAnswer)
			}
			if err := restored(context.Background()); (err != nil) != tc.wantRestoreErr {
				t.Errorf("restored: %v", err)
			}
			if pod.prepared != tc.afterSeed {
				t.Errorf("after the seed: prepared %d, want %d", pod.prepared, tc.afterSeed)
			}
		})
	}
}
