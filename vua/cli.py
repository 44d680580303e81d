"""The ``vua`` command: rebuild-index, verify, stats and gc for a store on disk.

    vua rebuild-index ROOT [--index-path DIR] [--workers N] [--json]
    vua verify ROOT [--fix] [--grace SECONDS] [--auth-key-file FILE] [--index-path DIR] [--json]
    vua stats ROOT [--index-path DIR] [--json]
    vua gc ROOT --max-bytes N [--index-path DIR] [--json]

Also ``python -m vua``. Every command needs only the fragment tree and the index, never a
whole store object, and none imports torch, so each starts in a fraction of a second.
Errors go to stderr (to stdout as a JSON object with ``--json``) with a non-zero status:
2 for a bad invocation or root, 1 for a store that ``verify`` found unclean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import NoReturn

from vua import _evict, _layout, _tree
from vua._files import file_system_type, is_network_file_system
from vua._generations import CURRENT_FILE
from vua._index import Index
from vua._mac import mac_key, read_secret
from vua._rebuild import rebuild
from vua._sizes import human_size, parse_size
from vua._tree import ScanProgress
from vua._verify import DEFAULT_GRACE_SECONDS, verify_store
from vua.errors import InvalidInputError, NotAStoreError, StorageError, VUAError


def _size_argument(text: str) -> int:
    """``--max-bytes``: the size parser the vLLM connector's ``max_bytes`` uses too."""
    try:
        return parse_size(text, "--max-bytes")
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_root(root: str, index_path: str) -> None:
    if os.path.exists(root) and not os.path.isdir(root):
        raise NotAStoreError(f"{root} is a file, not a directory; pass the directory a VUA store was created in")
    if not os.path.isdir(root):
        raise NotAStoreError(f"{root}: no such directory; pass the root a VUA store was created with")
    _layout.check_index_path(index_path, setting="--index-path", otherwise="create its parent directory first")
    if not _layout.may_write(index_path):  # every command opens the index, which LMDB must write
        why = "the root is read-only to this user" if not _layout.may_write(root) else "this user may not write it"
        raise StorageError(
            f"cannot open the index {index_path}: {why} (a read-only mount or another user's store); pass "
            "--index-path DIR, a directory this user can write (the index is rebuilt there from the fragment tree)"
        )
    has_index = os.path.exists(os.path.join(index_path, CURRENT_FILE))
    if not has_index and next(_layout.iter_fanout_dirs(root), None) is None:
        raise NotAStoreError(f"{root}: not a VUA store (no index and no fragment directories); check the path")


class _Progress:
    """A one-line progress bar on stderr, shown only on a terminal."""

    def __init__(self, label: str, enabled: bool):
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()

    def __call__(self, state: ScanProgress) -> None:
        if not self.enabled:
            return
        total = max(state.fanouts_total, 1)
        width = 30
        filled = width * state.fanouts_done // total
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{state.fanouts_done}/{total} directories, {state.groups} groups, {state.damaged} damaged"
        )
        if state.fanouts_done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else text)


