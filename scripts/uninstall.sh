#!/usr/bin/env bash
# Removes what scripts/install.sh installed: stops and disables the units (when systemd is
# running here), then deletes the binary and the unit files.
#
#   sudo scripts/uninstall.sh
#   DESTDIR=/tmp/stage scripts/uninstall.sh     # a staging tree made by install.sh
#
# Same DESTDIR and PREFIX as install.sh. It never removes data or configuration:
# /var/lib/ferry (spool, archive, cache, catalog: files may still be waiting for S3) and
# /etc/ferry (config and credentials) stay, and so do the ferry user and group and any
# drop-ins in /etc/systemd/system/ferry*.service.d/. It says how to remove them by hand.
set -euo pipefail

say() { printf 'uninstall: %s\n' "$*"; }
die() {
    printf 'uninstall: error: %s\n' "$*" >&2
    exit 1
}

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
case $DESTDIR in "" | /*) ;; *) DESTDIR=$PWD/$DESTDIR ;; esac
case $PREFIX in /*) ;; *) die "PREFIX must be an absolute path (got '$PREFIX')" ;; esac
PREFIX=${PREFIX%/}

# Must match scripts/install.sh.
STATE=/var/lib/ferry
CONFDIR=/etc/ferry
UNITDIR=/etc/systemd/system
UNITS=(ferry.service ferry-router.service)

LIVE=0
if [ -z "$DESTDIR" ]; then
    LIVE=1
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0), or set DESTDIR"
fi

# Stop before removing: `systemctl disable` reads the unit's [Install] section to find
# its symlinks, so the unit file must still be there.
systemd_live=0
if [ "$LIVE" -eq 1 ] && [ -d /run/systemd/system ]; then
    systemd_live=1
    for unit in "${UNITS[@]}"; do
        if [ -e "$UNITDIR/$unit" ]; then
            # A unit that was never enabled or started is not an error here.
            if systemctl disable --now "$unit"; then
                say "stopped and disabled $unit"
            else
                say "could not stop/disable $unit (continuing)"
            fi
        fi
    done
elif [ "$LIVE" -eq 1 ]; then
    say "systemd is not running here: no units to stop"
fi

remove() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        rm -f "$1"
        say "removed    $1"
    else
        say "absent     $1"
    fi
}
remove "$DESTDIR$PREFIX/bin/ferry"
for unit in "${UNITS[@]}"; do
    remove "$DESTDIR$UNITDIR/$unit"
done

if [ "$systemd_live" -eq 1 ]; then
    systemctl daemon-reload
    # Forget a failed state, if any, so `systemctl list-units` does not show a ghost.
    systemctl reset-failed "${UNITS[@]}" 2>/dev/null || true
fi

say "kept       $DESTDIR$STATE (spool, archive, cache, catalog) and $DESTDIR$CONFDIR" \
    "(config, credentials): data and configuration are never removed by this script"
say "to remove them too, after checking that the spool is empty and S3 holds what you need:"
say "           rm -r $DESTDIR$STATE $DESTDIR$CONFDIR"
if [ "$LIVE" -eq 1 ]; then
    say "the user and group ferry stay as well (files may still belong to them): userdel ferry"
fi
