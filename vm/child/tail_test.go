package child

import (
	"reflect"
	"strings"
	"testing"
)

func TestTailBufferKeepsTheTail(t *testing.T) {
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
		b := newTailBuffer(4)
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

func TestLineWriterSplitsLines(t *testing.T) {
	long := strings.Repeat("x", maxLine+10)
	tests := []struct {
		name   string
		writes []string
		want   []string
	}{
		{"one line", []string{"a\n"}, []string{"a"}},
		{"several in one write", []string{"a\nb\n\nc\n"}, []string{"a", "b", "", "c"}},
		{"line across writes", []string{"ab", "c\nd", "e\n"}, []string{"abc", "de"}},
		{"last line without newline", []string{"a\nb"}, []string{"a", "b"}},
		{"overlong line in pieces", []string{long + "\n"}, []string{long[:maxLine], long[maxLine:]}},
		{"nothing", nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			w := &lineWriter{emit: func(l string) { got = append(got, l) }}
			for _, s := range tt.writes {
				if n, err := w.Write([]byte(s)); n != len(s) || err != nil {
					t.Fatalf("Write(%q) = %d, %v", s, n, err)
				}
			}
			w.flush()
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("lines %q, want %q", got, tt.want)
			}
		})
	}
}
