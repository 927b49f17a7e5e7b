#!/bin/sh
# Build the .rpm with rpmbuild: packaging/build-rpm.sh [OUTDIR]   (default: dist/)
#
# Makes a source tarball of the tree (tracked and untracked files, not what .gitignore
# names), runs `rpmbuild -bb packaging/rpm/jobqd.spec` in a scratch _topdir with the version
# from pyproject.toml, and moves the binary rpm to OUTDIR. Needs rpm (rpmbuild), python3-venv,
# groff, and PyPI (or a pip find-links/index) for the dependencies.
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$src/dist}")
version=$(/usr/bin/python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")
work=$(mktemp -d "${TMPDIR:-/tmp}/jobqd-rpm.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/SOURCES" "$work/stage/jobqd-$version"
if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
	git -C "$src" ls-files -z --cached --others --exclude-standard \
		| (cd "$src" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _) \
		| (cd "$src" && tar --null -T - -cf -) | tar -C "$work/stage/jobqd-$version" -xf -
else
	tar -C "$src" --exclude=.venv --exclude=dist --exclude=build -cf - . \
		| tar -C "$work/stage/jobqd-$version" -xf -
fi
tar -C "$work/stage" -czf "$work/SOURCES/jobqd-$version.tar.gz" "jobqd-$version"

echo "build-rpm: building jobqd $version in $work (pip fetches the dependencies)" >&2
rpmbuild -bb --define "_topdir $work" --define "jobqd_version $version" \
	"$src/packaging/rpm/jobqd.spec" >"$work/build.log" 2>&1 || {
	tail -n 40 "$work/build.log" >&2
	echo "build-rpm: rpmbuild failed; the last 40 lines of its log are above" >&2
	exit 1
}
mkdir -p "$out"
find "$work/RPMS" -name "jobqd-$version-*.rpm" -exec mv {} "$out/" \;
ls "$out"/jobqd-"$version"-*.rpm
