package image

import (
	"strings"
	"testing"
)

func TestKernelDependency(t *testing.T) {
	for _, tc := range []struct{ depends, want, wantErr string }{
		{depends: "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)", want: "linux-image-6.1.0-56-cloud-amd64"},
		{depends: "linux-base, linux-image-6.12.1-cloud-amd64-unsigned (= 6.12.1-1) | linux-image-6.12.1-cloud-amd64 (= 6.12.1-1)",
			want: "linux-image-6.12.1-cloud-amd64-unsigned"},
		{depends: "linux-image-6.1.0-56-cloud-amd64:amd64", want: "linux-image-6.1.0-56-cloud-amd64"},
		{depends: "kmod, linux-base", wantErr: "no linux-image-*"},
		{depends: "", wantErr: "no linux-image-*"},
	} {
		got, err := kernelDependency(tc.depends)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: error %v, want %q", tc.depends, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%q: got %q, %v; want %q", tc.depends, got, err, tc.want)
		}
	}
}

func TestParseControl(t *testing.T) {
	rec := parseControl([]byte(`Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Architecture: amd64
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)
 This package depends on the latest Linux kernel
 Version: not-a-field

Package: second-paragraph
Version: 9
`))
	for k, want := range map[string]string{
		"Package": "linux-image-cloud-amd64", "Version": "6.1.192-2", "Architecture": "amd64",
		"Depends": "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)",
	} {
		if rec[k] != want {
			t.Errorf("%s = %q, want %q", k, rec[k], want)
		}
	}
}

func TestDebName(t *testing.T) {
	p := pkgInfo{Package: "linux-image-x", Version: "1:6.1-2", Arch: "amd64"}
	if got, want := p.debName(), "linux-image-x_1%3a6.1-2_amd64.deb"; got != want {
		t.Errorf("debName = %q, want %q", got, want)
	}
}
