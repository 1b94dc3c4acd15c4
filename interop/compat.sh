#!/bin/bash
# Where Pi users are: Debian chroots (debootstrap; arm ones under qemu-user)
# that run the demo, the tests and the README's Raspberry Pi steps, then print
# a table. Run as root, from anywhere; not part of CI (it fetches Debian
# packages, and pip and npm packages for the requirements).
#
#   interop/compat.sh                       every row
#   interop/compat.sh sid-amd64 trixie-amd64   some rows
#   QX_TESTS=none interop/compat.sh         no test suite (demo and checks only)
#   QX_TESTS="test_worker.TestCrypt" ...    these tests instead of all of them
#   QX_JOBS=300                             jobs the arm rows take from the host's master.py
#
# The chroots stay in $QX_COMPAT_DIR (default /var/tmp/qx-compat, outside the
# project) and are reused: a second run only refreshes the project's files.
# Network: apt, pip and npm fetch packages; the worker, the master and the
# tests run on loopback only (the demo and loopback .env files: no LSD, DHT
# or trackers), or inside network namespaces the tests make themselves.
#
# Rows:
#   trixie-amd64    Python 3.13 (Debian's), Node 20: demo, test suite
#   sid-amd64       Python 3.14 (and 3.15 where sid has it), Node 24: demo, test suite
#   bookworm-arm64  Raspberry Pi OS 64-bit: the README's steps word for word
#                   (PyPI wheels), the demo, 300 jobs from a master.py on the host
#   bookworm-armhf  Raspberry Pi OS 32-bit: the README's no-compiler steps
#                   (Debian's cryptography and PyNaCl), the same
#   bookworm-amd64  the README's 64-bit steps, then its unit under a real
#                   systemd 252 (systemd-nspawn --boot, the host's network):
#                   task.py with a pip dependency, task.js with an npm one,
#                   a task that SIGTERMs the worker (Restart=always), and
#                   `systemctl stop` during a job (KillMode=mixed)
# and `systemd-analyze verify` and `security` of the README's unit.
set -uo pipefail

HERE=${QX_PROJECT:-$(cd "$(dirname "$0")/.." && pwd)}
DIR=${QX_COMPAT_DIR:-/var/tmp/qx-compat}
MIRROR=${QX_MIRROR:-http://deb.debian.org/debian}
TESTS=${QX_TESTS:-all}
JOBS=${QX_JOBS:-300}
HOST_PYTHON=${QX_HOST_PYTHON:-$( [ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3 )}
ALL_ROWS="trixie-amd64 sid-amd64 bookworm-arm64 bookworm-armhf bookworm-amd64"
ROWS=${*:-$ALL_ROWS}
CA=/etc/ssl/certs/ca-certificates.crt
RESULTS=$(mktemp -d /tmp/qx-compat.XXXXXX)
MOUNTED=()

say() { printf '%s compat: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "$*"; exit 2; }

[ "$(id -u)" = 0 ] || die "run me as root (debootstrap, chroot, mount)"
host_packages=()  # what the host needs: Debian's packages, installed once
command -v debootstrap >/dev/null || host_packages+=(debootstrap)
command -v update-binfmts >/dev/null || host_packages+=(binfmt-support)
[ -e /usr/bin/qemu-aarch64-static ] || host_packages+=(qemu-user-static)
command -v systemd-nspawn >/dev/null || host_packages+=(systemd-container)
command -v systemd-analyze >/dev/null || host_packages+=(systemd)
if [ ${#host_packages[@]} -gt 0 ]; then
    say "apt-get install ${host_packages[*]} (on the host)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${host_packages[@]}" > /dev/null \
        || die "cannot install ${host_packages[*]}: apt-get update, then again"
fi
mkdir -p "$DIR"

unmount_all() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount -R -l "${MOUNTED[i]}" 2>/dev/null; done
    MOUNTED=()
}
trap 'declare -F halt_box > /dev/null && halt_box; unmount_all; rm -rf "$RESULTS"' EXIT

# --- chroots -----------------------------------------------------------------

packages_of() {  # the Debian packages a row needs
    case $1 in
        trixie-amd64) echo python3 python3-venv nodejs npm ;;
        sid-amd64) echo python3 python3-venv python3.15 python3.15-venv nodejs npm ;;
        bookworm-arm64 | bookworm-armhf) echo python3 ;;  # the README's steps install the rest
        bookworm-amd64) echo python3 systemd systemd-sysv dbus nodejs npm ;;
    esac
}

