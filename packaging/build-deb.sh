#!/bin/sh
# Build the .deb with Debian's tools: packaging/build-deb.sh [OUTDIR]   (default: dist/)
#
# Copies the tree (tracked and untracked files, not what .gitignore names) into a scratch
# directory, puts packaging/debian/ at its root as debian/, runs dpkg-buildpackage there and
# moves the .deb, .buildinfo and .changes to OUTDIR. Needs debhelper, fakeroot (or root),
# python3-venv, groff-base, and PyPI (or a pip find-links/index) for the dependencies.
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$src/dist}")
version=$(/usr/bin/python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")
packaged=$(dpkg-parsechangelog -l "$src/packaging/debian/changelog" -SVersion)
if [ "$version" != "$packaged" ]; then
	echo "build-deb: pyproject.toml says $version, packaging/debian/changelog $packaged:" \
		"add a changelog entry (dch -v $version -c packaging/debian/changelog)" >&2
	exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/jobqd-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
tree="$work/jobqd-$version"
mkdir "$tree"
if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
	git -C "$src" ls-files -z --cached --others --exclude-standard \
		| (cd "$src" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _) \
		| (cd "$src" && tar --null -T - -cf -) | tar -C "$tree" -xf -
else
	tar -C "$src" --exclude=.venv --exclude=dist --exclude=build -cf - . | tar -C "$tree" -xf -
fi
rm -rf "$tree/debian"
cp -r "$src/packaging/debian" "$tree/debian"

echo "build-deb: building jobqd $version in $tree (pip fetches the dependencies)" >&2
(cd "$tree" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1 || {
	tail -n 40 "$work/build.log" >&2
	echo "build-deb: dpkg-buildpackage failed; the last 40 lines of its log are above" >&2
	exit 1
}
mkdir -p "$out"
for f in "$work"/jobqd_"$version"_*.deb "$work"/jobqd_"$version"_*.buildinfo "$work"/jobqd_"$version"_*.changes; do
	mv "$f" "$out/"
done
ls "$out"/jobqd_"$version"_*.deb
