-- Least-privilege roles for a rillet-dagster deployment on PostgreSQL (psql 15 or later).
--
--   rillet_code      the code location (code server, daemon, runs, `rillet-dagster events`):
--                    owns the warehouse and the state databases and everything in them.
--   rillet_receiver  the webhook receiver: may add events to the queue (rillet_webhook_events)
--                    and count redeliveries of an event it holds; it cannot read bodies, change
--                    or delete events, touch any other table, create anything, or connect to
--                    the warehouse.
--   rillet_analyst   read-only on the warehouse, including tables created later; cannot
--                    connect to the state database.
--
-- Run it as a superuser, against any database of the server; rerunning it is safe (it creates
-- what is missing, sets the passwords again, and grants exactly what is listed here):
--
--   RILLET_CODE_PG_PASSWORD=... RILLET_RECEIVER_PG_PASSWORD=... RILLET_ANALYST_PG_PASSWORD=... \
--     psql "postgresql://postgres@HOST:5432/postgres" -v ON_ERROR_STOP=1 -f docker/postgres-roles.sql
--
-- psql variables (-v name=value), all optional:
--   warehouse_db   (default rillet_warehouse)   state_db       (default rillet_state)
--   code_role      (default rillet_code)         receiver_role  (default rillet_receiver)
--   analyst_role   (default rillet_analyst)
--   code_password, receiver_password, analyst_password: otherwise read from the environment
--   variables RILLET_CODE_PG_PASSWORD, RILLET_RECEIVER_PG_PASSWORD, RILLET_ANALYST_PG_PASSWORD
--   (the environment keeps them out of the process list).
--
-- The databases are created if missing and given to the code role. The webhook queue table is
-- created here, as the code role, because the receiver's grants are per column and need the
-- table to exist; its definition is rillet_dagster/warehouse/state.py's, and
-- tests/integration/test_least_privilege.py checks that the two agree. Every other table is
-- created by the code location itself when it first runs.

\set ON_ERROR_STOP on
\set QUIET on
SET client_min_messages = warning;

\if :{?warehouse_db}
\else
  \set warehouse_db rillet_warehouse
\endif
\if :{?state_db}
\else
  \set state_db rillet_state
\endif
\if :{?code_role}
\else
  \set code_role rillet_code
\endif
\if :{?receiver_role}
\else
  \set receiver_role rillet_receiver
\endif
\if :{?analyst_role}
\else
  \set analyst_role rillet_analyst
\endif
\if :{?code_password}
\else
  \getenv code_password RILLET_CODE_PG_PASSWORD
\endif
\if :{?receiver_password}
\else
  \getenv receiver_password RILLET_RECEIVER_PG_PASSWORD
\endif
\if :{?analyst_password}
\else
  \getenv analyst_password RILLET_ANALYST_PG_PASSWORD
\endif

-- Refuse before changing anything: a missing password, or one database for both purposes
-- (the receiver and the analysts are kept apart by database).
\if :{?code_password}
\else
  \set code_password ''
\endif
\if :{?receiver_password}
\else
  \set receiver_password ''
\endif
\if :{?analyst_password}
\else
  \set analyst_password ''
\endif
SELECT
  :'code_password' = '' AS no_code_password,
  :'receiver_password' = '' AS no_receiver_password,
  :'analyst_password' = '' AS no_analyst_password,
  :'warehouse_db' = :'state_db' AS same_database \gset
\if :no_code_password
  DO $$ BEGIN RAISE EXCEPTION 'set RILLET_CODE_PG_PASSWORD (or psql -v code_password=...)'; END $$;
\endif
\if :no_receiver_password
  DO $$ BEGIN RAISE EXCEPTION 'set RILLET_RECEIVER_PG_PASSWORD (or psql -v receiver_password=...)'; END $$;
\endif
\if :no_analyst_password
  DO $$ BEGIN RAISE EXCEPTION 'set RILLET_ANALYST_PG_PASSWORD (or psql -v analyst_password=...)'; END $$;
\endif
\if :same_database
  DO $$ BEGIN RAISE EXCEPTION 'warehouse_db and state_db must be two different databases'; END $$;
\endif

-- Roles: login only, no other power; passwords are (re)set on every run, which rotates them.
SELECT format('CREATE ROLE %I', name)
  FROM unnest(ARRAY[:'code_role', :'receiver_role', :'analyst_role']) AS name
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) \gexec
ALTER ROLE :"code_role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'code_password';
ALTER ROLE :"receiver_role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
  NOBYPASSRLS PASSWORD :'receiver_password';