binfmt_for() {  # make the host run $arch binaries (qemu-user); false where it cannot
    local arch=$1 name
    case $arch in amd64) return 0 ;; arm64) name=qemu-aarch64 ;; armhf) name=qemu-arm ;; esac
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || return 1
    [ -e "/proc/sys/fs/binfmt_misc/$name" ] || update-binfmts --enable "$name" >/dev/null 2>&1 || return 1
    [ -e "/proc/sys/fs/binfmt_misc/$name" ]
}

enter() {  # mount what a chroot needs: /proc, /dev, /sys, the host's DNS and CA bundle
    local root=$1
    mount -t proc proc "$root/proc" && MOUNTED+=("$root/proc")
    mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev" && MOUNTED+=("$root/dev")
    mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys" && MOUNTED+=("$root/sys")
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null
    [ -f "$CA" ] && cp "$CA" "$root/etc/qx-host-ca.crt"
}

in_root() {  # run a shell command in a chroot, a clean environment with the host's CAs for pip and npm
    local root=$1; shift
    chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        LANG=C.UTF-8 PIP_CERT=/etc/qx-host-ca.crt NODE_EXTRA_CA_CERTS=/etc/qx-host-ca.crt \
        PIP_DISABLE_PIP_VERSION_CHECK=1 npm_config_cafile=/etc/qx-host-ca.crt \
        /bin/bash -c "$*"
}

