package vm

import (
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// GuestText makes text a guest wrote (an agent's error, a console line) fit for a log line or an error the host
// passes on: control characters (terminal escapes, line breaks) and bytes that are not UTF-8 are escaped as Go
// writes them, and text past max bytes is cut, saying how much was. A guest is untrusted: its words must neither
// forge log lines nor fill logs and containerd's errors with megabytes.
func GuestText(s string, max int) string {
	var b strings.Builder
	cut := 0
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		var piece string
		switch {
		case r == utf8.RuneError && size <= 1:
			piece = fmt.Sprintf(`\x%02x`, s[i])
		case r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0):
			q := strconv.QuoteRune(r)
			piece = q[1 : len(q)-1]
		default:
			piece = s[i : i+size]
		}
		if b.Len()+len(piece) > max {
			cut = len(s) - i
			break
		}
		b.WriteString(piece)
		i += size
	}
	if cut > 0 {
		fmt.Fprintf(&b, "... (%d more bytes)", cut)
	}
	return b.String()
}
