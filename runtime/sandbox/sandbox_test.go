package sandbox

import (
	"strings"
	"testing"
)

func TestVersionMismatch(t *testing.T) {
	tests := []struct{ host, agent, want string }{
		{"v1.2.0", "v1.2.0", ""},
		{"", "v1.2.0", ""},
		{"v1.2.0", "v1.1.0", "guest agent version v1.1.0 differs from host Kiln version v1.2.0"},
		{"v1.2.0", "", "differs"},
	}
	for _, tt := range tests {
		got := VersionMismatch(tt.host, tt.agent)
		if (tt.want == "") != (got == "") || !strings.Contains(got, tt.want) {
			t.Errorf("VersionMismatch(%q, %q) = %q, want %q", tt.host, tt.agent, got, tt.want)
		}
	}
}