bootstrap() {  # make (once) and enter the chroot of a row; packages added later are installed
    local row=$1 suite=${1%-*} arch=${1#*-} root=$DIR/$1 packages
    binfmt_for "$arch" || { record "$row" skip "no binfmt_misc for $arch (qemu-user-static, binfmt-support)"; return 1; }
    if [ ! -e "$root/.qx-debootstrap" ]; then
        say "$row: debootstrap $suite $arch into $root"
        rm -rf "$root"
        local foreign=(); [ "$arch" = amd64 ] || foreign=(--foreign)
        debootstrap --variant=minbase --arch="$arch" "${foreign[@]}" "$suite" "$root" "$MIRROR" \
            > "$DIR/$row.debootstrap.log" 2>&1 || die "$row: debootstrap failed, see $DIR/$row.debootstrap.log"
        if [ "$arch" != amd64 ]; then
            chroot "$root" /debootstrap/debootstrap --second-stage >> "$DIR/$row.debootstrap.log" 2>&1 \
                || die "$row: second stage failed, see $DIR/$row.debootstrap.log"
        fi
        # sid's Release can be past its Valid-Until on a mirror snapshot
        echo 'Acquire::Check-Valid-Until "false";' > "$root/etc/apt/apt.conf.d/99qx-compat"
        echo "deb $MIRROR $suite main" > "$root/etc/apt/sources.list"
        touch "$root/.qx-debootstrap"
    fi
    enter "$root"
    packages="ca-certificates iproute2 procps $(packages_of "$row")"
    if [ "$(cat "$root/.qx-packages" 2>/dev/null)" != "$packages" ]; then
        say "$row: apt-get install $packages"
        in_root "$root" "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q \
            --no-install-recommends $packages" > "$DIR/$row.apt.log" 2>&1 \
            || die "$row: apt-get failed, see $DIR/$row.apt.log"
        echo "$packages" > "$root/.qx-packages"
    fi
}

copy_project() {  # the project's files as they are in the work tree, to /opt/qx-src
    local root=$1 dest=$1/opt/qx-src
    find "$dest" -mindepth 1 -maxdepth 1 ! -name interop -exec rm -rf {} + 2>/dev/null
    find "$dest/interop" -mindepth 1 -maxdepth 1 ! -name node_modules -exec rm -rf {} + 2>/dev/null
    mkdir -p "$dest"
    git -C "$HERE" ls-files -z --cached --others --exclude-standard | grep -zv '^interop/node_modules' \
        | (cd "$HERE" && tar --null -T - -cf -) | tar -xf - -C "$dest"
}

# --- what runs in a row -------------------------------------------------------

record() {  # record ROW FIELD VALUE: one cell of the table
    printf '%s' "$3" > "$RESULTS/$1.$2"
}

cell() { cat "$RESULTS/$1.$2" 2>/dev/null || printf -- '-'; }

venv_for() {  # venv_for ROOT PYTHON: /opt/venv-X.Y with requirements.txt, made once per requirements
    local root=$1 py=$2 venv=/opt/venv-$2 stamp
    stamp=$(sha256sum "$HERE/requirements.txt" | cut -c1-16)
    if [ "$(cat "$root$venv/.qx-stamp" 2>/dev/null)" != "$stamp" ]; then
        say "${root##*/}: python$py venv, pip install -r requirements.txt"
        in_root "$root" "rm -rf $venv && python$py -m venv $venv && $venv/bin/pip install -q -r /opt/qx-src/requirements.txt" \
            > "$DIR/${root##*/}.pip-$py.log" 2>&1 || return 1
        echo "$stamp" > "$root$venv/.qx-stamp"
    fi
}

npm_for() {  # npm ci in the project's interop/, once per package-lock.json
    local root=$1 stamp
    stamp=$(sha256sum "$HERE/interop/package-lock.json" | cut -c1-16)
    if [ "$(cat "$root/opt/qx-src/interop/node_modules/.qx-stamp" 2>/dev/null)" != "$stamp" ]; then
        say "${root##*/}: npm ci in interop/"
        in_root "$root" "cd /opt/qx-src && npm ci --prefix interop --no-audit --no-fund" \
            > "$DIR/${root##*/}.npm.log" 2>&1 || return 1
        echo "$stamp" > "$root/opt/qx-src/interop/node_modules/.qx-stamp"
    fi
}

versions() {  # "Python 3.14.1, cryptography 46.0.3, PyNaCl 1.6.0" of a python in a chroot
    local code='import sys, cryptography, nacl; print("Python %s, cryptography %s, PyNaCl %s" % (
        sys.version.split()[0], cryptography.__version__, nacl.__version__))'
    in_root "$1" "$2 -c '$code'" 2>/dev/null
}

demo() {  # demo ROW ROOT PYTHON: worker.py --demo (loopback only), one cell
    local row=$1 root=$2 py=$3 out
    out=$(in_root "$root" "cd /opt/qx-src && timeout 600 $py worker.py --demo" 2>&1)
    echo "$out" > "$DIR/$row.demo.log"
    if grep -q "all results right" <<< "$out"; then
        grep -o '[0-9]*/[0-9]* jobs in [0-9.]* s' <<< "$out" | head -1
    else
        echo "FAILED"; return 1
    fi
}