def cmd_rebuild_index(args: argparse.Namespace) -> int:
    _check_root(args.root, args.index_path)
    summary = rebuild(args.root, args.index_path, workers=args.workers, progress=_Progress("scanning", not args.json))
    assert summary is not None  # only conditional rebuilds (only_if_missing, replacing) may do nothing
    payload = {"root": args.root, "index_path": args.index_path, **vars(summary)}
    _emit(
        args,
        payload,
        f"rebuilt {args.index_path}: {summary.groups} groups, {human_size(summary.bytes)}, "
        f"{summary.damaged} damaged fragments skipped, in {summary.seconds:.2f} s",
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    _check_root(args.root, args.index_path)
    key = None if args.auth_key_file is None else mac_key(read_secret(args.auth_key_file, "--auth-key-file"))
    report = verify_store(
        args.root,
        args.index_path,
        fix=args.fix,
        grace_seconds=args.grace,
        workers=args.workers,
        progress=_Progress("verifying", not args.json),
        node_local_index=_node_local_index(args),
        mac_key=key,
    )
    lines = [f"{report.fragments} valid fragments, {human_size(report.bytes)}"]
    for p in report.problems:
        lines.append(f"{'fixed' if p.fixed else 'PROBLEM'}: {p.kind} {p.key or ''} {p.detail}".rstrip())
    if report.other_nodes_groups:
        lines.append(f"{report.other_nodes_groups} valid groups this node's index does not know (other nodes')")
    if report.young_temporaries:
        lines.append(f"{report.young_temporaries} temporaries younger than {args.grace:.0f} s (writers at work?)")
    lines.append(
        "clean"
        if report.clean and not report.problems
        else "repaired: the store is clean"
        if report.clean
        else "NOT CLEAN: the problems above were left alone, each says why"
        if args.fix
        else "NOT CLEAN: run `vua verify --fix` to repair"
    )
    _emit(args, report.to_json(), "\n".join(lines))
    return 0 if report.clean else 1


def cmd_stats(args: argparse.Namespace) -> int:
    _check_root(args.root, args.index_path)
    index = Index(args.index_path, args.root)
    count, total, oldest, newest = 0, 0, None, None
    per_namespace: Counter[int] = Counter()
    for _, record in index.items():
        if record is None:
            continue
        count += 1
        total += record.nbytes
        per_namespace[record.namespace_id] += 1
        oldest = record.last_used if oldest is None else min(oldest, record.last_used)
        newest = record.last_used if newest is None else max(newest, record.last_used)
    names = index.namespaces()
    index.close()

    def when(ns: int | None) -> str | None:
        return None if ns is None else datetime.datetime.fromtimestamp(ns / 1e9).isoformat(timespec="seconds")

    namespaces = {names.get(ns_id, f"<unknown {ns_id:016x}>"): n for ns_id, n in per_namespace.most_common()}
    payload = {
        "root": args.root,
        "fragments": count,
        "bytes": total,
        "namespaces": namespaces,
        "oldest_use": when(oldest),
        "newest_use": when(newest),
    }
    text = [
        f"{count} fragments, {human_size(total)}, {len(namespaces)} namespaces",
        f"least recently used: {payload['oldest_use']}, most recently used: {payload['newest_use']}",
    ]
    text += [f"  {n:>8} groups  {name!r}" for name, n in namespaces.items()]
    if _node_local_index(args):
        # This node's index knows the groups it wrote or read; the store is the whole tree.
        tree = _tree.stat_groups(args.root)
        payload["store"] = {"fragments": len(tree), "bytes": sum(group.nbytes for group in tree)}
        text.insert(0, f"store (the whole tree): {len(tree)} fragments, {human_size(payload['store']['bytes'])}")
        text[1] = "this node's index: " + text[1]
    _emit(args, payload, "\n".join(text))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    _check_root(args.root, args.index_path)
    shared = _is_shared(args)
    index = Index(args.index_path, args.root)
    try:
        summary = _evict.collect_garbage(args.root, index, args.max_bytes, shared=shared, grace_seconds=args.grace)
    finally:
        index.close()
    payload = {
        "root": args.root,
        "max_bytes": args.max_bytes,
        "shared": shared,
        "groups_before": summary.groups,
        "groups_evicted": summary.groups_evicted,
        "bytes_before": summary.bytes_before,
        "bytes_freed": summary.bytes_freed,
        "bytes_after": summary.bytes_after,
        "trash_deleted": summary.trash_deleted,
        "groups_refused": summary.groups_refused,
    }
    _emit(
        args,
        payload,
        f"evicted {summary.groups_evicted} groups, {human_size(summary.bytes_freed)}: "
        f"{human_size(summary.bytes_before)} -> {human_size(summary.bytes_after)} (limit {human_size(args.max_bytes)})"
        + (f"; {summary.trash_deleted} evicted groups past their grace period deleted" if shared else ""),
    )
    if summary.groups_refused:
        print(
            f"vua gc: could not remove {summary.groups_refused} groups from {args.root} ({summary.refusal}); "
            "they stay stored and indexed: run gc where, and as a user who, may write the root",
            file=sys.stderr,
        )
        return 1
    return 0


def _is_shared(args: argparse.Namespace) -> bool:
    """Whether the root is a store other nodes share: a network or FUSE file system (or --shared)."""
    return bool(args.shared) or is_network_file_system(file_system_type(args.root))


def _node_local_index(args: argparse.Namespace) -> bool:
    """Whether the index is one node's own, outside a (shared) root: groups it lacks are other nodes'."""
    root = os.path.join(args.root, "")
    return not os.path.join(args.index_path, "").startswith(root)


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad invocation answers in JSON when the command line asked for JSON."""

    def __init__(self, *args, json_errors: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.json_errors = json_errors

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            print(json.dumps({"error": message, "usage": self.format_usage().strip()}, indent=2))
            sys.exit(2)
        super().error(message)


def build_parser(*, json_errors: bool = False) -> argparse.ArgumentParser:
    """The ``vua`` command's parser; ``json_errors`` makes usage errors JSON objects on stdout."""
    parser = _Parser(
        prog="vua",
        json_errors=json_errors,
        description="Maintain a VUA KV-cache store on disk.",
        epilog="`vua COMMAND --help` describes one command. Exit status: 0 done, 1 store not clean (verify), 2 error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, json_errors=json_errors)
        p.add_argument("root", help="the store's fragment root")
        p.add_argument("--index-path", help="the index directory (default: ROOT/index.lmdb)")
        p.add_argument("--json", action="store_true", help="print a JSON document instead of text")
        p.set_defaults(func=func)
        return p

    p = command(
        "rebuild-index", cmd_rebuild_index, "Build a new index from the fragment tree and swap it in atomically."
    )
    p.add_argument("--workers", type=int, default=8, help="parallel directory scanners (default 8)")
    p = command("verify", cmd_verify, "Check every fragment and the index; exit 0 only for a clean store.")
    p.add_argument(
        "--fix",
        action="store_true",
        help="delete damaged (and, with --auth-key-file, unauthenticated) fragments and stale temporaries, "
        "fix the index",
    )
    p.add_argument(
        "--auth-key-file",
        metavar="FILE",
        help="a file holding the store's secret (VUAConfig.auth_key): check every fragment's MAC too",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        help=f"seconds before a writer's temporary file counts as abandoned (default {DEFAULT_GRACE_SECONDS:.0f})",
    )
    p.add_argument("--workers", type=int, default=8, help="parallel directory scanners (default 8)")
    command(
        "stats",
        cmd_stats,
        "Fragments, bytes, namespaces and last-use times, from the index (and the whole tree's size "
        "when the index is a node's own, outside the root).",
    )
    p = command("gc", cmd_gc, "Evict the least recently used groups of the whole tree until it fits --max-bytes.")
    p.add_argument("--max-bytes", type=_size_argument, required=True, help="capacity, e.g. 500G or 2T")
    p.add_argument(
        "--shared",
        action="store_true",
        help="treat the root as shared by nodes even where its file system type does not say so "
        "(evicted groups then wait out --grace in the trash)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=_evict.DEFAULT_TRASH_GRACE_SECONDS,
        help="on a shared root, seconds an evicted group stays in the trash for readers on other nodes "
        f"(default {_evict.DEFAULT_TRASH_GRACE_SECONDS:.0f})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(json_errors="--json" in argv)
    if not argv:  # bare `vua`: say what it can do
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    args.root = os.path.abspath(args.root)
    args.index_path = os.path.abspath(args.index_path or os.path.join(args.root, _layout.DEFAULT_INDEX_DIR))
    try:
        return args.func(args)
    except (VUAError, OSError, ImportError) as exc:  # ImportError: an extra a command needs is missing
        if args.json:
            print(json.dumps({"command": args.command, "root": args.root, "error": str(exc)}, indent=2))
        else:
            print(f"vua {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
