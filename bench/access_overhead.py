"""What authorisation costs on the model list: the same page of models listed by an administrator (no
condition: ``model:all``), by a Designer (own + everyone-visible), and by a user holding several roles (own +
everyone + role-shared: one LIKE per role), on a registry of N models, in one process, one SQLite file.

    python bench/access_overhead.py [--models 5000] [--roles 5] [--repeat 200]

Prints the median ms per list and the ratios to the administrator's list. Also times ``can()`` on one row
(the per-item check every get/update/delete goes through).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=5000)
    parser.add_argument("--roles", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    from sqlmodel import select

    from webapp import schema
    from webapp.db import Database
    from webapp.records import ModelRecord, ModelType, Visibility
    from webapp.services.access import can, encode_roles
    from webapp.services.models.catalog import visible_to
    from webapp.services.passwords import Passwords
    from webapp.services.roles import RoleService
    from webapp.services.users import UserService

    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        schema.upgrade(db)
        users, roles = UserService(db, Passwords()), RoleService(db)
        users.ensure_admin("bench-password-123")
        admin = users.get_by_name("admin")
        team_ids = [roles.create_role(actor=admin, name=f"team{i}", permissions=["model:list", "model:use"]).id
                    for i in range(args.roles)]
        designer = users.create_user(actor=admin, username="dora", password="bench-password-123")
        member = users.create_user(actor=admin, username="tina", password="bench-password-123",
                                   roles=[f"team{i}" for i in range(args.roles)])
        owners = [admin.id, designer.id, member.id]
        with db.write() as s:
            for i in range(args.models):
                vis = (Visibility.EVERYONE, Visibility.PRIVATE, Visibility.ROLES)[i % 3]
                s.add(ModelRecord(id=f"m{i}", type=ModelType.LORA, name=f"model-{i}", visibility=vis,
                                  owner_id=owners[i % 3], sha256=f"{i:064x}",
                                  allowed_roles=encode_roles(team_ids[: 1 + i % args.roles]) if i % 3 == 2 else ""))

        def page(actor):
            def run() -> int:
                with db.read() as s:
                    return len(s.exec(visible_to(select(ModelRecord), actor).order_by(ModelRecord.name)
                                      .limit(100)).all())
            return run

        results = {name: _median_ms(page(actor), args.repeat)
                   for name, actor in (("admin (model:all)", admin), ("designer (own + everyone)", designer),
                                       (f"member of {args.roles} roles", member))}
        base = results["admin (model:all)"]
        print(f"{args.models} models, first page of 100, median of {args.repeat}:")
        for name, ms in results.items():
            print(f"  {name:28s} {ms:7.2f} ms   x{ms / base:.2f}")
        with db.read() as s:
            row = s.get(ModelRecord, "m2")
        start = time.perf_counter()
        for _ in range(100_000):
            can(member, "model:use", row)
        print(f"  can() on one row: {(time.perf_counter() - start) * 10:.2f} µs")


if __name__ == "__main__":
    main()
