#!/usr/bin/env bash
# Local real infrastructure for chatpipe, without Docker: a single-node Apache Kafka
# (KRaft, combined broker+controller, jars from Maven Central) and a Redis server, both on
# 127.0.0.1. Data, logs and pid files live in one stack folder per KAFKA_PORT, so several
# stacks (a developer's, CI's) can run side by side on different ports.
#
#   infra/local/stack.sh start   [kafka|redis|all]    start (no-op if already running)
#   infra/local/stack.sh stop    [kafka|redis|all] [--wipe]
#   infra/local/stack.sh status  [kafka|redis|all]    exit 0 only if all asked-for are up
#   infra/local/stack.sh logs    [kafka|redis|all] [-f]
#   infra/local/stack.sh restart [kafka|redis|all]
#   infra/local/stack.sh restart-redis                stop + start Redis: its data is gone
#                                                     (kept with REDIS_APPENDONLY=yes)
#   infra/local/stack.sh wipe    [kafka|redis|all]    stop, then delete the data
#   infra/local/stack.sh env                          print the export line for clients
#
# Settings (environment): KAFKA_PORT=9092 KAFKA_CONTROLLER_PORT=9093 REDIS_PORT=6379
# KAFKA_HEAP=512m KAFKA_JAVA_OPTS='' STACK_TIMEOUT=60 STOP_TIMEOUT=30 REDIS_APPENDONLY=no
# CHATPIPE_STACK_DIR=$HOME/.local/state/chatpipe/stack-$KAFKA_PORT
# CHATPIPE_CACHE_DIR=$HOME/.cache/chatpipe (the Kafka jars). See docs/local-stack.md.
#
# Opt-in secure mode (docs/local-stack.md "SASL/SCRAM and Redis ACL"; the default is PLAINTEXT
# and no Redis password): KAFKA_SASL=scram KAFKA_SASL_USER=chatpipe KAFKA_SASL_PASSWORD=...
# makes the client listener SASL_PLAINTEXT with SCRAM-SHA-256/512 (the storage must have been
# formatted in that mode: wipe first); REDIS_ACL_USER=... REDIS_ACL_PASSWORD=... starts Redis
# with that ACL user and the `default` user off.
set -euo pipefail

: "${HOME:=$(cd ~ && pwd)}"  # CI may run without HOME
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=infra/local/kafka-lib.sh
source "${HERE}/kafka-lib.sh"

KAFKA_VERSION="4.1.1"
HOST="127.0.0.1"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
REDIS_PORT="${REDIS_PORT:-6379}"
KAFKA_HEAP="${KAFKA_HEAP:-512m}"
KAFKA_JAVA_OPTS="${KAFKA_JAVA_OPTS:-}"
STACK_TIMEOUT="${STACK_TIMEOUT:-60}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
CACHE_DIR="${CHATPIPE_CACHE_DIR:-${HOME}/.cache/chatpipe}"
STACK_DIR="${CHATPIPE_STACK_DIR:-${HOME}/.local/state/chatpipe/stack-${KAFKA_PORT}}"
KAFKA_SASL="${KAFKA_SASL:-}"
KAFKA_SASL_USER="${KAFKA_SASL_USER:-chatpipe}"
KAFKA_SASL_PASSWORD="${KAFKA_SASL_PASSWORD:-}"
KAFKA_SASL_MECHANISM="${KAFKA_SASL_MECHANISM:-SCRAM-SHA-512}"  # what `env` and the checks use
REDIS_ACL_USER="${REDIS_ACL_USER:-}"
REDIS_ACL_PASSWORD="${REDIS_ACL_PASSWORD:-}"

