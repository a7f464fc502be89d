"""PostgreSQL for the conversation store (issue 17): reachable by the pods that use it and no
other, with its password from a Secret, its data on a claim, probed with pg_isready, and backed up
nightly by a script that keeps the newest dumps.

k8s/base/postgres/ (StatefulSet, Service, init script, backup CronJob) and the conversation
service (k8s/base/services/conversation.yaml), both overlays.
"""

from __future__ import annotations

import base64
import os
import posixpath
import re
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from devtools.k8s import connectivity, manifests
from devtools.k8s.manifests import Obj, PodTemplate
from services.common import config as common_config
from services.conversation.config import ConversationConfig
from tests.k8s import test_config_keys

SECRET = "postgres"
SECRET_KEYS = {"password", "superuser-password", "replay-password"}
REPLAY_ROLE = "colloquy_replay"  # read-only: the RLHF job's replay evaluation
ROLE = DATABASE = "colloquy"
BACKUP = "CronJob/postgres-backup"
RLHF_HEAD = "RayJob/rlhf-*:head"
# Who may connect to PostgreSQL: the materializer, the readers (gateway, prompt, the RLHF job's
# replay evaluation on its head) and the backup.
CLIENTS = {"StatefulSet/conversation", "StatefulSet/gateway", "StatefulSet/prompt", RLHF_HEAD, BACKUP}


def _pod(objects: list[Obj], owner: str) -> tuple[PodTemplate, dict[str, Any]]:
    (pt,) = [p for p in manifests.all_pod_templates(objects) if p.owner == owner]
    (container,) = pt.containers()
    return pt, container


def _env(objects: list[Obj], container: dict[str, Any]) -> dict[str, manifests.EnvValue]:
    return manifests.effective_env(container, manifests.by_kind(objects, "ConfigMap"))


def _is_postgres_secret(name: str, overlay: str) -> bool:
    # dev: the overlay's secretGenerator, without a name hash (the RLHF RayJob template, data that
    # kustomize does not rewrite, names it); prod: the Secret whoever deploys creates.
    return name == SECRET


