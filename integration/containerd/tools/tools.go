//go:build tools

// Package tools records the tool binaries this module pins; nothing imports it.
package tools

import (
	_ "github.com/opencontainers/runc"
)
