package config

import (
	"bytes"
	"fmt"
	"sort"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// Setting is one effective configuration value and where it came from.
type Setting struct {
	// Key is "table.key".
	Key string
	// Value is written as in TOML.
	Value string
	// Source is the configuration file, or "default".
	Source string
}

// Settings lists every key of the effective configuration, sorted, with its origin.
func (c Config) Settings() ([]Setting, error) {
	b, err := toml.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("encode configuration: %w", err)
	}
	var tables map[string]map[string]any
	if err := toml.Unmarshal(b, &tables); err != nil {
		return nil, fmt.Errorf("decode configuration: %w", err)
	}
	var out []Setting
	for table, keys := range tables {
		for key, v := range keys {
			value, err := tomlValue(v)
			if err != nil {
				return nil, err
			}
			name := table + "." + key
			src := "default"
			if c.fromFile[name] {
				src = c.Source
			}
			out = append(out, Setting{Key: name, Value: value, Source: src})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, nil
}

// tomlValue renders one value the way it would be written in the file.
func tomlValue(v any) (string, error) {
	var b bytes.Buffer
	if err := toml.NewEncoder(&b).Encode(map[string]any{"v": v}); err != nil {
		return "", fmt.Errorf("encode %v: %w", v, err)
	}
	return strings.TrimSpace(strings.TrimPrefix(b.String(), "v = ")), nil
}

// fileKeys returns the "table.key" names a file sets.
func fileKeys(data []byte) (map[string]bool, error) {
	var tables map[string]map[string]any
	if err := toml.Unmarshal(data, &tables); err != nil {
		return nil, err
	}
	keys := map[string]bool{}
	for table, kv := range tables {
		for k := range kv {
			keys[table+"."+k] = true
		}
	}
	return keys, nil
}