def _postgres(objects: list[Obj]) -> tuple[Obj, dict[str, Any]]:
    sts = manifests.by_kind(objects, "StatefulSet")["postgres"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return sts, container


def test_conversation_dials_postgres_with_the_password_from_the_secret_not_the_url(
        objects: list[Obj], overlay: str) -> None:
    """DATABASE_URL names the postgres Service and carries no password (libpq reads PGPASSWORD,
    so a password needs no URL escaping and the URL can be logged); the service loads it as its
    store (not the SQLite default)."""
    _, container = _pod(objects, "StatefulSet/conversation")
    env = _env(objects, container)
    url = env["DATABASE_URL"].value or ""
    parts = urlsplit(url)
    assert parts.scheme == "postgresql+psycopg" and parts.password is None, url
    assert (parts.username, parts.path) == (ROLE, f"/{DATABASE}")
    (dial,) = [d for d in connectivity.dials(objects)
               if d.source.owner == "StatefulSet/conversation" and d.var == "DATABASE_URL"]
    target = connectivity.resolve(objects, dial)
    assert (target.what, target.port) == ("Service/postgres", 5432)
    secret = env["PGPASSWORD"].secret
    assert secret is not None and _is_postgres_secret(secret[0], overlay) and secret[1] == "password"
    cfg = common_config.load(ConversationConfig, environ=test_config_keys.resolve(env))
    assert cfg.url == url


def test_only_the_conversation_service_and_the_backup_may_reach_postgres(objects: list[Obj]) -> None:
    """NetworkPolicy at both ends (generated dials-*/dialed-postgres): every other pod of the
    render is refused on 5432, so a new reader must be configured with DATABASE_URL to get in."""
    pols = connectivity.policies(objects)
    pg, port = _postgres(objects)[0]["spec"]["template"]["metadata"]["labels"], 5432
    allowed = {pt.owner for pt in manifests.all_pod_templates(objects)
               if connectivity.admits(pols, pt.labels, "Egress", pg, port, "postgres")
               and connectivity.admits(pols, pg, "Ingress", pt.labels, port, "postgres")}
    assert allowed == CLIENTS
    # PostgreSQL itself dials nothing but DNS.
    egress = [p["metadata"]["name"] for p in pols if "Egress" in p["spec"].get("policyTypes", [])
              and manifests.selects(p["spec"]["podSelector"], pg)]
    assert sorted(egress) == ["allow-dns", "default-deny"]


def test_every_postgres_secret_reference_names_a_key_the_secret_has(objects: list[Obj], overlay: str) -> None:
    """dev generates the Secret (every key, non-empty); prod leaves it to whoever deploys, under
    the plain name the references use (k8s/README.md, "PostgreSQL")."""
    refs = {(pt.owner, e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for pt in manifests.all_pod_templates(objects) for c in pt.containers() for e in c.get("env", [])
            if _is_postgres_secret(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name", ""), overlay)}
    assert {owner for owner, _, _ in refs} == {"StatefulSet/postgres"} | CLIENTS
    assert {key for _, _, key in refs} == SECRET_KEYS
    secrets = {n: s for n, s in manifests.by_kind(objects, "Secret").items() if _is_postgres_secret(n, overlay)}
    if overlay == "prod":
        assert not secrets and {name for _, name, _ in refs} == {SECRET}
        return
    (secret,) = secrets.values()
    assert {name for _, name, _ in refs} == set(secrets)
    assert set(secret["data"]) == SECRET_KEYS
    assert all(base64.b64decode(v) for v in secret["data"].values())


def test_postgres_keeps_its_data_on_its_own_claim(objects: list[Obj]) -> None:
    sts, container = _postgres(objects)
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert sts["spec"]["replicas"] == 1  # a second replica would be a second database, not a standby
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    pgdata = _env(objects, container)["PGDATA"].value or ""
    # initdb needs an empty directory: below the mount, whose root may hold lost+found.
    assert posixpath.dirname(pgdata) == mount["mountPath"]
    # A recursive fsGroup pass would make the data directory group-writable: PostgreSQL refuses it.
    assert sts["spec"]["template"]["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    # The socket directory is writable although the root filesystem is not.
    assert "/var/run/postgresql" in {m["mountPath"] for m in container["volumeMounts"]}


def test_postgres_probes_ask_pg_isready_over_tcp_for_the_role_and_database(objects: list[Obj]) -> None:
    """Over TCP, so the entrypoint's socket-only temporary server (initdb) does not count as up."""
    _, container = _postgres(objects)
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "postgres"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == [
            "pg_isready", "--host=127.0.0.1", f"--port={port}", f"--username={ROLE}", f"--dbname={DATABASE}"], probe
    service = manifests.by_kind(objects, "Service")["postgres"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, "postgres")]


def test_init_script_creates_the_role_and_database_the_clients_use(objects: list[Obj]) -> None:
    """The application's role owns its database and is no superuser; its password is the Secret's."""
    script = manifests.by_kind(objects, "ConfigMap")["postgres-init"]["data"]["10-colloquy.sh"]
    assert f"CREATE ROLE {ROLE} LOGIN PASSWORD :'app_password';" in script
    assert f"CREATE DATABASE {DATABASE} OWNER {ROLE};" in script
    assert "SUPERUSER" not in script.upper()
    _, container = _postgres(objects)
    env = _env(objects, container)
    assert '--set=app_password="$COLLOQUY_PASSWORD"' in script
    assert env["COLLOQUY_PASSWORD"].secret is not None and env["COLLOQUY_PASSWORD"].secret[1] == "password"
    assert env["POSTGRES_PASSWORD"].secret is not None and env["POSTGRES_PASSWORD"].secret[1] == "superuser-password"
    # The read-only role: SELECT only, on the tables the application role creates now and later.
    replay_script = manifests.by_kind(objects, "ConfigMap")["postgres-init"]["data"]["20-colloquy-replay.sh"]
    assert f"CREATE ROLE {REPLAY_ROLE} LOGIN PASSWORD :'replay_password';" in replay_script
    assert f"FOR ROLE {ROLE} IN SCHEMA public GRANT SELECT ON TABLES TO {REPLAY_ROLE};" in replay_script
    assert not re.search(r"GRANT (ALL|INSERT|UPDATE|DELETE|TRUNCATE)", replay_script)
    replay_env = env["COLLOQUY_REPLAY_PASSWORD"]
    assert replay_env.secret is not None and replay_env.secret[1] == "replay-password"
    _, backup = _pod(objects, BACKUP)
    url = _env(objects, backup)["DATABASE_URL"].value or ""
    parts = urlsplit(url)
    assert (parts.username, parts.path, parts.password) == (ROLE, f"/{DATABASE}", None), url


def _backup_script(objects: list[Obj]) -> str:
    _, container = _pod(objects, BACKUP)
    assert container["command"][:2] == ["/bin/sh", "-c"]
    return str(container["command"][2])


def test_backup_runs_nightly_with_the_servers_image(objects: list[Obj]) -> None:
    cron = manifests.by_kind(objects, "CronJob")["postgres-backup"]["spec"]
    minute, hour, *rest = cron["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["timeZone"] == "Etc/UTC"
    pt, container = _pod(objects, BACKUP)
    assert container["image"] == _postgres(objects)[1]["image"]  # pg_dump of the server's major version
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/backups"]
    (volume,) = [v for v in pt.spec["volumes"] if v["name"] == mount["name"]]
    claim = manifests.by_kind(objects, "PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert 'pg_dump --no-password --format=custom --dbname="$DATABASE_URL"' in _backup_script(objects)


FAKE_PG_DUMP = """#!/bin/sh
# pg_dump --no-password --format=custom --dbname=URL --file=PATH: record the URL, write a dump.
for a in "$@"; do case "$a" in --file=*) f="${a#--file=}";; --dbname=*) u="${a#--dbname=}";; esac; done
[ "$PGPASSWORD" = "from-a-secret" ] || exit 3
printf 'PGDMP %s' "$u" > "$f"
"""
FAKE_PG_RESTORE = """#!/bin/sh
# pg_restore --list PATH: fails on anything that is not a dump.
head -c 5 "$2" | grep -q PGDMP
"""


def test_backup_script_writes_a_dump_and_keeps_only_the_newest(objects: list[Obj], tmp_path: Path) -> None:
    """The CronJob's own script, run with stand-in pg_dump/pg_restore: a new dump named by the
    time, leftovers of a failed run removed, the newest BACKUP_KEEP kept."""
    bin_dir, backups = tmp_path / "bin", tmp_path / "backups"
    bin_dir.mkdir()
    backups.mkdir()
    for name, text in (("pg_dump", FAKE_PG_DUMP), ("pg_restore", FAKE_PG_RESTORE)):
        (bin_dir / name).write_text(text, encoding="utf-8")
        (bin_dir / name).chmod(stat.S_IRWXU)
    old = [f"colloquy-2026010{i}T023000Z.dump" for i in range(1, 5)]
    for name in old:
        (backups / name).write_text("PGDMP old", encoding="utf-8")
    (backups / "colloquy-20260105T023000Z.dump.partial").write_text("cut short", encoding="utf-8")
    _, container = _pod(objects, BACKUP)
    env = test_config_keys.resolve(_env(objects, container))
    script = _backup_script(objects).replace("/backups", str(backups))
    proc = subprocess.run(["sh", "-c", script], env={**env, "BACKUP_KEEP": "3",
                                                     "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    kept = sorted(p.name for p in backups.iterdir())
    new = [n for n in kept if n not in old]
    assert len(new) == 1 and re.fullmatch(r"colloquy-\d{8}T\d{6}Z\.dump", new[0]), kept
    assert kept == sorted([*old[-2:], new[0]])  # the two newest old ones and the new one
    assert (backups / new[0]).read_text(encoding="utf-8") == f"PGDMP {env['DATABASE_URL']}"


def test_backup_script_fails_and_keeps_the_old_dumps_when_pg_dump_fails(objects: list[Obj], tmp_path: Path) -> None:
    bin_dir, backups = tmp_path / "bin", tmp_path / "backups"
    bin_dir.mkdir()
    backups.mkdir()
    (bin_dir / "pg_dump").write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    (bin_dir / "pg_dump").chmod(stat.S_IRWXU)
    old = [f"colloquy-2026010{i}T023000Z.dump" for i in range(1, 5)]
    for name in old:
        (backups / name).write_text("PGDMP old", encoding="utf-8")
    script = _backup_script(objects).replace("/backups", str(backups))
    proc = subprocess.run(["sh", "-c", script], env={"BACKUP_KEEP": "1", "DATABASE_URL": "postgresql://x@postgres/db",
                                                     "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0  # the Job fails (and is counted), nothing is pruned
    assert sorted(p.name for p in backups.iterdir() if p.suffix == ".dump") == old


@pytest.mark.parametrize("name", ["conversation", "postgres"])
def test_prod_gives_the_database_and_its_writers_production_sizes(render, name: str) -> None:  # type: ignore[no-untyped-def]
    dev, prod = (manifests.by_kind(render(o), "StatefulSet")[name] for o in manifests.OVERLAYS)
    if name == "conversation":
        assert prod["spec"]["replicas"] > dev["spec"]["replicas"] == 1
        return

    def memory(sts: Obj) -> str:
        return str(sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])

    def storage(sts: Obj) -> str:
        return str(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])

    assert (memory(dev), storage(dev)) == ("1Gi", "5Gi")
    assert (memory(prod), storage(prod)) == ("4Gi", "100Gi")


# -- The manifests' database scripts against a real PostgreSQL (Debian's package; skipped without) --

# The restore command k8s/README.md gives ("PostgreSQL" / "Restore"), run below against a real server.
RESTORE = 'pg_restore --clean --if-exists --no-owner --single-transaction --exit-on-error --dbname="$DATABASE_URL"'
# URL-unsafe on purpose: the password never goes into a URL.
TRICKY_PASSWORD = "p@ss/w:rd#?%&'"


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def pg_server() -> Any:
    """A throwaway server with password authentication over TCP, like the image's: (bin, port).
    As root (PostgreSQL refuses to run as root) its files belong to Debian's `postgres` user."""
    import pwd
    import shutil
    import tempfile

    from devtools.procs import free_port

    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (/usr/lib/postgresql/*/bin: Debian's postgresql package)")
    owner = []
    base = Path(tempfile.mkdtemp(prefix="colloquy-k8s-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user to own the server")
        os.chown(base, user.pw_uid, user.pw_gid)
        owner = ["runuser", "-u", "postgres", "--"]
    (base / "pw").write_text("superuser-secret\n", encoding="utf-8")
    if owner:
        os.chown(base / "pw", user.pw_uid, user.pw_gid)
    port = free_port()
    data = base / "data"

    def run(*args: str) -> None:
        subprocess.run([*owner, *args], check=True, capture_output=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(base / "pw"),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start a test PostgreSQL: {exc.stderr!r}")
    try:
        yield bin_dir, base, port
    finally:
        subprocess.run([*owner, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_init_script_url_password_backup_and_restore_work_on_a_real_postgresql(
        render, pg_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The chain the manifests rely on, with real binaries: the init script (as the image's
    entrypoint runs it) creates the role and database; the conversation service's DATABASE_URL
    plus PGPASSWORD (a password no URL could carry unescaped) migrates the store as that role;
    the backup script's pg_dump writes a dump; the README's restore command restores it."""
    from services.conversation.db import ConversationDB

    bin_dir, socket_dir, port = pg_server
    objects = render("dev")
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    script = tmp_path / "10-colloquy.sh"
    script.write_text(manifests.by_kind(objects, "ConfigMap")["postgres-init"]["data"]["10-colloquy.sh"],
                      encoding="utf-8")
    script.chmod(stat.S_IRWXU)
    # The entrypoint's environment: its temporary server on the local socket, the superuser.
    init = subprocess.run([str(script)], env={"PATH": path, "POSTGRES_USER": "postgres", "POSTGRES_DB": "postgres",
                                              "COLLOQUY_PASSWORD": TRICKY_PASSWORD, "PGHOST": str(socket_dir),
                                              "PGPORT": str(port)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert init.returncode == 0, init.stderr

    def here(url: str) -> str:  # the Service's address -> this server
        assert "@postgres:5432/" in url, url
        return url.replace("@postgres:5432/", f"@127.0.0.1:{port}/")

    _, container = _pod(objects, "StatefulSet/conversation")
    url = here(_env(objects, container)["DATABASE_URL"].value or "")
    monkeypatch.setenv("PGPASSWORD", "not-the-password")
    refused = ConversationDB(url)
    with pytest.raises(Exception, match="password authentication failed"):
        refused.ping()
    refused.close()
    monkeypatch.setenv("PGPASSWORD", TRICKY_PASSWORD)
    db = ConversationDB(url)
    try:
        assert db.migrate()
        revision = db.schema_revision()
        assert revision
    finally:
        db.close()

    # The read-only role (20-colloquy-replay.sh, run by the entrypoint after 10-colloquy.sh, and
    # again by hand on older volumes: idempotent) for the RLHF head's replay evaluation: with the
    # head's DATABASE_URL and its Secret key it reads the store; the server refuses it a write.
    import sqlalchemy as sa

    from rlhf import replay
    from services.conversation.db import make_engine

    replay_script = tmp_path / "20-colloquy-replay.sh"
    replay_script.write_text(manifests.by_kind(objects, "ConfigMap")["postgres-init"]["data"]["20-colloquy-replay.sh"],
                             encoding="utf-8")
    replay_script.chmod(stat.S_IRWXU)
    for _ in range(2):
        made = subprocess.run([str(replay_script)], env={"PATH": path, "POSTGRES_USER": "postgres",
                                                         "COLLOQUY_REPLAY_PASSWORD": TRICKY_PASSWORD[::-1],
                                                         "PGHOST": str(socket_dir), "PGPORT": str(port)},
                              capture_output=True, text=True, timeout=60, check=False)
        assert made.returncode == 0, made.stderr
    _, head = _pod(objects + manifests.embedded_objects(objects), RLHF_HEAD)
    head_env = _env(objects, head)
    assert head_env["PGPASSWORD"].secret == (SECRET, "replay-password")
    reader_url = here(head_env["DATABASE_URL"].value or "")
    assert urlsplit(reader_url).username == REPLAY_ROLE
    monkeypatch.setenv("PGPASSWORD", TRICKY_PASSWORD[::-1])
    window = replay.window_for(2**42, 24.0, "", 64, False)
    assert replay.read_turns(reader_url, window) == []
    engine = make_engine(reader_url)
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text("DELETE FROM turns"))
    finally:
        engine.dispose()
    monkeypatch.setenv("PGPASSWORD", TRICKY_PASSWORD)

    _, backup = _pod(objects, BACKUP)
    env = {**test_config_keys.resolve(_env(objects, backup)), "PGPASSWORD": TRICKY_PASSWORD, "PATH": path}
    env["DATABASE_URL"] = here(env["DATABASE_URL"])
    backups = tmp_path / "backups"
    backups.mkdir()
    dumped = subprocess.run(["sh", "-c", _backup_script(objects).replace("/backups", str(backups))], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert dumped.returncode == 0, dumped.stderr
    (dump,) = backups.glob("colloquy-*.dump")

    readme = (manifests.K8S / "README.md").read_text(encoding="utf-8")
    assert RESTORE.replace('"', '\\"') in readme, "k8s/README.md's restore command changed: update RESTORE"
    restored = subprocess.run(["sh", "-c", f"{RESTORE} {dump}"], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
    assert restored.returncode == 0, restored.stderr
    db = ConversationDB(url)
    try:
        assert db.schema_revision() == revision and db.migrate() == []
    finally:
        db.close()
    # The dump carries the read-only role's grants: after the restore it still reads the store.
    monkeypatch.setenv("PGPASSWORD", TRICKY_PASSWORD[::-1])
    assert replay.read_turns(reader_url, window) == []
