#!/usr/bin/env bash
# Installs the system packages sqlproxy's tests and demo use, only when they are missing:
# PostgreSQL server binaries (initdb, pg_ctl, postgres, pgbench), redis-server, psql, and for the
# dashboard's browser test Debian's Chromium (/usr/bin/chromium) with Node.js and npm (the test
# installs playwright-core from tests/browser/package-lock.json and never downloads a browser).
# Needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
have_pg_bin() {
  command -v "$1" >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/"$1" >/dev/null 2>&1
}
have_pg_bin initdb || need+=(postgresql)
have_pg_bin pgbench || need+=(postgresql-contrib)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)  # the TLS tests make their own CA
command -v ip >/dev/null 2>&1 || need+=(iproute2)  # the wire door's dead-path tests (netns, veth)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
for extra in "$@"; do
  case "$extra" in
    pgbouncer) command -v pgbouncer >/dev/null 2>&1 || need+=(pgbouncer) ;;
    chromium) ;;  # always checked above
    *) need+=("$extra") ;;
  esac
done

[ ${#need[@]} -eq 0 ] && exit 0

echo "sysdeps: installing ${need[*]}"
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "sysdeps: missing ${need[*]} and not root; install them and run again" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Debian's postgresql package starts a cluster on 5432; we never use it, so keep it from starting.
$SUDO sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
$SUDO rm -f /usr/sbin/policy-rc.d
