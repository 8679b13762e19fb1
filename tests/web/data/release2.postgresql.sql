-- A data dir as release 2 (schema v2: users, sessions, the model registry) left it on PostgreSQL, written by
-- hand from that release's tables as SQLAlchemy created them there: native enum types, SERIAL ids, timestamps
-- with time zone and a 32-bit model.size, so the upgrade test starts from a database the current code never
-- touched. The rows are those of release2.sql.
CREATE TYPE role AS ENUM ('ADMIN', 'USER');
CREATE TYPE modeltype AS ENUM ('CHECKPOINT', 'EMBEDDING', 'LORA', 'CONTROLNET', 'HYPERNETWORK', 'VAE');
CREATE TYPE modelstatus AS ENUM ('INITIAL', 'ACTIVE', 'FAILED');
CREATE TYPE visibility AS ENUM ('PRIVATE', 'EVERYONE');
CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL);
INSERT INTO schema_version (id, version) VALUES (1, 2);
CREATE TABLE "user" (
	username VARCHAR(64) NOT NULL,
	role role NOT NULL,
	id SERIAL NOT NULL,
	password_hash VARCHAR NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	password_changed_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_user_username ON "user" (username);
CREATE TABLE login_session (
	token_hash VARCHAR(64) NOT NULL,
	user_id INTEGER NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
	last_seen_at TIMESTAMP WITH TIME ZONE NOT NULL,
	client_address VARCHAR(64),
	user_agent VARCHAR(256),
	PRIMARY KEY (token_hash),
	FOREIGN KEY(user_id) REFERENCES "user" (id) ON DELETE CASCADE
);
CREATE INDEX ix_login_session_expires_at ON login_session (expires_at);
CREATE INDEX ix_login_session_user_id ON login_session (user_id);
CREATE TABLE model (
	id VARCHAR(32) NOT NULL,
	name VARCHAR(255) NOT NULL,
	type modeltype NOT NULL,
	base VARCHAR(32),
	status modelstatus NOT NULL,
	failure_reason VARCHAR,
	size INTEGER NOT NULL,
	sha256 VARCHAR(64),
	autov2 VARCHAR(10),
	lora_hash VARCHAR(64),
	file_format VARCHAR(16),
	store_key VARCHAR(512),
	local_path VARCHAR,
	source VARCHAR(16) NOT NULL,
	source_detail VARCHAR,
	owner_id INTEGER,
	visibility visibility NOT NULL,
	description VARCHAR,
	metadata_json VARCHAR,
	preview_key VARCHAR(512),
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_model_type_name UNIQUE (type, name),
	FOREIGN KEY(owner_id) REFERENCES "user" (id) ON DELETE SET NULL
);
CREATE INDEX ix_model_name ON model (name);
CREATE INDEX ix_model_owner_id ON model (owner_id);
CREATE INDEX ix_model_sha256 ON model (sha256);
CREATE INDEX ix_model_status ON model (status);
CREATE INDEX ix_model_type ON model (type);
INSERT INTO "user" (username, role, id, password_hash, created_at, password_changed_at)
	VALUES ('admin', 'ADMIN', 1, '$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g', '2026-11-01 10:00:00+00', '2026-11-01 10:00:00+00');
INSERT INTO login_session (token_hash, user_id, created_at, expires_at, last_seen_at, client_address, user_agent)
	VALUES ('0000000000000000000000000000000000000000000000000000000000000001', 1, '2026-11-01 10:00:00+00', '2099-01-01 00:00:00+00', '2026-11-01 10:00:00+00', '127.0.0.1', 'test');
INSERT INTO model (id, name, type, base, status, size, sha256, autov2, file_format, store_key, source, owner_id, visibility, created_at, updated_at)
	VALUES ('m1', 'kept-model', 'CHECKPOINT', 'sd1', 'ACTIVE', 1234, 'abababababababababababababababababababababababababababababababab', 'abababab', 'safetensors', 'models/ab/abab.safetensors', 'upload', 1, 'EVERYONE', '2026-11-01 10:00:00+00', '2026-11-01 10:00:00+00');
SELECT setval('user_id_seq', 1);
