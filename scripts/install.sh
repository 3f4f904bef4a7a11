#!/usr/bin/env bash
# Installs ferry as a systemd service on this machine, or into a staging tree.
#
#   sudo scripts/install.sh                              # build, install, enable, start
#   sudo FERRY_BIN=target/release/ferry scripts/install.sh   # install a binary built earlier
#   DESTDIR=/tmp/stage scripts/install.sh                # stage only (packaging, tests)
#
# Environment:
#   DESTDIR    staging root prefixed to every path ("" = this machine). With a DESTDIR
#              nothing outside it is touched: no user, no chown, no systemctl.
#   PREFIX     where the binary goes: $PREFIX/bin/ferry (default /usr/local). The units'
#              ExecStart= is rewritten to match.
#   FERRY_BIN  a prebuilt ferry binary; without it, `cargo build --release --locked` runs.
#
# What goes where (see systemd/README-install.md):
#   $PREFIX/bin/ferry                     the binary (0755)
#   /etc/ferry/ferry.toml                 config/ferry.toml, paths rewritten to /var/lib/ferry
#   /etc/ferry/router.toml                config/router.toml, if the repository has one
#   /etc/ferry/ferry.env                  credentials template (0640 root:ferry), only if missing
#   /etc/systemd/system/ferry.service     the units: /etc/systemd/system because this is a
#   /etc/systemd/system/ferry-router.service   local install, not a distribution package
#   /var/lib/ferry                        catalog (0750 ferry:ferry)
#   /var/lib/ferry/spool                  2775 ferry:ferry: the web app writes here via group ferry
#   /var/lib/ferry/archive, cache         0750 ferry:ferry
#
# Idempotent: a second run changes nothing (files are only written when their content or
# mode differs), and an existing config is never overwritten: if ours differs, it is put
# beside it as ferry.toml.new.
set -euo pipefail

# Predictable modes for anything created implicitly (parent directories, temp files).
umask 022

say() { printf 'install: %s\n' "$*"; }
warn() { printf 'install: WARNING: %s\n' "$*" >&2; }
die() {
    printf 'install: error: %s\n' "$*" >&2
    exit 1
}

# Paths given relative to the caller's directory must survive the cd below.
abspath() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
FERRY_BIN=${FERRY_BIN:-}
[ -n "$DESTDIR" ] && DESTDIR=$(abspath "$DESTDIR")
[ -n "$FERRY_BIN" ] && FERRY_BIN=$(abspath "$FERRY_BIN")
# PREFIX ends up in ExecStart= (via sed): keep it an absolute path of plain characters.
[[ $PREFIX =~ ^/[A-Za-z0-9._/+-]*$ ]] || die "PREFIX must be an absolute path of [A-Za-z0-9._/+-] (got '$PREFIX')"
PREFIX=${PREFIX%/}

# The repository root: config/ and systemd/ are read from there.
cd "$(dirname "$0")/.."

# These paths are also written in systemd/ferry.service (ReadWritePaths=, EnvironmentFile=,
# --config); change them together.
STATE=/var/lib/ferry
CONFDIR=/etc/ferry
UNITDIR=/etc/systemd/system
USER_NAME=ferry

# With no DESTDIR we are installing for real: users, owners and systemd need root.
LIVE=0
if [ -z "$DESTDIR" ]; then
    LIVE=1
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0), or set DESTDIR to stage into a directory"
fi

