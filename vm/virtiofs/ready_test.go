package virtiofs

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
)

func TestInAccept(t *testing.T) {
	tests := []struct {
		line string
		want bool
	}{
		{fmt.Sprintf("%d 0x3 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f12", unix.SYS_ACCEPT), true},
		{fmt.Sprintf("%d 0x3 0x0 0x0 0x80000 0x0 0x0 0x7ffd 0x7f12\n", unix.SYS_ACCEPT4), true},
		{fmt.Sprintf("%d 0x4 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f12", unix.SYS_ACCEPT), false},
		{fmt.Sprintf("%d 0x3 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f12", unix.SYS_READ), false},
		{"-1 0x7ffd 0x7f12", false},
		{"running", false},
		{"", false},
	}
	for _, tt := range tests {
		if got := inAccept(tt.line, 3); got != tt.want {
			t.Errorf("inAccept(%q) = %v, want %v", tt.line, got, tt.want)
		}
	}
}