ALTER ROLE :"analyst_role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
  NOBYPASSRLS PASSWORD :'analyst_password';

-- Databases, owned by the code role. PUBLIC loses CONNECT and TEMP: only the roles named
-- below reach each database.
SELECT format('CREATE DATABASE %I OWNER %I', name, :'code_role')
  FROM unnest(ARRAY[:'warehouse_db', :'state_db']) AS name
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = name) \gexec
ALTER DATABASE :"warehouse_db" OWNER TO :"code_role";
ALTER DATABASE :"state_db" OWNER TO :"code_role";
REVOKE ALL ON DATABASE :"warehouse_db" FROM PUBLIC, :"receiver_role", :"analyst_role";
REVOKE ALL ON DATABASE :"state_db" FROM PUBLIC, :"receiver_role", :"analyst_role";
GRANT CONNECT ON DATABASE :"warehouse_db" TO :"analyst_role";
GRANT CONNECT ON DATABASE :"state_db" TO :"receiver_role";

-- The warehouse: the code role owns the schema; analysts read every table, present and future.
\connect :"warehouse_db"
SET client_min_messages = warning;
ALTER SCHEMA public OWNER TO :"code_role";
REVOKE ALL ON SCHEMA public FROM PUBLIC, :"receiver_role", :"analyst_role";
GRANT USAGE ON SCHEMA public TO :"analyst_role";
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM :"analyst_role";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"analyst_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"code_role" IN SCHEMA public
  GRANT SELECT ON TABLES TO :"analyst_role";

-- The state database: the queue, the rate budget and the sync's bookkeeping, owned by the code
-- role. The receiver sees the schema and, of the queue, only what its statements need:
--   INSERT ... ON CONFLICT (id) DO UPDATE SET duplicates = duplicates + 1,
--     last_duplicate_at = excluded.received_at RETURNING duplicates
--   UPDATE ... SET duplicates = duplicates + 1, last_duplicate_at = ... WHERE id = ...
\connect :"state_db"
SET client_min_messages = warning;
ALTER SCHEMA public OWNER TO :"code_role";
REVOKE ALL ON SCHEMA public FROM PUBLIC, :"receiver_role", :"analyst_role";
GRANT USAGE ON SCHEMA public TO :"receiver_role";

SET ROLE :"code_role";
CREATE TABLE IF NOT EXISTS rillet_webhook_events (
  id VARCHAR(36) NOT NULL,
  entity VARCHAR(64) NOT NULL,
  event VARCHAR(64) NOT NULL,
  received_at TIMESTAMP WITH TIME ZONE NOT NULL,
  event_timestamp TIMESTAMP WITH TIME ZONE NOT NULL,
  body BYTEA NOT NULL,
  status VARCHAR(16) NOT NULL,
  attempts INTEGER DEFAULT 0 NOT NULL,
  duplicates INTEGER DEFAULT 0 NOT NULL,
  last_duplicate_at TIMESTAMP WITH TIME ZONE,
  applied_at TIMESTAMP WITH TIME ZONE,
  run_id VARCHAR(64),
  error TEXT,
  PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS ix_rillet_webhook_events_status_received
  ON rillet_webhook_events (status, received_at);
COMMENT ON COLUMN rillet_webhook_events.id IS 'X-Rillet-Id, lower-case';
COMMENT ON COLUMN rillet_webhook_events.entity IS 'canonical X-Rillet-Entity (INVOICE)';
COMMENT ON COLUMN rillet_webhook_events.event IS 'canonical X-Rillet-Event (CREATED)';
COMMENT ON COLUMN rillet_webhook_events.event_timestamp IS 'X-Rillet-Timestamp';
COMMENT ON COLUMN rillet_webhook_events.body IS 'raw request body, byte for byte';
RESET ROLE;
-- A queue created earlier by another role (a first start as a superuser) changes hands.
ALTER TABLE rillet_webhook_events OWNER TO :"code_role";

REVOKE ALL ON ALL TABLES IN SCHEMA public FROM :"receiver_role", :"analyst_role";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM :"receiver_role", :"analyst_role";
GRANT INSERT ON rillet_webhook_events TO :"receiver_role";
GRANT SELECT (id, duplicates, received_at), UPDATE (duplicates, last_duplicate_at)
  ON rillet_webhook_events TO :"receiver_role";

\echo rillet roles ready: :code_role owns :warehouse_db and :state_db, :receiver_role may add to the webhook queue, :analyst_role reads :warehouse_db
