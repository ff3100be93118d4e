#!/bin/bash
# Builds Kiln's guest kernel from Debian's linux-source-6.1 and guest.config (next to this script):
#
#   vm/image/kernel/build.sh <cache dir>
#
# prints the directory holding the result: bzImage and release (the kernel release, e.g. 6.1.192-kiln).
# The result is cached under <cache dir>/kernel-<key>, the key a hash of the source package's version, the
# fragment, this script and the compiler and linker versions: an unchanged input does not rebuild (nor touch apt).
# The build is reproducible byte for byte: fixed KBUILD_BUILD_{TIMESTAMP,USER,HOST,VERSION}, no modules.
# Progress goes to stderr; about 12 minutes of wall time on an idle 2-core machine, ~1 GB under <cache dir>.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fragment=$here/guest.config
pkg=linux-source-6.1
[ $# = 1 ] || { echo "usage: $0 <cache dir>" >&2; exit 2; }
cache=$(realpath -m "$1")
mkdir -p "$cache"
exec 9>"$cache/kernel.lock"
flock 9

version() { apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -1; }
ver=$(version)
if [ -z "$ver" ]; then
	apt-get update -qq >&2
	ver=$(version)
fi
[ -n "$ver" ] || { echo "$0: apt has no candidate for $pkg" >&2; exit 1; }

key=$( { echo "$pkg $ver"; cat "$fragment" "$0"; gcc --version | head -1; ld --version | head -1; } | sha256sum | cut -c1-16)
result=$cache/kernel-$key
if [ -f "$result/bzImage" ] && [ -f "$result/release" ]; then
	echo "$result"
	exit 0
fi

# The source: the package's .deb (checked against apt's SHA256), its tarball unpacked once per version.
src=$cache/$pkg-$ver
if [ ! -f "$src/.unpacked" ]; then
	sum=$(apt-cache show --no-all-versions "$pkg" | sed -n 's/^SHA256: //p' | head -1)
	deb=$(ls "$cache/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -1 || true)
	if [ -z "$deb" ] || ! echo "$sum  $deb" | sha256sum -c --status; then
		(cd "$cache" && apt-get download "$pkg=$ver" >&2) || { apt-get update -qq >&2 && (cd "$cache" && apt-get download "$pkg=$ver" >&2); }
		deb=$(ls "$cache/${pkg}_${ver//:/%3a}_"*.deb | head -1)
		echo "$sum  $deb" | sha256sum -c --status || { echo "$0: $deb does not match apt's SHA256" >&2; exit 1; }
	fi
	echo "unpacking $deb" >&2
	rm -rf "$src" && mkdir -p "$src"
	dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$pkg.tar.xz" | tar -xJ -C "$src" --strip-components=1
	touch "$src/.unpacked"
fi

# One object directory, reused: kbuild rebuilds only what a changed option touches.
obj=$cache/kernel-build
export KBUILD_BUILD_TIMESTAMP='2026-01-01 00:00:00 UTC' KBUILD_BUILD_USER=kiln KBUILD_BUILD_HOST=kiln KBUILD_BUILD_VERSION=1
mk() { make -s -C "$src" O="$obj" ARCH=x86_64 "$@"; }
mkdir -p "$obj"
echo "configuring the guest kernel ($pkg $ver, $fragment)" >&2
mk tinyconfig >/dev/null
KCONFIG_CONFIG="$obj/.config" "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment" >/dev/null
mk olddefconfig >/dev/null
# Every line of the fragment must have survived olddefconfig: a missing dependency drops an option silently.
missing=0
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=* | "# CONFIG_"*" is not set")
		grep -qxF "$line" "$obj/.config" || { echo "$0: not in .config: $line" >&2; missing=1; } ;;
	esac
done <"$fragment"
[ $missing = 0 ]
echo "building the guest kernel in $obj" >&2
start=$(date +%s)
mk -j"$(nproc)" bzImage >&2
echo "built the guest kernel in $(($(date +%s) - start)) s" >&2

tmp=$(mktemp -d "$cache/kernel-tmp.XXXXXX")
cp "$obj/arch/x86/boot/bzImage" "$tmp/bzImage"
mk kernelrelease >"$tmp/release"
cp "$obj/.config" "$tmp/config"
rm -rf "$result" && mv "$tmp" "$result"
echo "$result"
