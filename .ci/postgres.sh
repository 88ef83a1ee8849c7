# Sourced by .ci/run: make sure a PostgreSQL server answers on 127.0.0.1:5432 for
# tests/test_distributed.py and export HARNESS_TEST_POSTGRES_URL for it.
#
# Uses the server running there if any; otherwise installs Debian's postgresql and starts its
# cluster. User postgres must get in over TCP: by trust where the server allows it, else with a
# password this script sets (as root, through the local socket). If any step fails it says why
# and goes on: the PostgreSQL tests then skip with the reason.

ci_pg_host=127.0.0.1
ci_pg_port=5432
ci_pg_password=harness-ci

ci_pg_answers() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$ci_pg_host" -p "$ci_pg_port" -t 3
  else
    timeout 3 bash -c "exec 3<>/dev/tcp/$ci_pg_host/$ci_pg_port" 2>/dev/null
  fi
}

ci_pg_login() {  # $1: password or empty; true when user postgres gets in over TCP
  command -v psql >/dev/null 2>&1 || return 1
  PGPASSWORD="$1" PGCONNECT_TIMEOUT=5 psql -w -h "$ci_pg_host" -p "$ci_pg_port" -U postgres -d postgres \
    -tAc 'select 1' >/dev/null 2>&1
}

ci_pg_as_postgres() {  # run a command as the postgres OS user (needs root)
  if command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$*"; fi
}

ci_pg_start() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "ci: no PostgreSQL server on $ci_pg_host:$ci_pg_port; installing Debian's postgresql"
    if [ "$(id -u)" != 0 ]; then echo "ci: not root: cannot install postgresql"; return 1; fi
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq >/dev/null || { echo "ci: apt-get update failed"; return 1; }
    timeout 900 apt-get install -y -qq postgresql >/dev/null || { echo "ci: apt-get install postgresql failed"; return 1; }
  fi
  local version
  version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1)
  if [ -z "$version" ]; then echo "ci: postgresql is installed but no server version is found"; return 1; fi
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | grep -x "$version main" >/dev/null; then
    pg_createcluster "$version" main >/dev/null || { echo "ci: pg_createcluster $version main failed"; return 1; }
  fi
  echo "ci: starting PostgreSQL $version (cluster main)"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start \
    || { echo "ci: pg_ctlcluster $version main start failed"; return 1; }
  for _ in $(seq 30); do ci_pg_answers && return 0; sleep 1; done
  echo "ci: PostgreSQL $version started but does not answer on $ci_pg_host:$ci_pg_port"
  return 1
}

ci_pg_setup() {
  ci_pg_answers || ci_pg_start || return 1
  if ci_pg_login ""; then  # trust auth on 127.0.0.1 (this machine kind's server)
    HARNESS_TEST_POSTGRES_URL="postgresql://postgres@$ci_pg_host:$ci_pg_port/postgres"
  elif ci_pg_login "$ci_pg_password"; then
    HARNESS_TEST_POSTGRES_URL="postgresql://postgres:$ci_pg_password@$ci_pg_host:$ci_pg_port/postgres"
  elif [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && \
       ci_pg_as_postgres psql -q -p "$ci_pg_port" -c "ALTER USER postgres PASSWORD '$ci_pg_password'" >/dev/null 2>&1 && \
       ci_pg_login "$ci_pg_password"; then  # Debian's default: password (scram) auth over TCP
    HARNESS_TEST_POSTGRES_URL="postgresql://postgres:$ci_pg_password@$ci_pg_host:$ci_pg_port/postgres"
  elif ! command -v psql >/dev/null 2>&1; then  # cannot check without psql: let the tests try
    HARNESS_TEST_POSTGRES_URL="postgresql://postgres@$ci_pg_host:$ci_pg_port/postgres"
  else
    echo "ci: PostgreSQL answers on $ci_pg_host:$ci_pg_port but user postgres cannot log in over TCP"
    return 1
  fi
  export HARNESS_TEST_POSTGRES_URL
  echo "ci: PostgreSQL for the distributed tests: ${HARNESS_TEST_POSTGRES_URL/:$ci_pg_password@/:***@}"
}

ci_pg_setup || echo "ci: going on without PostgreSQL: its tests will skip and say why"
