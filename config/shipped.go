package config

import _ "embed"

// Shipped is the documented configuration file installed as share/kiln/config.toml: every key commented out
// with its default.
//
//go:embed config.toml
var Shipped []byte
