package agent

import (
	"maps"
	"testing"

	"github.com/sirupsen/logrus"
)

func TestParseKernelCmdline(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     KernelCmdline
	}{
		{"empty", "", KernelCmdline{}},
		{"values and flags", "console=ttyS0 quiet kiln.debug=1\n",
			KernelCmdline{"console": "ttyS0", "quiet": "", "kiln.debug": "1"}},
		{"quoted value keeps spaces", `a="x y" b=1`, KernelCmdline{"a": "x y", "b": "1"}},
		{"value with equals", "root=PARTUUID=ab=cd", KernelCmdline{"root": "PARTUUID=ab=cd"}},
		{"last repeat wins", "k=1 k=2", KernelCmdline{"k": "2"}},
		{"init args left out", "a=1 -- kiln.debug=1", KernelCmdline{"a": "1"}},
		{"tabs and runs of spaces", "a=1\t\t b=2  ", KernelCmdline{"a": "1", "b": "2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ParseKernelCmdline(tc.in); !maps.Equal(got, tc.want) {
				t.Errorf("ParseKernelCmdline(%q) = %v, want %v", tc.in, got, tc.want)
			}
		})
	}
}

func TestLogLevelFromCmdline(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    logrus.Level
		wantErr bool
	}{
		{"console=ttyS0", logrus.InfoLevel, false},
		{"kiln.debug", logrus.DebugLevel, false},
		{"kiln.debug=1", logrus.DebugLevel, false},
		{"kiln.debug=on", logrus.DebugLevel, false},
		{"kiln.debug=0", logrus.InfoLevel, false},
		{"kiln.log_level=trace", logrus.TraceLevel, false},
		{"kiln.debug=1 kiln.log_level=warn", logrus.WarnLevel, false},
		{"kiln.log_level=loud", logrus.InfoLevel, true},
		{"kiln.debug kiln.log_level=loud", logrus.DebugLevel, true},
	} {
		got, err := ParseKernelCmdline(tc.in).LogLevel()
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("LogLevel(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}
