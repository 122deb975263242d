# pxelab diskless root for initramfs-tools (boot=pxelab)		-*- shell-script -*-
#
# Served by pxelab-stack in /nfsroot/overlay.cpio, appended to the distro's own initramfs.
# Mounts the distro's root read-only over NFSv4 (Debian's nfs script speaks only v2/v3, and
# UDP mounts fail on Debian kernels), puts an overlay with a tmpfs upper layer on top and
# leaves it at ${rootmnt} for init to switch to. Writes land in RAM: every boot starts from the
# shared export, two machines never see each other's writes, and nothing persists.
#
# Kernel command line: ip=dhcp (with BOOTIF=01-<mac> to pick the NIC), nfsroot=<ip>:<path>,
# optionally pxelab.events=http://<ip>[:port]/events/<mac> (timeline) and
# pxelab.rwsize=<tmpfs size> (default 50% of RAM).
# Runs in klibc's sh: no busybox in the distro's initramfs.

# nfs_top, nfs_premount, nfs_bottom and the mount_* hooks, so hook scripts still run.
. /scripts/nfs

pxelab_arg()
{
	for x in $(cat /proc/cmdline); do
		case "$x" in
		"$1"=*) echo "${x#*=}"; return 0 ;;
		esac
	done
	return 1
}

# Best effort: tell the stack the root is mounted. The initramfs has no HTTP client, so this
# borrows bash (with its /dev/tcp) and timeout from the mounted root.
pxelab_event()
{
	url=$(pxelab_arg pxelab.events) || return 0
	hostport=${url#http://}
	path=/${hostport#*/}
	hostport=${hostport%%/*}
	host=${hostport%:*}
	port=${hostport#"$host"}
	port=${port#:}
	body="{\"phase\":\"$1\",\"message\":\"$2\"}"
	# Up to three tries of up to 10 s each: the first loads bash and its libraries over NFS, which
	# under TCG on a loaded host can take seconds (a CI run lost this report once, when one
	# try of 3 s was all it had).
	for try in 1 2 3; do
		chroot "${rootmnt}" /usr/bin/timeout 10 /usr/bin/bash -c '
			exec 3<>"/dev/tcp/$0/$1" || exit 1
			printf "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s" "$2" "$0" "${#3}" "$3" >&3
			read -r status <&3
			case "$status" in *" 200 "*) exit 0 ;; *) echo "$status"; exit 2 ;; esac
		' "$host" "${port:-80}" "$path" "$body" 2>/dev/null
		# 2: the stack answered and refused; asking again gets the same answer.
		case $? in 0) return 0 ;; 2) break ;; esac
		sleep 1
	done
	echo "pxelab: could not report '$1' to ${url%%\?*} (continuing)"
}

# klibc's ipconfig sends its first DHCP request before the link is up and then waits 2 s or
# more for an answer: set IFF_UP through sysfs first (no `ip` in this initramfs).
pxelab_links_up()
{
	for dev in /sys/class/net/*; do
		[ "${dev##*/}" = lo ] && continue
		[ -e "$dev/flags" ] || continue
		flags=$(cat "$dev/flags")
		echo $((flags | 1)) > "$dev/flags" 2>/dev/null || true
	done
}

# The booted system runs no DHCP client on the NIC that carries its root (the stack boots it
# with network-config=disabled for cloud-init): renewing, releasing or re-asking for that lease
# flushed the address under the NFS root, and `ifdown -a` at shutdown cut it for good. So the
# system keeps the address ipconfig got here, and gets its resolver from the same lease
# (configure_networking sourced /run/net-<dev>.conf: IPV4DNS0/1, DNSDOMAIN, DOMAINSEARCH).
pxelab_resolv_conf()
{
	conf="${rootmnt}/etc/resolv.conf"
	# A symlink (systemd-resolved, resolvconf) belongs to a resolver that manages the file.
	[ -L "$conf" ] && return 0
	{
		echo "# Written by pxelab's diskless boot from the DHCP lease of ${DEVICE}"
		[ -n "${DNSDOMAIN}" ] && echo "domain ${DNSDOMAIN}"
		search="${DOMAINSEARCH:-${DNSDOMAIN}}"
		[ -n "$search" ] && echo "search $search"
		for ns in "${IPV4DNS0}" "${IPV4DNS1}"; do
			case "$ns" in
			""|0.0.0.0) ;;
			*) echo "nameserver $ns" ;;
			esac
		done
	} > "$conf" || echo "pxelab: cannot write $conf (continuing without a resolver)"
}

pxelab_mount_root()
{
	nfs_top
	/sbin/modprobe af_packet
	wait_for_udev 10
	pxelab_links_up
	configure_networking
	nfs_premount

	[ -n "${NFSROOT}" ] && [ "${NFSROOT}" != auto ] \
		|| panic "pxelab: no nfsroot=<server-ip>:<path> on the kernel command line"
	server=${NFSROOT%%:*}
	export_path=${NFSROOT#*:}
	lower=/run/pxelab/lower
	rw=/run/pxelab/rw
	mkdir -p "$lower" "$rw"

	/sbin/modprobe nfsv4 || panic "pxelab: the initramfs has no nfsv4 module (MODULES=most needed)"
	# The export never changes while machines run from it (a new rootfs gets a new export), so
	# cache attributes for a day and skip close-to-open revalidation: without this every open()
	# sent a GETATTR, 13,000 of the 33,000 round trips of a boot (~6 ms each under TCG).
	tries=0
	until mount -t nfs4 -o "ro,vers=4.1,proto=tcp,hard,timeo=100,nocto,actimeo=86400,addr=${server}" \
			"${server}:${export_path}" "$lower"; do
		tries=$((tries + 1))
		[ "$tries" -lt 60 ] || panic "pxelab: cannot mount ${server}:${export_path} over NFSv4"
		sleep 1
	done

	rwsize=$(pxelab_arg pxelab.rwsize) || rwsize=50%
	mount -t tmpfs -o "mode=0755,size=${rwsize}" pxelab-rw "$rw" \
		|| panic "pxelab: cannot mount the tmpfs for the writable layer"
	mkdir -p "$rw/upper" "$rw/work"
	# overlay is not in a MODULES=most initramfs: load it from the root we just mounted.
	/sbin/modprobe -d "$lower" overlay || /sbin/modprobe overlay \
		|| panic "pxelab: cannot load the overlay module from ${lower}/lib/modules/$(uname -r)"
	mount -t overlay -o "lowerdir=${lower},upperdir=${rw}/upper,workdir=${rw}/work" \
		pxelab-root "${rootmnt}" || panic "pxelab: cannot mount the overlay root"
	pxelab_resolv_conf
	echo "pxelab: root is ${server}:${export_path} (read-only) + tmpfs overlay (${rwsize})"
	pxelab_event nfs-root "root ${server}:${export_path} mounted with a tmpfs overlay"
}

mountroot()
{
	pxelab_mount_root
}