suite() {  # suite ROW ROOT PYTHON: the test suite (or $QX_TESTS), its closing line
    local row=$1 root=$2 py=$3 names=""
    [ "$TESTS" = none ] && { echo "not run"; return 0; }
    [ "$TESTS" = all ] || names="-m unittest $TESTS"
    say "$row: tests ($TESTS) with $py, log in $DIR/$row.tests.log"
    in_root "$root" "cd /opt/qx-src && timeout 3600 $py ${names:-test_worker.py}" > "$DIR/$row.tests.log" 2>&1
    local rc=$? last
    if [ -z "$names" ]; then
        last=$(grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$DIR/$row.tests.log" | tail -1)
    else
        last=$(tail -1 "$DIR/$row.tests.log")
    fi
    echo "${last:-no summary (exit $rc)}"
    [ "$rc" = 0 ]
}

amd64_row() {  # trixie and sid: Debian's Pythons with PyPI's wheels, Debian's Node
    local row=$1 root=$DIR/$1 py first=""
    copy_project "$root"
    npm_for "$root" || { record "$row" tests "npm ci failed ($DIR/$row.npm.log)"; return 1; }
    record "$row" node "$(in_root "$root" 'node --version')"
    for py in $(pythons_of "$row"); do
        venv_for "$root" "$py" || { record "$row" demo "pip failed on $py ($DIR/$row.pip-$py.log)"; return 1; }
        record "$row" "versions-$py" "$(versions "$root" "/opt/venv-$py/bin/python")"
        record "$row" "demo-$py" "$(demo "$row" "$root" "/opt/venv-$py/bin/python")"
        first=${first:-$py}
    done
    record "$row" tests "$(suite "$row" "$root" "/opt/venv-$first/bin/python")"
}

pythons_of() {  # the Pythons a row tries: the default first (it runs the tests)
    case $1 in
        trixie-amd64) echo 3.13 ;;
        sid-amd64) echo 3.14 3.15 ;;
    esac
}

