#!/usr/bin/env bash
# Installs the system packages sqlproxy's tests and demo use, only when they are missing:
# PostgreSQL server binaries (initdb, pg_ctl, postgres, pgbench), redis-server, psql.
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
for extra in "$@"; do
  case "$extra" in
    pgbouncer) command -v pgbouncer >/dev/null 2>&1 || need+=(pgbouncer) ;;
    chromium) command -v chromium >/dev/null 2>&1 || need+=(chromium) ;;
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