# Rendered files (config, units) are prepared in WORK; a half-copied destination file
# (DEST.install-tmp.PID) is removed too if the script dies.
WORK=$(mktemp -d)
TMPFILES=()
cleanup() {
    rm -rf "$WORK"
    [ ${#TMPFILES[@]} -eq 0 ] || rm -f "${TMPFILES[@]}"
}
trap cleanup EXIT

# Whether DEST already has mode MODE (octal, e.g. 2775) and, when live, owner OWNER (u:g).
has_mode_owner() {
    local dest=$1 mode=$2 owner=$3
    [ $((8#$(stat -c '%a' "$dest"))) -eq $((8#$mode)) ] || return 1
    [ "$LIVE" -eq 0 ] || [ "$(stat -c '%U:%G' "$dest")" = "$owner" ] || return 1
}

# install_file SRC DEST MODE OWNER: writes DEST only if its content or mode (or owner,
# when live) differs, so re-runs leave files, mtimes included, alone. The copy goes to a
# temp name beside DEST and is renamed over it: a running ferry keeps its old binary and
# nobody ever sees a half-written file. Sets WROTE=1 if it wrote, 0 if DEST was already
# right. (It reports through WROTE, not its exit status, because bash ignores `set -e`
# inside a function called as `f && ...`, and a failed cp must stop the install.)
WROTE=0
install_file() {
    local src=$1 dest=$2 mode=$3 owner=$4 tmp
    WROTE=0
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && has_mode_owner "$dest" "$mode" "$owner"; then
        say "unchanged  $dest"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    tmp="$dest.install-tmp.$$"
    TMPFILES+=("$tmp")
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    [ "$LIVE" -eq 0 ] || chown "$owner" "$tmp"
    mv -f "$tmp" "$dest"
    say "installed  $dest (mode $mode)"
    WROTE=1
}

# install_config SRC DEST MODE OWNER: a config file the admin edits. Installed if missing;
# if present and different, left alone and ours goes to DEST.new (rewritten only when it
# changes), with a notice on every run until the two are reconciled.
install_config() {
    local src=$1 dest=$2 mode=$3 owner=$4
    if [ ! -e "$dest" ]; then
        install_file "$src" "$dest" "$mode" "$owner"
    elif cmp -s "$src" "$dest"; then
        say "unchanged  $dest"
    else
        install_file "$src" "$dest.new" "$mode" "$owner"
        say "kept       $dest: it differs from this version's; the new one is $dest.new"
        say "           (compare: diff -u $dest $dest.new)"
    fi
}

# install_dir DIR MODE OWNER: creates DIR with its mode and owner. An existing directory is
# not changed (the admin may have moved it to another disk or chosen other modes), but a
# difference is reported because ferry may not be able to write there.
install_dir() {
    local dir=$1 mode=$2 owner=$3 expected=$2
    [ "$LIVE" -eq 0 ] || expected="$mode $owner"
    if [ -d "$dir" ]; then
        if has_mode_owner "$dir" "$mode" "$owner"; then
            say "unchanged  $dir/"
        else
            warn "$dir exists as $(stat -c '%a %U:%G' "$dir"), expected $expected; left as is"
        fi
        return 0
    fi
    mkdir -p "$(dirname "$dir")"
    mkdir "$dir"
    # chown before chmod: chown clears the setgid bit on some systems.
    [ "$LIVE" -eq 0 ] || chown "$owner" "$dir"
    chmod "$mode" "$dir"
    say "created    $dir/ (mode $mode)"
}

# --- 1. The binary -----------------------------------------------------------------------
if [ -z "$FERRY_BIN" ]; then
    command -v cargo >/dev/null ||
        die "cargo not found. Build as yourself first (cargo build --release --locked), then: sudo FERRY_BIN=target/release/ferry $0"
    say "building: cargo build --release --locked"
    cargo build --release --locked
    FERRY_BIN=${CARGO_TARGET_DIR:-target}/release/ferry
    FERRY_BIN=$(abspath "$FERRY_BIN")
fi
[ -x "$FERRY_BIN" ] || die "FERRY_BIN=$FERRY_BIN is not an executable file"
# Catches a binary for another architecture or a broken build before it is installed.
"$FERRY_BIN" --version >/dev/null || die "$FERRY_BIN --version failed"

# --- 2. User and group ---------------------------------------------------------------------
if [ "$LIVE" -eq 1 ]; then
    if ! getent group "$USER_NAME" >/dev/null; then
        groupadd --system "$USER_NAME"
        say "created    group $USER_NAME"
    fi
    if ! getent passwd "$USER_NAME" >/dev/null; then
        nologin=/usr/sbin/nologin
        [ -x "$nologin" ] || nologin=/sbin/nologin
        # Home = the state directory, so ~/.aws/config (if an admin puts one there) is
        # found by the AWS SDK; ProtectHome= in the unit hides /home and /root anyway.
        useradd --system --gid "$USER_NAME" --home-dir "$STATE" --no-create-home \
            --shell "$nologin" --comment "ferry daemon" "$USER_NAME"
        say "created    user $USER_NAME"
    fi
else
    say "DESTDIR is set: not creating user/group $USER_NAME and not changing owners" \
        "(staged files belong to $(id -un)); the real install does both"
fi

# --- 3. Files ---------------------------------------------------------------------------
install_file "$FERRY_BIN" "$DESTDIR$PREFIX/bin/ferry" 0755 root:root
changed_bin=$WROTE

# State directories. The spool is group-writable and setgid so the web application (a
# member of group ferry) can drop files there and they stay readable by ferry; the rest
# is private to ferry (UMask=0027 in the unit keeps new files that way).
install_dir "$DESTDIR$STATE" 0750 "$USER_NAME:$USER_NAME"
install_dir "$DESTDIR$STATE/spool" 2775 "$USER_NAME:$USER_NAME"
install_dir "$DESTDIR$STATE/archive" 0750 "$USER_NAME:$USER_NAME"
install_dir "$DESTDIR$STATE/cache" 0750 "$USER_NAME:$USER_NAME"

install_dir "$DESTDIR$CONFDIR" 0755 root:root

# config/ferry.toml uses paths relative to the working directory (var/spool, ...); the
# service runs from /, so every `dir = "var/..."` / `path = "var/..."` becomes absolute
# under /var/lib/ferry, matching ReadWritePaths= in the unit.
conf=$WORK/ferry.toml
{
    echo "# Installed by scripts/install.sh from config/ferry.toml, with paths under $STATE."
    echo "# Edit freely: re-installing never overwrites this file (it writes ferry.toml.new)."
    echo "# After a change: systemctl restart ferry.service"
    echo
    sed -E 's#^([[:space:]]*(dir|path)[[:space:]]*=[[:space:]]*")var/#\1'"$STATE"'/#' config/ferry.toml
} >"$conf"
# A service writing into /var/spool or /ferry.db by accident would be worse than no
# install: insist that each path the unit allows was set.
for want in "dir = \"$STATE/spool\"" "dir = \"$STATE/archive\"" "dir = \"$STATE/cache\"" \
    "path = \"$STATE/ferry.db\""; do
    grep -qF "$want" "$conf" ||
        die "config/ferry.toml no longer yields '$want' after rewriting; update scripts/install.sh"
done
install_config "$conf" "$DESTDIR$CONFDIR/ferry.toml" 0644 root:root

# The router's config is optional (it is only needed where ferry-router.service runs).
if [ -f config/router.toml ]; then
    rconf=$WORK/router.toml
    {
        echo "# Installed by scripts/install.sh from config/router.toml."
        echo "# Edit freely: re-installing never overwrites this file (it writes router.toml.new)."
        echo "# After a change: systemctl restart ferry-router.service"
        echo
        sed -E 's#^([[:space:]]*(dir|path)[[:space:]]*=[[:space:]]*")var/#\1'"$STATE"'/#' config/router.toml
    } >"$rconf"
    install_config "$rconf" "$DESTDIR$CONFDIR/router.toml" 0644 root:root
else
    say "skipped    $CONFDIR/router.toml: config/router.toml is not in this checkout" \
        "(ferry-router.service needs it; ferry.service does not)"
fi

# Credentials: only ever created, never replaced (it holds secrets the admin filled in).
envfile="$DESTDIR$CONFDIR/ferry.env"
if [ -e "$envfile" ]; then
    say "kept       $envfile"
    if [ "$LIVE" -eq 1 ] && [ $((8#$(stat -c '%a' "$envfile") & 8#007)) -ne 0 ]; then
        warn "$envfile is readable by everyone; it holds credentials: chmod 0640 $envfile"
    fi
else
    install_file systemd/ferry.env.example "$envfile" 0640 "root:$USER_NAME"
fi

# Units, with ExecStart= pointing at $PREFIX/bin/ferry.
for unit in ferry.service ferry-router.service; do
    u=$WORK/$unit
    sed "s#^ExecStart=/usr/local/bin/ferry #ExecStart=$PREFIX/bin/ferry #" "systemd/$unit" >"$u"
    install_file "$u" "$DESTDIR$UNITDIR/$unit" 0644 root:root
    case $unit in
    ferry.service) changed_unit=$WROTE ;;
    ferry-router.service) changed_router=$WROTE ;;
    esac
done

# --- 4. systemd ------------------------------------------------------------------------
if [ "$LIVE" -eq 1 ] && [ -d /run/systemd/system ]; then
    was_active=0
    systemctl is-active --quiet ferry.service && was_active=1
    systemctl daemon-reload
    systemctl enable --now ferry.service
    say "ferry.service is enabled and started: systemctl status ferry.service"
    if [ "$was_active" -eq 1 ] && [ $((changed_bin + changed_unit)) -gt 0 ]; then
        say "it was already running: restart it to use what was just installed:" \
            "systemctl restart ferry.service"
    fi
    # The router is only wanted on the machine in front of the nodes: never enabled here.
    if systemctl is-enabled --quiet ferry-router.service; then
        if systemctl is-active --quiet ferry-router.service &&
            [ $((changed_bin + changed_router)) -gt 0 ]; then
            say "ferry-router.service is running: restart it to use what was just installed:" \
                "systemctl restart ferry-router.service"
        fi
    else
        say "ferry-router.service is installed but not enabled; on the routing machine:" \
            "systemctl enable --now ferry-router.service"
    fi
else
    if [ "$LIVE" -eq 1 ]; then
        say "systemd is not running here (no /run/systemd/system): nothing was started."
    else
        say "DESTDIR is set: systemd was not touched."
    fi
    say "on the target machine, start ferry with:" \
        "systemctl daemon-reload && systemctl enable --now ferry.service"
fi
say "next: set [s3] in $CONFDIR/ferry.toml and the credentials in $CONFDIR/ferry.env," \
    "add the web application's user to group $USER_NAME (usermod -aG $USER_NAME www-data)," \
    "then: systemctl restart ferry.service"