readme_block() {  # the fenced block after "<!-- compat.sh: NAME -->" in README.md
    awk -v mark="<!-- compat.sh: $1 -->" '$0 == mark {found = 1; next}
        found && /^```/ {if (inside) exit; inside = 1; next} inside' "$HERE/README.md"
}

unit_value() {  # unit_value KEY: the unit's KEY= value (the last one)
    readme_block unit | sed -n "s/^$1=//p" | tail -1
}

# A Pi's sudo, in a chroot where we are root: apt answers yes, -u runs as that user.
SUDO_SHIM='sudo() {
    case $1 in
        apt) shift; DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@" < /dev/null ;;
        -u) local user=$2; shift 2; runuser -u "$user" -- "$@" ;;
        *) "$@" ;;
    esac
}'

pi_steps() {  # pi_steps ROW ROOT BLOCK: a fresh Pi user's folder, the README's block run as it is
    local row=$1 root=$2 block=$3 user
    user=$(unit_value User)
    in_root "$root" "userdel $user 2>/dev/null; rm -rf /opt/qx-worker /var/lib/qx-worker /home/pi-user;
        mkdir -p /home/pi-user && cp /opt/qx-src/worker.py /opt/qx-src/requirements.txt /home/pi-user/"
    readme_block "$block" > "$root/home/pi-user/steps.sh"
    [ -s "$root/home/pi-user/steps.sh" ] || { echo "no $block block in README.md"; return 1; }
    # --setup's answers: transferEncryptToken, token, no pinned master
    printf '%s\n%s\n\n' "$KEY" "$TOKEN" > "$root/home/pi-user/answers"
    say "$row: the README's $block steps (log in $DIR/$row.steps.log)"
    in_root "$root" "$SUDO_SHIM"'
        set -ex; cd /home/pi-user; . ./steps.sh < answers' > "$DIR/$row.steps.log" 2>&1 \
        || { echo "FAILED: $(tail -1 "$DIR/$row.steps.log" | cut -c1-100)"; return 1; }
    in_root "$root" "test -f /opt/qx-worker/__pycache__/worker.cpython-*.pyc" || { echo "no bytecode"; return 1; }
    in_root "$root" "test \"\$(stat -c %a:%U /var/lib/qx-worker /var/lib/qx-worker/.env)\" = \"$(printf '700:%s\n600:%s' "$user" "$user")\"" \
        || { echo "folder or .env not 0700/0600 $user's"; return 1; }
    echo "ok"
}

master_env() {  # master_env PORT: a master.py .env on loopback only (no LSD, DHT or trackers)
    printf 'token=%s\ntransferEncryptToken=%s\nlsd=false\ndht=false\ntrackers=\nhost=127.0.0.1\n' "$TOKEN" "$KEY"
    printf 'port=%s\nLOG_LEVEL=warn\n' "$1"
}

host_master() {  # host_master FOLDER PORT: master.py on the host, loopback only, $JOBS jobs
    local folder=$1 port=$2 i
    mkdir -p "$folder"
    cat > "$folder/task.py" <<'EOF'
import platform
import sys


class Task:
    def run(self, job):
        return {"x": job["data"], "machine": platform.machine(), "python": sys.version.split()[0]}
EOF
    for ((i = 0; i < JOBS; i++)); do printf '{"id": %d, "data": "%d"}\n' "$i" "$i"; done > "$folder/jobs.jsonl"
    master_env "$port" > "$folder/.env"
    (cd "$folder" && timeout 1800 "$HOST_PYTHON" "$HERE/master.py" --task task.py --jobs jobs.jsonl \
        --out results.jsonl > events.jsonl 2> master.log)
}

unit_run() {  # unit_run ROW ROOT PORT: the unit's ExecStart, as its user, in its folder, its umask; WORKER=pid
    local row=$1 root=$2 port=$3 user
    user=$(unit_value User)
    printf 'peers=127.0.0.1:%s\nlsd=false\ndht=false\ntrackers=\nhost=127.0.0.1\nname=%s\n' "$port" "$row" \
        >> "$root$(unit_value WorkingDirectory)/.env"  # loopback only: the one line beyond the README
    chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME="$(unit_value WorkingDirectory)" LANG=C.UTF-8 \
        $(unit_value Environment) setpriv --reuid="$user" --regid="$user" --init-groups -- /bin/sh -c \
        "umask $(unit_value UMask) && cd $(unit_value WorkingDirectory) && exec $(unit_value ExecStart)" \
        > "$DIR/$row.worker.log" 2>&1 &
    WORKER=$!  # chroot, env, setpriv and sh exec: this is the worker's pid, as systemd's MainPID
}

jobs_from_host() {  # jobs_from_host ROW ROOT: $JOBS jobs from a host master.py to the unit's worker
    local row=$1 root=$2 port folder started elapsed machines rc
    port=$("$HOST_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    folder=$(mktemp -d /tmp/qx-compat-master.XXXXXX)
    started=$(date +%s)
    unit_run "$row" "$root" "$port"
    host_master "$folder" "$port"; rc=$?
    elapsed=$(( $(date +%s) - started ))
    kill -TERM "$WORKER" 2>/dev/null; wait "$WORKER"; local stopped=$?  # KillMode=mixed: the worker alone
    machines=$(grep -o '"machine": *"[^"]*"' "$folder/results.jsonl" 2>/dev/null | sort | uniq -c | sed 's/^ *//' | tr '\n' ' ')
    cp "$folder/master.log" "$DIR/$row.master.log" 2>/dev/null
    local count; count=$(grep -c . "$folder/results.jsonl" 2>/dev/null)
    rm -rf "$folder"
    if [ "$rc" = 0 ] && [ "${count:-0}" = "$JOBS" ] && [ "$stopped" = 0 ]; then
        echo "$count/$JOBS in ${elapsed} s (${machines% }), SIGTERM: exit 0"
    else
        echo "FAILED: master exit $rc, ${count:-0}/$JOBS results (${machines% }), worker exit $stopped"; return 1
    fi
}

arm_row() {  # bookworm under qemu-user: the README's steps, the demo, jobs from the host
    local row=$1 root=$DIR/$1 venv=/opt/qx-worker/venv block
    case $row in *-armhf) block=pi-32 ;; *) block=pi-64 ;; esac
    copy_project "$root"
    local steps ok
    steps=$(pi_steps "$row" "$root" "$block"); ok=$?
    record "$row" steps "$steps"
    [ "$ok" = 0 ] || return 1
    record "$row" versions "$(versions "$root" "$venv/bin/python")"
    record "$row" webrtc "$(in_root "$root" "$venv/bin/python -c 'import aiortc' 2>/dev/null && echo on || echo off")"
    record "$row" demo "$(demo "$row" "$root" "$venv/bin/python")"
    say "$row: $JOBS jobs from master.py on the host"
    record "$row" jobs "$(jobs_from_host "$row" "$root")"
}

unit_checks() {  # systemd-analyze verify and security of the README's unit, in a root where it was set up
    local root=$1 unit=$1/etc/systemd/system/qx-worker.service out score
    readme_block unit > "$unit"
    out=$(systemd-analyze verify --root="$root" --man=no /etc/systemd/system/qx-worker.service 2>&1)
    echo "$out" > "$DIR/unit.verify.log"
    score=$(systemd-analyze security --offline=true --root="$root" /etc/systemd/system/qx-worker.service 2>&1 \
        | tee "$DIR/unit.security.log" | sed -n 's/.*Overall exposure level for [^:]*: //p')
    if [ -z "$out" ]; then echo "verify: clean; security: ${score:-?}"; else echo "FAILED verify: $out"; return 1; fi
}

in_box() {  # run a command in the booted container (all its namespaces)
    nsenter -t "$BOX_INIT" -a -- /usr/bin/env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin "$@"
}

boot() {  # boot ROOT: systemd-nspawn --boot on the host's network; BOX and BOX_INIT, or BOOT_ERROR
    local root=$1 i state
    systemd-nspawn -D "$root" -b --register=no --keep-unit --console=pipe -M qx-compat \
        > "$DIR/bookworm-amd64.boot.log" 2>&1 < /dev/null &
    BOX=$!
    for ((i = 0; i < 120; i++)); do
        BOX_INIT=$(pgrep -P "$BOX" | head -1)
        if [ -n "$BOX_INIT" ]; then
            state=$(in_box systemctl is-system-running 2>/dev/null)
            case $state in running | degraded) return 0 ;; esac
        fi
        sleep 1
    done
    BOOT_ERROR="the container did not boot ($state)"; return 1
}

halt_box() {
    [ -n "${BOX:-}" ] || return 0
    kill -TERM "$BOX" 2>/dev/null  # nspawn asks the container's systemd to halt
    wait "$BOX" 2>/dev/null
    BOX=""
}

job_lines() {  # job_lines COUNT [ID=DATA...]: COUNT jobs of data "x", some with other data
    local count=$1 i data; shift
    for ((i = 0; i < count; i++)); do
        data=x
        for special in "$@"; do [ "${special%%=*}" = "$i" ] && data=${special#*=}; done
        printf '{"id": %d, "data": "%s"}\n' "$i" "$data"
    done
}

unit_master() {  # unit_master NAME TASK DEPS COUNT [ID=DATA...]: a host master.py serving TASK to the unit's worker
    local name=$1 task=$2 deps=$3 folder=$WORK/$1; shift 3
    mkdir -p "$folder"
    cp "$WORK/$task" "$folder/"
    job_lines "$@" > "$folder/jobs.jsonl"
    master_env "$PORT" > "$folder/.env"
    (cd "$folder" && timeout 600 "$HOST_PYTHON" "$HERE/master.py" --task "$task" --deps "$deps" \
        --jobs jobs.jsonl --out results.jsonl > events.jsonl 2> master.log) &
    MASTER=$!
}

results_of() {  # the results of a unit_master run that are not errors, and the errors
    local folder=$WORK/$1
    echo "$(grep -vc '"error"' "$folder/results.jsonl" 2>/dev/null) ok, $(grep -c '"error"' "$folder/results.jsonl" 2>/dev/null) errors"
}

unit_tasks() {  # the tasks the systemd row serves, into $WORK
    cat > "$WORK/task.py" <<'EOF'
import os
import signal
import time

import six  # a dependency: pip installs it into .deps, under the unit


class Task:
    def run(self, job):
        if job["data"] == "kill":  # a task that ends its worker: Restart=always brings it back
            if not os.path.exists("killed-once"):
                open("killed-once", "w").close()
                os.kill(os.getppid(), signal.SIGTERM)
        if job["data"] == "slow":  # systemctl stop while this runs: KillMode=mixed finishes it
            open("slow-started", "w").close()
            time.sleep(6)
        return {"six": six.__version__, "pid": os.getpid()}
EOF
    cat > "$WORK/task.js" <<'EOF'
const leftPad = require('left-pad'); // a dependency: npm installs it into node_modules, under the unit

class Task {
  async run(job) {
    if (job.data === 'big') return Buffer.alloc(400 * 1024 * 1024).length; // over jobMemoryMB=256
    return { padded: leftPad(String(job.id), 5, '0') };
  }
}

module.exports = Task;
EOF
}

systemd_row() {  # bookworm amd64: the README's 64-bit steps, then the unit under systemd itself
    local row=$1 root=$DIR/$1 steps ok unitdir=$DIR/$1/etc/systemd/system i
    copy_project "$root"
    steps=$(pi_steps "$row" "$root" pi-64); ok=$?
    record "$row" steps "$steps"
    [ "$ok" = 0 ] || return 1
    record "$row" versions "$(versions "$root" /opt/qx-worker/venv/bin/python)"
    record "$row" node "$(in_root "$root" 'node --version')"
    PORT=$("$HOST_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    printf 'peers=127.0.0.1:%s\nlsd=false\ndht=false\ntrackers=\nhost=127.0.0.1\nname=%s\njobMemoryMB=256\nconcurrency=2\n' \
        "$PORT" "$row" >> "$root$(unit_value WorkingDirectory)/.env"  # loopback only
    readme_block unit > "$unitdir/qx-worker.service"
    mkdir -p "$unitdir/qx-worker.service.d"
    # this machine reaches PyPI and npm through a proxy with a CA of its own
    printf '[Service]\nEnvironment=PIP_CERT=/etc/qx-host-ca.crt NODE_EXTRA_CA_CERTS=/etc/qx-host-ca.crt npm_config_cafile=/etc/qx-host-ca.crt\n' \
        > "$unitdir/qx-worker.service.d/compat.conf"
    in_root "$root" "systemctl enable qx-worker" > /dev/null 2>&1
    record unit verify "$(unit_checks "$root")"
    unmount_all
    WORK=$(mktemp -d /tmp/qx-compat-unit.XXXXXX)
    unit_tasks
    say "$row: booting the container (systemd-nspawn)"
    boot "$root" || { record "$row" unit "FAILED: $BOOT_ERROR"; halt_box; return 1; }
    local report="" one restarts result ranges
    # 1. task.py with a pip dependency; a task that SIGTERMs the worker: restarted
    say "$row: task.py with a pip dependency, and a task that ends its worker"
    unit_master py task.py six 50 1=kill
    wait "$MASTER"; one=$?
    restarts=$(in_box systemctl show -P NRestarts qx-worker)
    report+="pip dependency: $(results_of py), restarts $restarts; "
    [ "$one" = 0 ] && [ "$(results_of py)" = "50 ok, 0 errors" ] && [ "${restarts:-0}" -ge 1 ] || ok=1
    # 2. task.js with an npm dependency; a Buffer over jobMemoryMB
    say "$row: task.js with an npm dependency"
    unit_master js task.js left-pad 50 0=big
    wait "$MASTER"
    ranges=$(grep -c '"type": *"RangeError"' "$WORK/js/results.jsonl")
    report+="npm dependency: $(results_of js) ($ranges RangeError: a Buffer over jobMemoryMB); "
    [ "$(results_of js)" = "49 ok, 1 errors" ] && [ "$ranges" = 1 ] || ok=1
    # 3. systemctl stop during a job: it finishes and is delivered
    say "$row: systemctl stop during a job"
    rm -f "$root/var/lib/qx-worker/slow-started"
    unit_master stop task.py six 1 0=slow
    for ((i = 0; i < 120; i++)); do [ -e "$root/var/lib/qx-worker/slow-started" ] && break; sleep 0.5; done
    in_box systemctl stop qx-worker
    wait "$MASTER"; one=$?
    result=$(in_box systemctl show -P Result qx-worker)
    report+="systemctl stop during a job: $(results_of stop), Result=$result"
    [ "$one" = 0 ] && [ "$(results_of stop)" = "1 ok, 0 errors" ] && [ "$result" = success ] || ok=1
    cp "$WORK"/*/master.log "$DIR/" 2>/dev/null
    in_box journalctl -u qx-worker --no-pager > "$DIR/$row.journal.log" 2>&1
    halt_box
    rm -rf "$WORK"
    if [ "$ok" = 0 ]; then record "$row" unit "$report"; else record "$row" unit "FAILED: $report"; return 1; fi
}

needed() {  # what a row needed beyond debootstrap and the host's CA bundle for pip and npm
    case $1 in
        trixie-amd64) echo "Debian's python3-venv, nodejs, npm; PyPI's wheels; npm ci" ;;
        sid-amd64) echo "the same, and python3.15 from sid; apt's Check-Valid-Until off" ;;
        bookworm-arm64) echo "qemu-user-static, binfmt_misc; the pi-64 block: PyPI's aarch64 wheels" ;;
        bookworm-armhf) echo "qemu-user-static, binfmt_misc; the pi-32 block: Debian's python3-cryptography and python3-nacl, no pip, no compiler" ;;
        bookworm-amd64) echo "systemd-container (systemd-nspawn --boot); the pi-64 block; a drop-in giving pip and npm the host's CA" ;;
    esac
}

print_table() {
    local row
    echo
    echo "| row | Python, cryptography, PyNaCl | Node | README steps | demo (200 jobs) | tests | $JOBS jobs from master.py on the host | needed |"
    echo "|---|---|---|---|---|---|---|---|"
    for row in $ROWS; do
        if [ -e "$RESULTS/$row.skip" ]; then echo "| $row | skipped: $(cell "$row" skip) | | | | | | |"; continue; fi
        case $row in
            bookworm-amd64)
                echo "| $row (systemd-nspawn) | $(cell "$row" versions) | $(cell "$row" node) | $(cell "$row" steps) | - | the unit under systemd 252: $(cell "$row" unit) | - | $(needed "$row") |" ;;
            *-amd64)
                local py pys="" demos=""
                for py in $(pythons_of "$row"); do
                    pys="$pys${pys:+; }$(cell "$row" "versions-$py")"
                    demos="$demos${demos:+; }$py: $(cell "$row" "demo-$py")"
                done
                echo "| $row | $pys | $(cell "$row" node) | - | $demos | $(cell "$row" tests) | - | $(needed "$row") |" ;;
            *)
                echo "| $row (qemu-user) | $(cell "$row" versions), WebRTC $(cell "$row" webrtc) | - | $(cell "$row" steps) | $(cell "$row" demo) | - | $(cell "$row" jobs) | $(needed "$row") |" ;;
        esac
    done
    [ -e "$RESULTS/unit.verify" ] && echo && echo "The README's unit (systemd-analyze $(systemd-analyze --version | head -1 | cut -d' ' -f2), in bookworm-amd64 after its steps): $(cell unit verify)"
}

KEY=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')  # 32 characters
TOKEN=compat-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
for row in $ROWS; do
    case " $ALL_ROWS " in *" $row "*) ;; *) die "no row $row: $ALL_ROWS" ;; esac
    if bootstrap "$row"; then
        case $row in
            bookworm-amd64) systemd_row "$row" ;;
            *-amd64) amd64_row "$row" ;;
            *) arm_row "$row" ;;
        esac
    fi
    unmount_all
done
print_table
grep -rqE 'FAILED|[1-9][0-9]* failed|no summary|^no ' "$RESULTS" && exit 1
exit 0
