#!/usr/bin/env bash
# PostgreSQL and Redis as this machine's services, for CI: tools/ensure_services.sh [DATABASE]
#
# Each is installed with apt-get when missing and started when down. PostgreSQL must then let
# the postgres user in over TCP from 127.0.0.1 without a password (a trust line is added to
# pg_hba.conf when it does not), and DATABASE (default ims_portal) must exist: that is what
# DATABASE_URL=postgres://postgres@127.0.0.1:5432/DATABASE in .ci/run expects.
# Redis must answer on 127.0.0.1:6379. Running both again changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

database=${1:-ims_portal}
say() { echo "ensure_services: $*"; }

wait_until() {  # wait_until SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        if [ $SECONDS -ge $deadline ]; then say "$what did not come up"; return 1; fi
        sleep 0.2
    done
}

# --- PostgreSQL ---------------------------------------------------------------------------

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
psql_postgres() { psql -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq "$@"; }
lets_us_in() { psql_postgres -c "select 1" >/dev/null 2>&1; }

if ! port_open 5432; then
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        say "installing PostgreSQL"
        tools/apt_ensure.sh postgresql
    fi
    if ! port_open 5432; then  # installing may have started it already
        version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
        if [ ! -d "/etc/postgresql/$version/main" ]; then
            say "creating the PostgreSQL $version cluster main"
            pg_createcluster "$version" main >/dev/null
        fi
        say "starting PostgreSQL $version"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
    wait_until 30 PostgreSQL port_open 5432
fi

command -v psql >/dev/null || tools/apt_ensure.sh postgresql-client:psql
if ! lets_us_in; then
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | sort -V | tail -n 1)
    say "letting postgres in from 127.0.0.1 without a password ($hba)"
    sed -i '1i host all postgres 127.0.0.1/32 trust  # added by tools/ensure_services.sh for CI' "$hba"
    version=$(basename "$(dirname "$(dirname "$hba")")")
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    wait_until 10 "password-less login" lets_us_in
fi

if [ -z "$(psql_postgres -c "select 1 from pg_database where datname = '$database'")" ]; then
    say "creating database $database"
    psql_postgres -c "create database \"$database\""
fi
say "PostgreSQL answers at 127.0.0.1:5432 (database $database)"

# --- Redis --------------------------------------------------------------------------------

redis_answers() {
    (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && read -r -t 2 reply <&3 \
        && [[ $reply == +PONG* ]]) 2>/dev/null
}

if ! redis_answers; then
    tools/apt_ensure.sh redis-server:redis-server
    if ! redis_answers; then  # installing may have started it already
        say "starting Redis"
        service redis-server start >/dev/null 2>&1 \
            || redis-server /etc/redis/redis.conf --daemonize yes --bind 127.0.0.1 --port 6379
    fi
    wait_until 30 Redis redis_answers
fi
say "Redis answers at 127.0.0.1:6379"
