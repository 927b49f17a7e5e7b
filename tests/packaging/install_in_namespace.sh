#!/bin/sh
# Install, remove and purge the .deb for real, with dpkg, inside a private mount namespace
# whose /etc, /var, /opt and /usr are overlays on a tmpfs: the host's files never change,
# and everything the package did vanishes with the namespace. Run as
#   unshare --mount --propagation private sh install_in_namespace.sh SCRATCH_DIR DEB
# It prints what it finds as KEY=VALUE lines for tests/packaging/test_deb.py to check.
set -eu
scratch=$1
deb=$2
mount -t tmpfs jobqd-packaging "$scratch"
for dir in etc var opt usr; do
	mkdir -p "$scratch/$dir/upper" "$scratch/$dir/work"
	mount -t overlay overlay \
		-o "lowerdir=/$dir,upperdir=$scratch/$dir/upper,workdir=$scratch/$dir/work" "/$dir"
	mountpoint -q "/$dir" || { echo "/$dir is not an overlay: stopping" >&2; exit 99; }
done
[ -L /lib ] || { echo "/lib is not a symlink into /usr: stopping" >&2; exit 99; }

report() { printf '%s=%s\n' "$1" "$2"; }
# man-db's trigger would rebuild the whole man index after each dpkg run: not what is tested.
rm -f /var/lib/man-db/auto-update

dpkg --force-confdef --force-confold -i "$deb" >"$scratch/install.log" 2>&1 \
	|| { cat "$scratch/install.log" >&2; exit 1; }
report user "$(getent passwd jobqd | cut -d: -f1,6,7)"
report group "$(getent group jobqd | cut -d: -f1)"
report env_file "$(stat -c '%a %U %G' /etc/jobqd/jobqd.env)"
report etc_dir "$(stat -c '%a %U %G' /etc/jobqd)"
report state_dir "$(stat -c '%a %U %G' /var/lib/jobqd)"
report enabled "$(readlink /etc/systemd/system/multi-user.target.wants/jobqd.service || true)"
report template_enabled "$(ls /etc/systemd/system/multi-user.target.wants/ | grep -c 'jobqd@' || true)"
report version "$(jobqctl --version)"
report check "$(jobqd -c /etc/jobqd.yaml --check 2>&1)"
report bytecode "$(find /opt/jobqd -name '*.pyc' | wc -l)"
report man "$(man -w jobqd.yaml 2>/dev/null || true)"

echo "# a local edit of the conffile" >>/etc/jobqd.yaml
dpkg -r jobqd >"$scratch/remove.log" 2>&1 || { cat "$scratch/remove.log" >&2; exit 1; }
report removed_venv "$(test -e /opt/jobqd && echo no || echo yes)"
report removed_bin "$(test -e /usr/bin/jobqd && echo no || echo yes)"
report kept_conffile "$(tail -n 1 /etc/jobqd.yaml)"
report kept_env_file "$(test -e /etc/jobqd/jobqd.env && echo yes || echo no)"

dpkg -P jobqd >"$scratch/purge.log" 2>&1 || { cat "$scratch/purge.log" >&2; exit 1; }
report purged_conffile "$(test -e /etc/jobqd.yaml && echo no || echo yes)"
report purged_env_file "$(test -e /etc/jobqd && echo no || echo yes)"
report purged_enabled "$(test -e /etc/systemd/system/multi-user.target.wants/jobqd.service && echo no || echo yes)"
report kept_user "$(getent passwd jobqd | cut -d: -f1)"

# Again where systemd-sysusers and systemd-tmpfiles are missing (a container, a chroot): the
# same user and directories come from adduser and install -d. Gone from the overlay only.
userdel jobqd
rm -rf /var/lib/jobqd
rm /usr/bin/systemd-sysusers /usr/bin/systemd-tmpfiles
dpkg -i "$deb" >"$scratch/install2.log" 2>&1 || { cat "$scratch/install2.log" >&2; exit 1; }
report fallback_user "$(getent passwd jobqd | cut -d: -f1,6,7)"
report fallback_state_dir "$(stat -c '%a %U %G' /var/lib/jobqd)"
report fallback_env_file "$(stat -c '%a %U %G' /etc/jobqd/jobqd.env)"
