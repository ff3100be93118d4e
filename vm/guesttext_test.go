package vm

import "testing"

func TestGuestText(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		max      int
		want     string
	}{
		{"plain", "container c1: no such process", 100, "container c1: no such process"},
		{"unicode kept", "fichier déjà là", 100, "fichier déjà là"},
		{"a forged log line", "ok\ntime=x level=error msg=forged", 100, `ok\ntime=x level=error msg=forged`},
		{"terminal escapes", "\x1b[2J\x1b]0;title\a", 100, `\x1b[2J\x1b]0;title\a`},
		{"not UTF-8", "a\xff\xfeb", 100, `a\xff\xfeb`},
		{"C1 controls", "a\u009bb", 100, `a\u009bb`},
		{"cut", "0123456789abcdef", 10, "0123456789... (6 more bytes)"},
		{"an escape is not split", "abcdefgh\n", 9, `abcdefgh... (1 more bytes)`},
		{"empty", "", 10, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := GuestText(tc.in, tc.max); got != tc.want {
				t.Errorf("GuestText(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
			}
		})
	}
}
