package image

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Fixed identifiers of the agent image's file system, so that one binary always makes the same image (a new image
// makes new VM templates).
const (
	agentImageUUID     = "6b696c6e-6167-656e-7469-6d6167650001"
	agentImageHashSeed = "6b696c6e-6167-656e-7469-6d6167650002"
)

// agentImageAlign is the agent image's size granularity: the guest kernel maps a virtio-pmem device as memory in
// 2 MiB sub-sections.
const agentImageAlign = 2 << 20

// BuildAgentImage returns a read-only ext2 file system holding agent, the agent's binary, as
// agentv1.AgentImageBinary: the agent image, which template guests mount with DAX from a virtio-pmem device (see
// agentv1.CmdlineAgentImage). ext2 is the smallest of the guest kernel's file systems with DAX. mtime is every
// time stamp in it (0 or SOURCE_DATE_EPOCH), so that the same binary makes the same bytes. It runs e2fsprogs'
// mke2fs and debugfs.
func BuildAgentImage(ctx context.Context, agent []byte, mtime int64) ([]byte, error) {
	if len(agent) == 0 {
		return nil, fmt.Errorf("build agent image: empty agent binary")
	}
	work, err := os.MkdirTemp("", "kiln-agent-image-")
	if err != nil {
		return nil, fmt.Errorf("build agent image: %w", err)
	}
	defer os.RemoveAll(work)
	src := filepath.Join(work, "root")
	if err := os.Mkdir(src, 0o755); err != nil {
		return nil, fmt.Errorf("build agent image: %w", err)
	}
	bin := filepath.Join(src, agentv1.AgentImageBinary)
	if err := os.WriteFile(bin, agent, 0o755); err != nil {
		return nil, fmt.Errorf("build agent image: %w", err)
	}
	// The modes mke2fs copies into the image, whatever the builder's umask took from them.
	for _, p := range []string{src, bin} {
		if err := os.Chmod(p, 0o755); err != nil {
			return nil, fmt.Errorf("build agent image: %w", err)
		}
	}
	img := filepath.Join(work, "agent.img")
	// A file system's own time stamps come from E2FSPROGS_FAKE_TIME, which 0 does not set.
	fake := max(mtime, 1)
	env := append(os.Environ(), "E2FSPROGS_FAKE_TIME="+strconv.FormatInt(fake, 10))
	size := (int64(len(agent)) + 1<<20 + agentImageAlign - 1) / agentImageAlign * agentImageAlign
	stamp := "@" + strconv.FormatInt(mtime, 10)
	cmds := filepath.Join(work, "times")
	var times bytes.Buffer
	for _, field := range []string{"atime", "ctime", "mtime"} {
		fmt.Fprintf(&times, "set_inode_field %s %s %s\n", agentv1.AgentImageBinary, field, stamp)
	}
	if err := os.WriteFile(cmds, times.Bytes(), 0o644); err != nil {
		return nil, fmt.Errorf("build agent image: %w", err)
	}
	steps := [][]string{
		// 4 KiB blocks (DAX maps whole pages), no reserved blocks, room for a handful of inodes, and none of the
		// features that would make a read-only image larger.
		{"mke2fs", "-q", "-F", "-t", "ext2", "-b", "4096", "-m", "0", "-I", "128", "-N", "16",
			"-O", "^resize_inode,^dir_index", "-U", agentImageUUID,
			"-E", "hash_seed=" + agentImageHashSeed + ",root_owner=0:0",
			"-d", src, img, strconv.FormatInt(size/1024, 10) + "k"},
		// mke2fs -d copies the source file's times, of which only the modification time can be set beforehand.
		{"debugfs", "-w", "-f", cmds, img},
	}
	for _, args := range steps {
		cmd := exec.CommandContext(ctx, args[0], args[1:]...)
		cmd.Env = env
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("build agent image: %s: %w\n%s(install e2fsprogs, which `make deps` does)", args[0], err, out.String())
		}
	}
	data, err := os.ReadFile(img)
	if err != nil {
		return nil, fmt.Errorf("build agent image: %w", err)
	}
	return data, nil
}