KAFKA_LIB="${CACHE_DIR}/kafka-${KAFKA_VERSION}/lib"
KAFKA_STAMP="${CACHE_DIR}/kafka-${KAFKA_VERSION}/.complete"
KAFKA_DATA="${STACK_DIR}/kafka-data"
KAFKA_PROPS="${STACK_DIR}/kafka-server.properties"
KAFKA_LOG4J="${STACK_DIR}/kafka-log4j2.xml"
KAFKA_LOG="${STACK_DIR}/kafka.log"
KAFKA_OUT="${STACK_DIR}/kafka.out"   # JVM stdout/stderr (crashes, bad options)
KAFKA_PID="${STACK_DIR}/kafka.pid"
REDIS_DIR="${STACK_DIR}/redis"
REDIS_APPENDONLY="${REDIS_APPENDONLY:-no}"  # yes: AOF persistence (a restart keeps the data)
REDIS_LOG="${STACK_DIR}/redis.log"
REDIS_PID="${STACK_DIR}/redis.pid"
REDIS_CONF="${STACK_DIR}/redis-acl.conf"          # ACL mode only (mode 600: holds the password)
SECRETS_DIR="${STACK_DIR}/secrets"                # SCRAM mode only (mode 700)
KAFKA_MODE_FILE="${KAFKA_DATA}/chatpipe-listener" # which listener the storage was formatted for
BROKER_USER="broker"                              # the broker's own SCRAM user (inter-broker)

