#!/usr/bin/env bash
# Installs what chatpipe needs on a fresh Debian machine; safe to run again (it skips what
# is already there).
#
#   infra/local/install.sh [all]          everything below (the default)
#   infra/local/install.sh packages [PKG...]
#                                         Debian packages (default: redis-server redis-tools
#                                         kcat chromium chromium-driver nginx-light (the
#                                         proxy tests), plus a JDK and Maven if java/mvn
#                                         are missing)
#   infra/local/install.sh python         pip install -e '.[dev,otel,bench]' from the repo root
#   infra/local/install.sh kafka          Kafka broker jars from Maven Central into the cache
#   infra/local/install.sh node           the openai npm package of tests/interop/node (npm ci)
#
# Settings (environment): CHATPIPE_CACHE_DIR=$HOME/.cache/chatpipe, PYTHON=python3,
# CHATPIPE_FORCE_INSTALL=1 (redo the pip and jar steps even when their stamps say done).
set -euo pipefail

: "${HOME:=$(cd ~ && pwd)}"  # CI may run without HOME
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"
KAFKA_VERSION="4.1.1"
CACHE_DIR="${CHATPIPE_CACHE_DIR:-${HOME}/.cache/chatpipe}"
PYTHON="${PYTHON:-python3}"
FORCE="${CHATPIPE_FORCE_INSTALL:-}"

log() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------- Debian

is_installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

install_packages() {
  local wanted=("$@") missing=() pkg
  if ((${#wanted[@]} == 0)); then
    wanted=(redis-server redis-tools kcat chromium chromium-driver nginx-light)
    command -v java >/dev/null 2>&1 || wanted+=(openjdk-17-jdk-headless)
    command -v mvn >/dev/null 2>&1 || wanted+=(maven)
  fi
  command -v dpkg-query >/dev/null 2>&1 || die "not a Debian system (no dpkg-query): install ${wanted[*]} by hand"
  for pkg in "${wanted[@]}"; do is_installed "$pkg" || missing+=("$pkg"); done
  if ((${#missing[@]} == 0)); then
    log "Debian packages present: ${wanted[*]}"
    return 0
  fi
  [[ "$(id -u)" -eq 0 ]] || die "missing Debian packages: run 'apt-get install ${missing[*]}' as root, then try again"

  # Debian's redis-server starts a system-wide Redis on 6379 when it is installed, which
  # would then hold the port our stack wants: forbid service starts while installing.
  local policy=/usr/sbin/policy-rc.d added_policy=""
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# added by chatpipe infra/local/install.sh while installing\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  log "apt-get update, then installing: ${missing[*]}"
  local rc=0
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } || rc=$?
  [[ -z "$added_policy" ]] || rm -f "$policy"
  ((rc == 0)) || die "apt-get failed (exit ${rc}) installing: ${missing[*]}"
  for pkg in "${missing[@]}"; do is_installed "$pkg" || die "${pkg} is still not installed"; done
  log "installed: ${missing[*]}"
}

# ---------------------------------------------------------------------------- Python

install_python() {
  [[ -f "${ROOT}/pyproject.toml" ]] || die "no pyproject.toml in ${ROOT}"
  command -v "$PYTHON" >/dev/null 2>&1 || die "${PYTHON} not found (set PYTHON=...)"
  # Skip when this interpreter already got this pyproject.toml installed from this folder.
  local key stamp
  key="$("$PYTHON" -c 'import sys; print(sys.executable)') $(sha256sum "${ROOT}/pyproject.toml" | cut -d' ' -f1)"
  stamp="${CACHE_DIR}/python-$(printf '%s' "$ROOT" | sha256sum | cut -c1-16).stamp"
  if [[ -z "$FORCE" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]] \
      && (cd / && "$PYTHON" -c 'import chatpipe, sys; sys.exit(not chatpipe.__file__.startswith(sys.argv[1]))' "$ROOT") >/dev/null 2>&1; then
    log "Python package already installed for $("$PYTHON" --version 2>&1) (pyproject.toml unchanged)"
    return 0
  fi
  log "pip install -e '.[dev,otel,bench]' with $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
  (cd "$ROOT" && PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    "$PYTHON" -m pip install --quiet -e '.[dev,otel,bench]') || die "pip install -e '.[dev,otel,bench]' failed"
  mkdir -p "$CACHE_DIR"
  printf '%s\n' "$key" >"$stamp"
  log "Python package installed"
}

# ---------------------------------------------------------------------------- Kafka jars

install_kafka() {
  local dir="${CACHE_DIR}/kafka-${KAFKA_VERSION}" pom="${HERE}/pom.xml"
  local lib="${dir}/lib" stamp="${dir}/.complete" key
  key="$(sha256sum "$pom" | cut -d' ' -f1)"
  mkdir -p "$dir"
  exec 8>"${dir}/.lock"
  command -v flock >/dev/null 2>&1 && flock -w 600 8
  if [[ -z "$FORCE" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    log "Kafka ${KAFKA_VERSION} jars present in ${lib}"
    return 0
  fi
  command -v java >/dev/null 2>&1 || die "java not found: run '$0 packages' (or apt-get install openjdk-17-jdk-headless)"
  command -v mvn >/dev/null 2>&1 || die "mvn not found: run '$0 packages' (or apt-get install maven)"
  log "fetching Kafka ${KAFKA_VERSION} jars from Maven Central into ${lib}"
  rm -f "$stamp"
  rm -rf "$lib" "${lib}.tmp"
  mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="${lib}.tmp" \
    || die "mvn dependency:copy-dependencies failed (see the Maven output above)"
  [[ -f "${lib}.tmp/kafka_2.13-${KAFKA_VERSION}.jar" ]] || die "no kafka_2.13-${KAFKA_VERSION}.jar in ${lib}.tmp"
  mv "${lib}.tmp" "$lib"
  printf '%s\n' "$key" >"$stamp"   # written last: a half-finished download is redone
  log "Kafka jars ready: $(find "$lib" -name '*.jar' | wc -l) jars, $(du -sh "$lib" | cut -f1)"
}

# ---------------------------------------------------------------------------- Node

# The openai npm package the Node SDK test runs (tests/interop/node, from its lock file).
install_node() {
  local dir="${ROOT}/tests/interop/node"
  command -v npm >/dev/null 2>&1 || install_packages nodejs npm
  local stamp="${dir}/node_modules/.chatpipe-stamp"
  local key
  key="$(sha256sum "${dir}/package-lock.json" | cut -d' ' -f1)"
  if [[ -z "$FORCE" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    log "node packages up to date (${dir})"
    return
  fi
  log "npm ci in ${dir}"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed in ${dir}"
  printf '%s\n' "$key" >"$stamp"
}

main() {
  local what="${1:-all}"
  case "$what" in
    all)
      install_packages
      install_kafka
      install_python
      install_node
      ;;
    node) install_node ;;
    packages) shift; install_packages "$@" ;;
    python) install_python ;;
    kafka) install_kafka ;;
    -h | --help | help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' ;;
    *) die "unknown step '${what}' (all, packages, python, kafka, node)" ;;
  esac
}

main "$@"
