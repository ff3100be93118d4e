package share

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestMountFlagsOf(t *testing.T) {
	tests := []struct {
		opts      []string
		wantFlags uintptr
	}{
		{nil, 0},
		{[]string{"ro", "nosuid", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w"}, unix.MS_RDONLY | unix.MS_NOSUID},
		{[]string{"ro", "rw"}, 0},
		{[]string{"rbind", "nodev", "index=off"}, unix.MS_BIND | unix.MS_REC | unix.MS_NODEV},
	}
	for _, tt := range tests {
		if flags := mountFlagsOf(tt.opts); flags != tt.wantFlags {
			t.Errorf("mountFlagsOf(%q) = %#x, want %#x", tt.opts, flags, tt.wantFlags)
		}
	}
}

func TestBindAndReadonlyOptions(t *testing.T) {
	tests := []struct {
		typ      string
		opts     []string
		bind, ro bool
	}{
		{"bind", nil, true, false},
		{"none", []string{"rbind", "ro"}, true, true},
		{"", []string{"bind", "ro", "rw"}, true, false},
		{"tmpfs", []string{"ro"}, false, true},
		{"proc", nil, false, false},
	}
	for _, tt := range tests {
		if got := IsBind(tt.typ, tt.opts); got != tt.bind {
			t.Errorf("IsBind(%q, %q) = %v", tt.typ, tt.opts, got)
		}
		if got := isReadonly(tt.opts); got != tt.ro {
			t.Errorf("isReadonly(%q) = %v", tt.opts, got)
		}
	}
}

func TestCheckIDAndSafeName(t *testing.T) {
	for _, id := range []string{"c1", "my_container.2-x", "0abc"} {
		if err := CheckID(id); err != nil {
			t.Errorf("CheckID(%q): %v", id, err)
		}
	}
	for _, id := range []string{"", ".", "..", "a/b", "-x", "../etc", "a b", ".hidden"} {
		if err := CheckID(id); err == nil {
			t.Errorf("CheckID(%q) accepted", id)
		}
	}
	names := map[string]string{"hosts": "hosts", "my file": "my_file", "..": "root", "": "root", "a\nb": "a_b"}
	for in, want := range names {
		if got := safeName(in); got != want {
			t.Errorf("safeName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRecursiveBindOption(t *testing.T) {
	for _, tt := range []struct {
		opts []string
		want bool
	}{
		{nil, false},
		{[]string{"bind"}, false},
		{[]string{"bind", "ro"}, false},
		{[]string{"rbind"}, true},
		{[]string{"ro", "rbind", "nosuid"}, true},
	} {
		if got := isRecursive(tt.opts); got != tt.want {
			t.Errorf("isRecursive(%q) = %v, want %v", tt.opts, got, tt.want)
		}
	}
}
