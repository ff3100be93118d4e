package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// procStat is one process's /proc/<pid>/stat line: its command name and the fields after it (state first, then
// ppid, …).
type procStat struct {
	comm   string
	fields []string
}

// readProcStats reads the stat line of every process, by pid. A process that exits while it is read, or whose
// line cannot be parsed, is left out.
func readProcStats() (map[int]procStat, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	out := map[int]procStat{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// "pid (comm) state ppid …": comm may hold spaces and parentheses, so it ends at the last ')'.
		s := string(b)
		open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || end < open {
			continue
		}
		out[pid] = procStat{comm: s[open+1 : end], fields: strings.Fields(s[end+1:])}
	}
	return out, nil
}
