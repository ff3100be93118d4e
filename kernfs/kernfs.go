// Package kernfs writes the files through which Linux takes settings: sysfs attributes (a memory block's state,
// a CPU's online) and cgroup interface files (memory.max, tasks). Such a file exists or the kernel does not offer
// the setting: it is never created, so that a missing one is an error rather than a stray regular file. The host
// (VM cgroups) and the guest's agent (memory and CPU hot-plug) both use it.
package kernfs

import "os"

// Write writes v to the kernel's file at path, which must exist, in one write.
func Write(path, v string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(v)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
