package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"
)

// adoptionLine is the message a task's shim logs once the spare's VM it took runs the task (runtime/task).
const adoptionLine = `msg="the spare shim's warm VM runs the task"`

var tookField = regexp.MustCompile(` took=(\S+)`)

// adoptions reads, from containerd's log at path, how long each spare adoption took (pod.Adopt: the health
// check, the host cgroup, the network's mirror, hot-plug and configuration in the guest), in the log's order.
func adoptions(path string) ([]time.Duration, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ds []time.Duration
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 4*1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, adoptionLine) {
			continue
		}
		m := tookField.FindStringSubmatch(line)
		if m == nil {
			return nil, fmt.Errorf("%s: an adoption line without its duration: %s", path, line)
		}
		d, err := time.ParseDuration(m[1])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		ds = append(ds, d)
	}
	return ds, sc.Err()
}
