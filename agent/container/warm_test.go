package container

import "testing"

// Every type Warm names can be encoded: one that could not would be left cold without a sign.
func TestWarm(t *testing.T) {
	if err := Warm(); err != nil {
		t.Fatal(err)
	}
}
