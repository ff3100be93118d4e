package tail

import "testing"

func TestBufferKeepsTheTail(t *testing.T) {
	tests := []struct {
		writes []string
		want   string
	}{
		{[]string{"abc"}, "abc"},
		{[]string{"abc", "def"}, "cdef"},
		{[]string{"abcdefgh"}, "efgh"},
		{nil, ""},
	}
	for _, tt := range tests {
		b := New(4)
		for _, w := range tt.writes {
			if n, err := b.Write([]byte(w)); n != len(w) || err != nil {
				t.Fatalf("Write(%q) = %d, %v", w, n, err)
			}
		}
		if got := string(b.Bytes()); got != tt.want {
			t.Errorf("writes %q kept %q, want %q", tt.writes, got, tt.want)
		}
	}
}