log() { printf '%s\n' "$*"; }
die() { printf 'stack.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------------------- helpers

pid_of() {  # pid_of PIDFILE -> prints the pid if the file holds a live process
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(tr -dc '0-9' <"$1")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  printf '%s\n' "$pid"
}

cmdline_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

# The live pid recorded by this stack for a service, only if that process is really ours
# (a pid file can outlive its process and the pid be reused).
kafka_pid() {
  local pid
  pid="$(pid_of "$KAFKA_PID")" || return 1
  [[ "$(cmdline_of "$pid")" == *"kafka.Kafka ${KAFKA_PROPS}"* ]] || return 1
  printf '%s\n' "$pid"
}

redis_pid() {
  local pid
  pid="$(pid_of "$REDIS_PID")" || return 1
  [[ "$(cmdline_of "$pid")" == *"redis-server"*"${HOST}:${REDIS_PORT}"* ]] || return 1
  printf '%s\n' "$pid"
}

port_in_use() {  # port_in_use PORT: is anything listening on it (on 127.0.0.1 or any address)?
  local port="$1"
  if command -v ss >/dev/null 2>&1 && [[ -n "$(ss -Hltn "sport = :${port}" 2>/dev/null)" ]]; then
    return 0
  fi
  (exec 3<>"/dev/tcp/${HOST}/${port}") 2>/dev/null
}

port_owner() {  # best effort "users:(("python3",pid=123,fd=3))"
  command -v ss >/dev/null 2>&1 || return 0
  ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:.*' | head -n 1 || true
}

require_free_port() {  # require_free_port PORT VARNAME SERVICE
  local port="$1" var="$2" service="$3" owner
  if port_in_use "$port"; then
    owner="$(port_owner "$port")"
    die "cannot start ${service}: port ${port} is already in use by another process${owner:+ (${owner})}, not by this stack (${STACK_DIR}). Stop that process or choose another port, e.g. ${var}=$((port + 100)) $0 start ${service}"
  fi
}

MARK="=== stack.sh start"

mark_log() { printf '%s %s ===\n' "$MARK" "$(date '+%Y-%m-%d %H:%M:%S')" >>"$1"; }

tail_logs() {  # tail_logs FILE...: the last 40 lines written since our last start, to stderr
  local f from lines
  for f in "$@"; do
    [[ -s "$f" ]] || continue
    from="$(grep -n "^${MARK}" "$f" | tail -n 1 | cut -d: -f1 || true)"
    lines="$(tail -n "+$((${from:-0} + 1))" "$f" | tail -n 40)"
    [[ -n "$lines" ]] || continue
    printf -- '----- last 40 lines of %s -----\n%s\n' "$f" "$lines" >&2
  done
}

terminate() {  # terminate PID NAME: TERM, wait up to STOP_TIMEOUT, then KILL
  local pid="$1" name="$2" waited=0
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    if ((waited >= STOP_TIMEOUT * 10)); then
      log "${name} (pid ${pid}) did not stop within ${STOP_TIMEOUT}s: sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

# One operation at a time per stack folder (two `make test` in parallel, say). The fd is
# closed for the servers we launch, so they do not hold the lock while they run.
take_lock() {
  mkdir -p "$STACK_DIR"
  exec 9>"${STACK_DIR}/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w $((STACK_TIMEOUT * 2 + 30)) 9 || die "another stack.sh is busy with ${STACK_DIR}"
  fi
}

apt_or_explain() {  # apt_or_explain COMMAND PACKAGE...
  local cmd="$1"; shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "${cmd} not found: installing $* from Debian"
    "${HERE}/install.sh" packages "$@"
    command -v "$cmd" >/dev/null 2>&1 || die "${cmd} still not found after installing $*"
  else
    die "${cmd} is not installed: run 'apt-get install $*' as root (or infra/local/install.sh), then try again."
  fi
}

# ---------------------------------------------------------------------------- kafka

kafka_mode() { if [[ "$KAFKA_SASL" == scram ]]; then echo scram; else echo plaintext; fi; }

# In SCRAM mode as the broker's own user over SASL/PLAIN: Debian's kcat (librdkafka 2.0) fails
# SCRAM against Kafka 4.1 even with right credentials (aiokafka and the Java client succeed).
kafka_answers() {
  local out conf=()
  [[ "$(kafka_mode)" == scram ]] && conf=(-F "${SECRETS_DIR}/kcat-broker.conf")
  out="$(kcat "${conf[@]}" -b "${HOST}:${KAFKA_PORT}" -L -m 2 2>/dev/null)" || return 1
  [[ "$out" == *"broker 1 at"* ]]
}

plain_secret() {  # plain_secret VAR VALUE: the generated configs quote nothing, so keep it simple
  [[ "$2" =~ ^[A-Za-z0-9._~+@%^*!-]+$ ]] || die "$1 may only hold letters, digits and . _ ~ + @ % ^ * ! - (it goes into Kafka/Redis config lines unquoted)"
}

check_secure_settings() {  # fail early on an opt-in mode that cannot work
  case "$KAFKA_SASL" in
    "" | scram) ;;
    *) die "KAFKA_SASL='${KAFKA_SASL}': use 'scram' (SASL_PLAINTEXT with SCRAM-SHA-256/512) or leave it empty" ;;
  esac
  case "$KAFKA_SASL_MECHANISM" in
    SCRAM-SHA-256 | SCRAM-SHA-512) ;;
    *) die "KAFKA_SASL_MECHANISM='${KAFKA_SASL_MECHANISM}': SCRAM-SHA-256 or SCRAM-SHA-512" ;;
  esac
  if [[ "$KAFKA_SASL" == scram ]]; then
    [[ -n "$KAFKA_SASL_PASSWORD" ]] || die "KAFKA_SASL=scram needs KAFKA_SASL_PASSWORD (and KAFKA_SASL_USER, default chatpipe)"
    plain_secret KAFKA_SASL_USER "$KAFKA_SASL_USER"
    plain_secret KAFKA_SASL_PASSWORD "$KAFKA_SASL_PASSWORD"
  fi
  if [[ -n "$REDIS_ACL_USER" || -n "$REDIS_ACL_PASSWORD" ]]; then
    [[ -n "$REDIS_ACL_USER" && -n "$REDIS_ACL_PASSWORD" ]] || die "REDIS_ACL_USER and REDIS_ACL_PASSWORD go together"
    plain_secret REDIS_ACL_USER "$REDIS_ACL_USER"
    plain_secret REDIS_ACL_PASSWORD "$REDIS_ACL_PASSWORD"
  fi
}

write_kafka_secrets() {  # SCRAM mode: client configs for kcat and the admin tool (mode 600)
  local broker_pw
  broker_pw="$(cat "${SECRETS_DIR}/broker.password")"
  cat >"${SECRETS_DIR}/kcat-broker.conf" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanisms=PLAIN
sasl.username=${BROKER_USER}
sasl.password=${broker_pw}
EOF
  cat >"${SECRETS_DIR}/admin.properties" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="${BROKER_USER}" password="${broker_pw}";
EOF
}

