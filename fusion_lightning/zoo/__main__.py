"""`python -m fusion_lightning.zoo list | fetch NAME | catalog [NAME ...]`: list the zoo, prepare one model and
print its directory, or print a price catalog (JSON) of zoo models for `collect catalog=`."""

from __future__ import annotations

import sys

import fusion_lightning.zoo as zoo
from fusion_lightning.zoo import ZOO, catalog, fetch, list_rows, lookup, students_root


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("list", "fetch", "catalog"):
        print(zoo.__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "list":
        print(f"{'name':24} {'params':>8} {'download':>9} {'cached':>10}  description")
        for r in list_rows():
            cached = f"{r['cached_mb']:.0f} MB" if r["cached"] else "no"
            alias = f" (alias {', '.join(r['aliases'])})" if r["aliases"] else ""
            print(f"{r['name']:24} {r['params_m']:>7}M {r['download_mb']:>6.0f} MB {cached:>10}  {r['description']}{alias}")
        print(f"cache: {students_root()}")
        return 0
    if argv[0] == "catalog":
        try:
            print(catalog(argv[1:] or None).to_json())
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if len(argv) != 2:
        print("usage: python -m fusion_lightning.zoo fetch NAME", file=sys.stderr)
        return 2
    if lookup(argv[1]) is None:
        print(f"error: {argv[1]!r} is not a zoo model; the zoo has {', '.join(sorted(ZOO))}", file=sys.stderr)
        return 1
    print(fetch(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
