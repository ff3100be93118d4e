package agent

import (
	"strings"

	"github.com/sirupsen/logrus"
)

// Kernel command line parameters the agent reads.
const (
	// CmdlineDebug turns on debug logging when set without a value or to a
	// true value ("1", "true", "yes", "on").
	CmdlineDebug = "kiln.debug"
	// CmdlineLogLevel sets the log level by name (trace, debug, info, warn,
	// error); it wins over CmdlineDebug.
	CmdlineLogLevel = "kiln.log_level"
)

// KernelCmdline is a parsed kernel command line: parameter name to value.
// A parameter given without "=" has the empty value. When a name repeats the
// last value wins, as for most kernel parameters.
type KernelCmdline map[string]string

// ParseKernelCmdline splits a kernel command line (the content of
// /proc/cmdline) into parameters. Double quotes group spaces into one value,
// as the kernel's own parser does, and are removed. Everything after a lone
// "--" belongs to init's argv and is left out.
func ParseKernelCmdline(s string) KernelCmdline {
	params := KernelCmdline{}
	for _, word := range splitCmdline(s) {
		if word == "--" {
			break
		}
		name, value, _ := strings.Cut(word, "=")
		if name == "" {
			continue
		}
		params[name] = value
	}
	return params
}

// splitCmdline splits on unquoted white space and drops the quotes.
func splitCmdline(s string) []string {
	var (
		words    []string
		word     strings.Builder
		inQuotes bool
		inWord   bool
	)
	for _, r := range s {
		switch {
		case r == '"':
			inQuotes = !inQuotes
			inWord = true
		case !inQuotes && (r == ' ' || r == '\t' || r == '\n'):
			if inWord {
				words = append(words, word.String())
				word.Reset()
				inWord = false
			}
		default:
			word.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, word.String())
	}
	return words
}

// Flag reports whether a boolean parameter is on: present without a value, or
// set to 1, true, yes or on.
func (c KernelCmdline) Flag(name string) bool {
	value, ok := c[name]
	if !ok {
		return false
	}
	switch strings.ToLower(value) {
	case "", "1", "y", "yes", "true", "on":
		return true
	}
	return false
}

// LogLevel is the agent's log level asked for on the command line, Info when
// nothing (or nothing valid) is asked for. The second result says why a
// kiln.log_level value was ignored, so that the caller can log it.
func (c KernelCmdline) LogLevel() (logrus.Level, error) {
	if name, ok := c[CmdlineLogLevel]; ok {
		level, err := logrus.ParseLevel(name)
		if err == nil {
			return level, nil
		}
		fallback := logrus.InfoLevel
		if c.Flag(CmdlineDebug) {
			fallback = logrus.DebugLevel
		}
		return fallback, err
	}
	if c.Flag(CmdlineDebug) {
		return logrus.DebugLevel, nil
	}
	return logrus.InfoLevel, nil
}
