package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// Load reads the configuration. A non-empty path must exist. An empty path means the file PathEnv names if it
// is set (it must exist), else DefaultPath if it exists, else the built-in defaults.
func Load(path string) (Config, error) { return load(path, os.Getenv(PathEnv), DefaultPath) }

func load(path, envPath, systemPath string) (Config, error) {
	if path == "" && envPath != "" {
		if !filepath.IsAbs(envPath) {
			return Config{}, fmt.Errorf("%s=%q: want an absolute path to Kiln's configuration file", PathEnv, envPath)
		}
		path = envPath
	}
	if path == "" {
		if _, err := os.Stat(systemPath); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				cfg := Default()
				return cfg, cfg.Validate()
			}
			return Config{}, fmt.Errorf("config %s: %w", systemPath, err)
		}
		path = systemPath
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read config %s: %w", path, err)
	}
	cfg, keys, err := parse(data)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	cfg.Source, cfg.fromFile = path, keys
	if err := cfg.Validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	cfg.validatedAssets = Assets{Kernel: cfg.Hypervisor.Kernel, Initrd: cfg.Hypervisor.Initrd}
	return cfg, nil
}

// parse decodes TOML over the defaults, and returns the "table.key" names the file sets (fileKeys). Unknown keys,
// keys in another case than Kiln's and wrong types are errors naming the key.
func parse(data []byte) (Config, map[string]bool, error) {
	cfg := Default()
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			keys := make([]string, 0, len(strict.Errors))
			for _, e := range strict.Errors {
				keys = append(keys, joinKey(e.Key()))
			}
			return Config{}, nil, fmt.Errorf("unknown key(s) %v: remove them or check their spelling", keys)
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return Config{}, nil, fmt.Errorf("line %d column %d, key %s: %s", row, col, joinKey(de.Key()), de.Error())
		}
		return Config{}, nil, err
	}
	keys, err := fileKeys(data)
	if err != nil {
		return Config{}, nil, err
	}
	if err := exactKeys(keys); err != nil {
		return Config{}, nil, err
	}
	return cfg, keys, nil
}

// exactKeys fails for a table or key that names one of Config's only in another case: the decoder takes
// "VCPUs" for "vcpus", and TOML's keys are case-sensitive, so another reader (and `kiln config show`, which
// reports a key the file sets) would not. keys are the file's (fileKeys); Config's are those Settings lists.
func exactKeys(keys map[string]bool) error {
	settings, err := Default().Settings()
	if err != nil {
		return err
	}
	known, tables := map[string]bool{}, map[string]bool{}
	for _, st := range settings {
		known[st.Key] = true
		table, _, _ := strings.Cut(st.Key, ".")
		tables[table] = true
	}
	seen := map[string]bool{}
	var bad []string
	for k := range keys {
		if known[k] {
			continue
		}
		if table, _, _ := strings.Cut(k, "."); !tables[table] {
			k = table
		}
		if !seen[k] {
			seen[k] = true
			bad = append(bad, k)
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("key(s) %v: Kiln's tables and keys are written in lower case, as config.toml shows them", bad)
	}
	return nil
}

func joinKey(k toml.Key) string {
	s := ""
	for i, p := range k {
		if i > 0 {
			s += "."
		}
		s += p
	}
	return s
}