client_fingerprint() {  # which user/password pair the broker holds (a hash, not the password)
  printf '%s:%s' "$KAFKA_SASL_USER" "$KAFKA_SASL_PASSWORD" | sha256sum | cut -d' ' -f1
}

# SCRAM mode, broker up: make sure KAFKA_SASL_USER logs in with KAFKA_SASL_PASSWORD. The user
# is created at format time; on a stack formatted earlier with another user or password, the
# credentials are set (added or replaced) through the admin API, as an operator rotates them.
ensure_client_user() {
  [[ "$(cat "${SECRETS_DIR}/client.sha256" 2>/dev/null)" == "$(client_fingerprint)" ]] && return 0
  log "setting the SCRAM credentials of user ${KAFKA_SASL_USER} (SCRAM-SHA-256 and SCRAM-SHA-512)"
  local out mechanism
  for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do  # one per request: the broker refuses two
    if ! out="$(java -cp "${KAFKA_LIB}/*" -Dlog4j2.configurationFile="$KAFKA_LOG4J" \
        kafka.admin.ConfigCommand --bootstrap-server "${HOST}:${KAFKA_PORT}" \
        --command-config "${SECRETS_DIR}/admin.properties" --alter --entity-type users \
        --entity-name "$KAFKA_SASL_USER" \
        --add-config "${mechanism}=[password=${KAFKA_SASL_PASSWORD}]" 2>&1)"; then
      printf '%s\n' "${out//${KAFKA_SASL_PASSWORD}/***}" >&2
      die "could not set the ${mechanism} credentials of ${KAFKA_SASL_USER}"
    fi
  done
  (umask 077; client_fingerprint >"${SECRETS_DIR}/client.sha256")
}

kafka_listener_config() {
  if [[ "$(kafka_mode)" != scram ]]; then
    cat <<EOF
listeners=PLAINTEXT://${HOST}:${KAFKA_PORT},CONTROLLER://${HOST}:${KAFKA_CONTROLLER_PORT}
advertised.listeners=PLAINTEXT://${HOST}:${KAFKA_PORT},CONTROLLER://${HOST}:${KAFKA_CONTROLLER_PORT}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
EOF
    return
  fi
  local broker_pw
  broker_pw="$(cat "${SECRETS_DIR}/broker.password")"
  # Clients and the broker itself authenticate with SCRAM on the one client listener; the
  # KRaft controller listener stays PLAINTEXT on loopback (it serves no client requests).
  cat <<EOF
listeners=SASL_PLAINTEXT://${HOST}:${KAFKA_PORT},CONTROLLER://${HOST}:${KAFKA_CONTROLLER_PORT}
advertised.listeners=SASL_PLAINTEXT://${HOST}:${KAFKA_PORT},CONTROLLER://${HOST}:${KAFKA_CONTROLLER_PORT}
inter.broker.listener.name=SASL_PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="${BROKER_USER}" password="${broker_pw}";
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
# PLAIN knows only the broker's own user (the health checks: kcat); clients use SCRAM
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="${BROKER_USER}" password="${broker_pw}" user_${BROKER_USER}="${broker_pw}";
EOF
}

write_kafka_config() {
  (umask 077; : >"$KAFKA_PROPS")  # SCRAM mode writes the broker's password into it
  cat >"$KAFKA_PROPS" <<EOF
# Generated by infra/local/stack.sh on every start: edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=${HOST}:${KAFKA_CONTROLLER_PORT}
$(kafka_listener_config)
log.dirs=${KAFKA_DATA}

# One node: every replication factor is 1, internal topics small (fast first group join).
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0

# After a hard kill (SIGKILL, crash) the restarted node cannot register until its old
# registration's session expires (DUPLICATE_BROKER_REGISTRATION): 4 s instead of 9 s.
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=1000

# Topics are created by 'chatpipe topics': a misspelt topic fails loudly.
auto.create.topics.enable=false
delete.topic.enable=true

# Compaction (chat.cancels) with a small heap: 16 MiB dedupe buffer instead of 128 MiB,
# and the cleaner looks for work every second instead of every 15.
log.cleaner.enable=true
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
log.cleaner.backoff.ms=1000

# Two cores.
num.network.threads=2
num.io.threads=4
EOF

  write_kafka_log4j "$KAFKA_LOG4J" "$KAFKA_LOG" 3
}

# SCRAM mode: the broker's own password, made when the storage is formatted (its SCRAM
# credentials live in the metadata log from then on), kept beside the data.
prepare_kafka_secrets() {
  [[ "$(kafka_mode)" == scram ]] || return 0
  (umask 077; mkdir -p "$SECRETS_DIR")
  if [[ ! -s "${SECRETS_DIR}/broker.password" || ! -f "${KAFKA_DATA}/meta.properties" ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"${SECRETS_DIR}/broker.password")
  fi
  (umask 077; write_kafka_secrets)
}

check_kafka_mode() {  # the data folder was formatted for the listener we are about to start?
  [[ -f "${KAFKA_DATA}/meta.properties" ]] || return 0
  local formatted
  formatted="$(cat "$KAFKA_MODE_FILE" 2>/dev/null || echo plaintext)"
  [[ "$formatted" == "$(kafka_mode)" ]] && return 0
  die "the Kafka data in ${KAFKA_DATA} was formatted for the ${formatted} listener, not $(kafka_mode) (KAFKA_SASL='${KAFKA_SASL}'): run '$0 wipe kafka' first, or use another CHATPIPE_STACK_DIR"
}

format_kafka_storage() {
  [[ -f "${KAFKA_DATA}/meta.properties" ]] && return 0
  # Not formatted, or a format that did not finish: start from an empty folder.
  rm -rf "$KAFKA_DATA"
  mkdir -p "$KAFKA_DATA"
  local id out scram=()
  id="$(random_cluster_id)"
  if [[ "$(kafka_mode)" == scram ]]; then
    local broker_pw
    broker_pw="$(cat "${SECRETS_DIR}/broker.password")"
    scram=(--add-scram "SCRAM-SHA-512=[name=\"${BROKER_USER}\",password=\"${broker_pw}\"]")
    scram+=(--add-scram "SCRAM-SHA-256=[name=\"${KAFKA_SASL_USER}\",password=\"${KAFKA_SASL_PASSWORD}\"]")
    scram+=(--add-scram "SCRAM-SHA-512=[name=\"${KAFKA_SASL_USER}\",password=\"${KAFKA_SASL_PASSWORD}\"]")
  fi
  if ! out="$(java -cp "${KAFKA_LIB}/*" -Dlog4j2.configurationFile="$KAFKA_LOG4J" \
      kafka.tools.StorageTool format -t "$id" -c "$KAFKA_PROPS" --standalone "${scram[@]}" 2>&1)"; then
    [[ -z "$KAFKA_SASL_PASSWORD" ]] || out="${out//${KAFKA_SASL_PASSWORD}/***}"
    printf '%s\n' "$out" >&2
    rm -rf "$KAFKA_DATA"
    die "formatting the Kafka storage in ${KAFKA_DATA} failed"
  fi
  kafka_mode >"$KAFKA_MODE_FILE"
  [[ "$(kafka_mode)" != scram ]] || (umask 077; client_fingerprint >"${SECRETS_DIR}/client.sha256")
  log "formatted new Kafka storage (cluster id ${id}, $(kafka_mode) listener) in ${KAFKA_DATA}"
}

start_kafka() {
  local pid
  if pid="$(kafka_pid)"; then
    apt_or_explain kcat kcat
    if [[ "$(kafka_mode)" == scram ]]; then
      [[ -s "${SECRETS_DIR}/broker.password" ]] || die "kafka (pid ${pid}) runs, but was not started in SCRAM mode: '$0 wipe kafka' first"
      (umask 077; write_kafka_secrets)
    fi
    if wait_until_up kafka "$pid" quiet; then
      [[ "$(kafka_mode)" != scram ]] || ensure_client_user
      log "kafka already running on ${HOST}:${KAFKA_PORT} (pid ${pid})"
      return 0
    fi
    die "kafka (pid ${pid}) runs but does not answer on ${HOST}:${KAFKA_PORT}: see ${KAFKA_LOG}, or '$0 restart kafka'"
  fi
  rm -f "$KAFKA_PID"
  require_free_port "$KAFKA_PORT" KAFKA_PORT kafka
  require_free_port "$KAFKA_CONTROLLER_PORT" KAFKA_CONTROLLER_PORT kafka
  command -v java >/dev/null 2>&1 || die "java is not installed: Kafka needs Java 17+ (apt-get install openjdk-17-jre-headless)"
  apt_or_explain kcat kcat
  if [[ ! -f "$KAFKA_STAMP" ]]; then
    log "Kafka ${KAFKA_VERSION} jars not in ${KAFKA_LIB}: fetching them"
    "${HERE}/install.sh" kafka
  fi

  mkdir -p "$STACK_DIR"
  check_kafka_mode
  prepare_kafka_secrets
  write_kafka_config
  format_kafka_storage

  local started=$SECONDS
  log "starting kafka ${KAFKA_VERSION} on ${HOST}:${KAFKA_PORT} (controller ${KAFKA_CONTROLLER_PORT}, heap ${KAFKA_HEAP}, dir ${STACK_DIR})"
  : >"$KAFKA_OUT"
  mark_log "$KAFKA_LOG"
  # Own session (setsid), so it outlives the shell, make or CI step that started it; the
  # inner shell writes its own pid, then becomes java (exec), so the pid file is java's.
  # shellcheck disable=SC2016,SC2086
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$KAFKA_PID" \
    java -Xms"$KAFKA_HEAP" -Xmx"$KAFKA_HEAP" \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_LOG4J" $KAFKA_JAVA_OPTS \
    -cp "${KAFKA_LIB}/*" kafka.Kafka "$KAFKA_PROPS" \
    </dev/null >>"$KAFKA_OUT" 2>&1 9>&- &
  local n=0
  until [[ -s "$KAFKA_PID" ]]; do
    sleep 0.05; n=$((n + 1)); ((n < 100)) || die "kafka did not write ${KAFKA_PID}"
  done
  pid="$(tr -dc '0-9' <"$KAFKA_PID")"
  if ! wait_until_up kafka "$pid"; then
    [[ -n "$pid" ]] && terminate "$pid" kafka
    rm -f "$KAFKA_PID"
    exit 1
  fi
  [[ "$(kafka_mode)" != scram ]] || ensure_client_user
  log "kafka is up on ${HOST}:${KAFKA_PORT} (pid ${pid}, $(kafka_mode) listener) after $((SECONDS - started))s"
}

stop_kafka() {
  local pid
  if pid="$(kafka_pid)"; then
    log "stopping kafka (pid ${pid})"
    terminate "$pid" kafka
    log "kafka stopped"
  else
    log "kafka is not running (${STACK_DIR})"
  fi
  rm -f "$KAFKA_PID"
}

# ---------------------------------------------------------------------------- redis

redis_answers() {  # in ACL mode as that user (REDISCLI_AUTH: no password on a command line)
  if [[ -n "$REDIS_ACL_USER" ]]; then
    [[ "$(REDISCLI_AUTH="$REDIS_ACL_PASSWORD" redis-cli --user "$REDIS_ACL_USER" -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
    return
  fi
  [[ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
}

redis_config_args() {  # ACL mode: a config file (mode 600) with the user; `default` is off
  [[ -n "$REDIS_ACL_USER" ]] || return 0
  (umask 077; printf 'user default off\nuser %s on >%s ~* &* +@all\n' "$REDIS_ACL_USER" "$REDIS_ACL_PASSWORD" >"$REDIS_CONF")
  printf '%s\n' "$REDIS_CONF"
}

start_redis() {
  local pid
  if pid="$(redis_pid)"; then
    if wait_until_up redis "$pid" quiet; then
      log "redis already running on ${HOST}:${REDIS_PORT} (pid ${pid})"
      return 0
    fi
    die "redis (pid ${pid}) runs but does not answer on ${HOST}:${REDIS_PORT}: see ${REDIS_LOG}, or '$0 restart-redis'"
  fi
  rm -f "$REDIS_PID"
  require_free_port "$REDIS_PORT" REDIS_PORT redis
  apt_or_explain redis-server redis-server redis-tools
  apt_or_explain redis-cli redis-tools

  mkdir -p "$REDIS_DIR"
  mark_log "$REDIS_LOG"
  local started=$SECONDS
  local persistence="no persistence"
  [[ "$REDIS_APPENDONLY" == yes ]] && persistence="AOF, fsync every second"
  log "starting redis on ${HOST}:${REDIS_PORT} (${persistence}, dir ${STACK_DIR}${REDIS_ACL_USER:+, ACL user ${REDIS_ACL_USER}})"
  local conf=()
  mapfile -t conf < <(redis_config_args)
  # No persistence by default, on purpose: the tests rely on a restart losing every key.
  # REDIS_APPENDONLY=yes keeps the data across a restart (AOF, as the compose files run it).
  redis-server "${conf[@]}" --bind "$HOST" --port "$REDIS_PORT" --protected-mode yes \
    --daemonize yes --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" --dir "$REDIS_DIR" \
    --save '' --appendonly "$REDIS_APPENDONLY" --appendfsync everysec </dev/null 9>&- \
    || { tail_logs "$REDIS_LOG"; die "redis-server did not start"; }
  # The daemon writes its pid file right after forking; give it a moment.
  local n=0
  until pid="$(pid_of "$REDIS_PID")"; do
    sleep 0.05; n=$((n + 1))
    if ((n >= 100)); then
      tail_logs "$REDIS_LOG"; die "redis-server did not write ${REDIS_PID}"
    fi
  done
  if ! wait_until_up redis "$pid"; then
    terminate "$pid" redis
    rm -f "$REDIS_PID"
    exit 1
  fi
  log "redis is up on ${HOST}:${REDIS_PORT} (pid ${pid}) after $((SECONDS - started))s"
}

stop_redis() {
  local pid
  if pid="$(redis_pid)"; then
    log "stopping redis (pid ${pid})"
    terminate "$pid" redis
    log "redis stopped"
  else
    log "redis is not running (${STACK_DIR})"
  fi
  rm -f "$REDIS_PID"
}

# ---------------------------------------------------------------------------- common

# wait_until_up SERVICE PID [quiet]: poll until the service answers a real request.
# On timeout or if the process dies: print the log tail and return 1 (unless quiet).
wait_until_up() {
  local service="$1" pid="$2" quiet="${3:-}" deadline=$((SECONDS + STACK_TIMEOUT))
  local logs=() port
  case "$service" in
    kafka) logs=("$KAFKA_LOG" "$KAFKA_OUT"); port="$KAFKA_PORT" ;;
    redis) logs=("$REDIS_LOG"); port="$REDIS_PORT" ;;
  esac
  while :; do
    "${service}_answers" && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      [[ -n "$quiet" ]] || { tail_logs "${logs[@]}"; printf 'stack.sh: error: %s (pid %s) exited during start-up; logs above\n' "$service" "$pid" >&2; }
      return 1
    fi
    if ((SECONDS >= deadline)); then
      [[ -n "$quiet" ]] || { tail_logs "${logs[@]}"; printf 'stack.sh: error: %s did not answer on %s:%s within %ss (STACK_TIMEOUT); stopping it; logs above\n' "$service" "$HOST" "$port" "$STACK_TIMEOUT" >&2; }
      return 1
    fi
    sleep 0.25
  done
}

status_of() {  # status_of SERVICE -> prints one line, returns 0 if up
  local service="$1" port pid
  case "$service" in
    kafka) port="$KAFKA_PORT" ;;
    redis) port="$REDIS_PORT" ;;
  esac
  if pid="$("${service}_pid")"; then
    if "${service}_answers"; then
      log "${service}: running on ${HOST}:${port} (pid ${pid})"
      return 0
    fi
    log "${service}: NOT ANSWERING on ${HOST}:${port} (pid ${pid} is alive; see ${STACK_DIR}/${service}.log)"
    return 1
  fi
  if port_in_use "$port"; then
    log "${service}: stopped (port ${port} is in use by another process)"
  else
    log "${service}: stopped (port ${port})"
  fi
  return 1
}

print_env() {  # secrets are printed as references to the variables that hold them
  printf 'export KAFKA_BOOTSTRAP_SERVERS=%s:%s REDIS_URL=redis://%s%s:%s/0\n' \
    "$HOST" "$KAFKA_PORT" "${REDIS_ACL_USER:+${REDIS_ACL_USER}@}" "$HOST" "$REDIS_PORT"
  if [[ "$(kafka_mode)" == scram ]]; then
    # shellcheck disable=SC2016
    printf 'export KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT KAFKA_SASL_MECHANISM=%s KAFKA_SASL_USERNAME=%s KAFKA_SASL_PASSWORD="$KAFKA_SASL_PASSWORD"\n' \
      "$KAFKA_SASL_MECHANISM" "$KAFKA_SASL_USER"
  fi
  if [[ -n "$REDIS_ACL_USER" ]]; then
    # shellcheck disable=SC2016
    printf 'export REDIS_PASSWORD="$REDIS_ACL_PASSWORD"\n'
  fi
}

wipe() {  # wipe SERVICE (already stopped)
  case "$1" in
    kafka) rm -rf "$KAFKA_DATA" "$SECRETS_DIR"; log "removed ${KAFKA_DATA}" ;;
    redis) rm -rf "$REDIS_DIR"; log "removed ${REDIS_DIR}" ;;
  esac
}

targets_of() {  # targets_of kafka|redis|all
  case "${1:-all}" in
    all) echo "kafka redis" ;;
    kafka | redis) echo "$1" ;;
    *) die "unknown target '$1' (kafka, redis or all)" ;;
  esac
}

main() {
  local cmd="${1:-}"; shift || true
  local target="all" wipe_too="" follow=""
  local arg
  for arg in "$@"; do
    case "$arg" in
      --wipe) wipe_too=1 ;;
      -f | --follow) follow=1 ;;
      kafka | redis | all) target="$arg" ;;
      *) die "unknown argument '$arg' (try: $0 help)" ;;
    esac
  done
  local services s rc=0
  read -r -a services <<<"$(targets_of "$target")"
  case "$cmd" in start | restart | restart-redis | status | env) check_secure_settings ;; esac

  case "$cmd" in
    start)
      take_lock
      for s in "${services[@]}"; do "start_${s}"; done
      print_env
      ;;
    stop)
      take_lock
      for s in "${services[@]}"; do
        "stop_${s}"
        [[ -z "$wipe_too" ]] || wipe "$s"
      done
      ;;
    restart)
      take_lock
      for s in "${services[@]}"; do "stop_${s}"; "start_${s}"; done
      print_env
      ;;
    restart-redis)
      take_lock
      stop_redis
      start_redis
      ;;
    wipe)
      take_lock
      for s in "${services[@]}"; do "stop_${s}"; wipe "$s"; done
      ;;
    status)
      log "stack ${STACK_DIR}"
      for s in "${services[@]}"; do status_of "$s" || rc=1; done
      return "$rc"
      ;;
    logs)
      local files=()
      for s in "${services[@]}"; do
        [[ -f "${STACK_DIR}/${s}.log" ]] && files+=("${STACK_DIR}/${s}.log")
      done
      ((${#files[@]})) || die "no logs in ${STACK_DIR} yet"
      if [[ -n "$follow" ]]; then exec tail -n 100 -F "${files[@]}"; fi
      tail -n 100 "${files[@]}"
      ;;
    env) print_env ;;
    help | -h | --help) usage ;;
    "") usage >&2; exit 2 ;;
    *) die "unknown command '${cmd}' (try: $0 help)" ;;
  esac
}

main "$@"
