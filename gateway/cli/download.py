"""``yigong query download``: one object, or every object of a case or study, verified.

Every object is streamed over one connection with ``Query.ReadObject``; every chunk's
SHA-256 and the whole object's SHA-256 (its id) and size are checked before the file
is moved into place. Bytes arrive in ``.NAME.part`` next to the target and are
renamed only once verified, so a file under its final name is always complete.

Resuming: an interrupted download leaves its ``.part`` file; the next run hashes
what is there and asks the node for the rest (``ReadObjectRequest.offset``). If the
whole then does not match, the partial file is discarded and the object fetched
once more from the start. A target already present with the right SHA-256 is
skipped without reading anything from the node.

Bulk: ``--case C`` downloads every object the node holds for case C; ``--study UID``
every instance of a received (de-identified) study at a factory node, laid out as
``DIR/SERIES_UID/SOP_INSTANCE_UID.dcm``. A summary line ends the run; the exit
status is 0 only when every object was verified.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway.cli.progress import Reporter, Task, human_bytes
from gateway.errors import IntegrityError, NotFound, ValidationError, YigongError
from gateway.hashing import ChunkErrors, ChunkVerifier, hash_file, iter_file_chunks
from gateway.rpc.call import rpc_call, rpc_stream
from gateway.rpc.client import NodeClient
from yigong.v1 import common_pb2, factory_pb2, factory_pb2_grpc, query_pb2

HASH_BLOCK = 1024 * 1024
PAGE = 1000
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class Outcome:
    object_id: str
    path: Path
    size: int
    state: str  # downloaded | resumed | present | failed
    error: str = ""


def add_download_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("object_id", nargs="?", default="", help="object id (SHA-256)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="file to write, or a directory (the object's name is used; with --case or "
        "--study: the directory to fill)",
    )
    p.add_argument("--case", default="", help="download every object of this case into -o DIR")
    p.add_argument(
        "--study",
        default="",
        metavar="STUDY_UID",
        help="download every instance of this received study into -o DIR (factory node; "
        "add --case when the study was received for several cases)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_download(args: argparse.Namespace, client: NodeClient) -> int:
    """The body of ``yigong query download`` on an open client."""
    if bool(args.object_id) == bool(args.case or args.study):
        raise ValidationError(
            "say what to download: an OBJECT_ID, or --case CASE_ID, or --study STUDY_UID "
            "(with --case only when the study was received for several cases)"
        )
    out: Path = args.output
    if args.object_id:
        jobs = [_single_target(client, args.object_id, out)]
    else:
        if out.exists() and not out.is_dir():
            raise ValidationError(f"{out} exists and is not a directory; -o names a directory")
        jobs = (
            _study_jobs(client, args.study, args.case, out)
            if args.study
            else _case_jobs(client, args.case, out)
        )
        if not jobs:
            what = f"study {args.study}" if args.study else f"case {args.case}"
            raise NotFound(f"{client.target} holds no objects of {what}")
        out.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    with Reporter.for_args(args) as progress:
        overall = (
            progress.task(f"{len(jobs)} objects", total=sum(j[2] for j in jobs))
            if len(jobs) > 1
            else None
        )
        for object_id, dest, size in jobs:
            task = progress.task(f"download {dest.name}", total=max(size, 0))
            outcome = fetch(client, object_id, dest, size, task)
            task.done(outcome.state if not outcome.error else "FAILED")
            if overall is not None:
                overall.advance(size)
            outcomes.append(outcome)
        if overall is not None:
            overall.done()
    return _report(args, outcomes)


def _report(args: argparse.Namespace, outcomes: list[Outcome]) -> int:
    failed = [o for o in outcomes if o.state == "failed"]
    good = [o for o in outcomes if o.state != "failed"]
    if args.json:
        print(
            json.dumps(
                {
                    "files": len(good),
                    "bytes": sum(o.size for o in good),
                    "failed": len(failed),
                    "objects": [
                        {
                            "object_id": o.object_id,
                            "path": str(o.path),
                            "size": o.size,
                            "state": o.state,
                            **({"error": o.error} if o.error else {}),
                        }
                        for o in outcomes
                    ],
                },
                indent=2,
            )
        )
    elif len(outcomes) == 1 and not failed:
        o = outcomes[0]
        note = "already present" if o.state == "present" else o.state
        print(f"wrote {o.path} ({o.size} bytes, sha256 {o.object_id}, verified, {note})")
    else:
        counts = {s: sum(o.state == s for o in good) for s in ("downloaded", "resumed", "present")}
        print(
            f"{len(good)} files, {human_bytes(sum(o.size for o in good))} "
            f"({sum(o.size for o in good)} bytes), every SHA-256 verified: "
            f"{counts['downloaded']} downloaded, {counts['resumed']} resumed, "
            f"{counts['present']} already present"
        )
    for o in failed:
        print(f"error: {o.path}: {o.error}", file=sys.stderr)
    if failed:
        print(
            f"error: {len(failed)} of {len(outcomes)} objects failed; run the same command "
            "again to retry them (verified files are kept)",
            file=sys.stderr,
        )
        return 2
    return 0


# -- what to download -------------------------------------------------------------------
def safe_name(name: str, fallback: str) -> str:
    """A file name for an object: its base name with unusual characters replaced."""
    base = _UNSAFE.sub("_", Path(name.replace("\\", "/")).name).lstrip(".")
    return base[:200] or fallback


def _single_target(client: NodeClient, object_id: str, out: Path) -> tuple[str, Path, int]:
    """(object id, target file, size or -1 when not asked: the stream tells it)."""
    if out.is_dir() or str(out).endswith(("/", os.sep)):
        obj = client.get_object(object_id).object
        out.mkdir(parents=True, exist_ok=True)
        return obj.object_id, out / safe_name(obj.name, obj.object_id), int(obj.size)
    if not out.parent.is_dir():
        raise ValidationError(f"directory {out.parent} does not exist (for -o {out})")
    return object_id, out, -1


def _case_jobs(client: NodeClient, case_id: str, out: Path) -> list[tuple[str, Path, int]]:
    objects: dict[str, common_pb2.ObjectInfo] = {}
    until = ""
    while True:
        page = client.list_objects(case_id=case_id, until=until, limit=PAGE)
        fresh = [o for o in page if o.object_id not in objects]
        objects.update((o.object_id, o) for o in fresh)
        if len(page) < PAGE or not fresh:
            break
        until = page[-1].created_at  # newest first: the next page is older
    ordered = sorted(objects.values(), key=lambda o: (o.created_at, o.object_id))
    return _named(
        [(o.object_id, safe_name(o.name, o.object_id), int(o.size)) for o in ordered], out
    )


def _study_jobs(
    client: NodeClient, study_uid: str, case_id: str, out: Path
) -> list[tuple[str, Path, int]]:
    def not_a_factory(code: grpc.StatusCode, details: str) -> YigongError | None:
        if code != grpc.StatusCode.UNIMPLEMENTED:
            return None
        return ValidationError(
            f"{client.target} is not a factory node; --study downloads a received "
            "(de-identified) study from a factory node; use --case at a hospital"
        )

    study = rpc_call(
        factory_pb2_grpc.FactoryStub(client.channel).GetStudy,
        factory_pb2.GetFactoryStudyRequest(study_uid=study_uid, case_id=case_id),
        target=client.target,
        timeout=client.timeout,
        translate=not_a_factory,
    )
    sizes = {
        o.object_id: int(o.size) for o in client.list_objects(case_id=study.case_id, limit=PAGE)
    }
    jobs: list[tuple[str, str, int]] = []
    for inst in study.instances:
        size = sizes.get(inst.object_id)
        if size is None:
            size = int(client.get_object(inst.object_id).object.size)
        series = safe_name(inst.series_uid, "series")
        jobs.append((inst.object_id, f"{series}/{safe_name(inst.sop_instance_uid, 'x')}.dcm", size))
    return _named(jobs, out)


def _named(items: list[tuple[str, str, int]], out: Path) -> list[tuple[str, Path, int]]:
    """Target paths under ``out``; names two objects share get the object id appended."""
    counts: dict[str, int] = {}
    for _, name, _ in items:
        counts[name] = counts.get(name, 0) + 1
    jobs = []
    for object_id, name, size in items:
        if counts[name] > 1:
            p = Path(name)
            name = str(p.with_name(f"{p.stem}-{object_id[:12]}{p.suffix}"))
        jobs.append((object_id, out / name, size))
    return jobs


# -- one object ---------------------------------------------------------------------------
def part_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part")


def fetch(
    client: NodeClient, object_id: str, dest: Path, size: int, task: Task | None = None
) -> Outcome:
    """Download one object to ``dest``, verified, resuming or skipping (never raises
    :class:`YigongError`: a failure is the outcome's ``error``). ``size`` -1: not known
    yet (the stream's first message tells it)."""
    part = part_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (
            dest.is_file()
            and (size < 0 or dest.stat().st_size == size)
            and _sha256_file(dest) == object_id
        ):
            size = dest.stat().st_size
            if task is not None:
                task.update(size, size)
            return Outcome(object_id, dest, size, "present")
        have = part.stat().st_size if part.is_file() else 0
        if size >= 0 and have > size:
            part.unlink()
            have = 0
        try:
            got = _stream(client, object_id, part, have, size, task)
            state = "resumed" if have else "downloaded"
        except (IntegrityError, ValidationError):
            if not have:
                raise
            # the partial file was not what the node holds: once more from the start
            part.unlink(missing_ok=True)
            if task is not None:
                task.update(0)
            got = _stream(client, object_id, part, 0, size, task)
            state = "downloaded"
        os.replace(part, dest)
        return Outcome(object_id, dest, got, state)
    except (YigongError, OSError) as exc:
        if part.is_file() and part.stat().st_size == 0:
            part.unlink()  # nothing to resume from
        return Outcome(object_id, dest, max(size, 0), "failed", str(exc))


def _stream(
    client: NodeClient,
    object_id: str,
    part: Path,
    offset: int,
    size: int,
    task: Task | None,
) -> int:
    """Stream the object from ``offset`` into ``part``; returns its size once verified."""
    errors = _StreamErrors(client.target, object_id, part, size)
    verifier = ChunkVerifier(errors, offset=offset, skip_empty=True)
    if offset:
        with open(part, "rb") as fh:
            verifier.resume(iter_file_chunks(fh, HASH_BLOCK))
        if task is not None:
            task.update(offset)
    stream = rpc_stream(
        client.query.ReadObject,
        query_pb2.ReadObjectRequest(object_id=object_id, offset=offset),
        target=client.target,
    )
    with open(part, "r+b" if offset else "wb") as fh:
        fh.seek(offset)
        fh.truncate()
        for msg in stream:
            if msg.object_sha256:
                errors.expected_sha, errors.expected_size = msg.object_sha256, msg.object_size
                if task is not None:
                    task.update(task.completed, errors.expected_size)
            data = msg.chunk.data
            verifier.check(msg.chunk.offset, data, msg.chunk.sha256)
            fh.write(data)
            if task is not None:
                task.advance(len(data))
        fh.flush()
        os.fsync(fh.fileno())
    expected_sha, expected_size = errors.expected_sha, errors.expected_size
    _, position = verifier.finish(
        sha256=[object_id, *([expected_sha] if expected_sha else [])],
        size=[n for n in (size, expected_size) if n >= 0],
    )
    return position


class _StreamErrors(ChunkErrors):
    """A download's chunk errors (the partial file is discarded with them: its bytes
    are not what the node holds, so a resume would not help)."""

    def __init__(self, target: str, object_id: str, part: Path, size: int) -> None:
        super().__init__(f"{target}: object {object_id}")
        self.target, self.object_id, self.part, self.size = target, object_id, part, size
        self.expected_sha, self.expected_size = "", -1  # what the stream's header says

    def bad_offset(self, offset: int, expected: int) -> YigongError:
        return self.bad_chunk(offset, expected)

    def bad_chunk(self, offset: int, expected: int) -> YigongError:
        self.part.unlink(missing_ok=True)
        return IntegrityError(
            f"{self.target}: chunk at offset {offset} of object {self.object_id} does not "
            f"match its SHA-256 or position {expected}"
        )

    def bad_whole(self, digest: str, size: int) -> YigongError:
        self.part.unlink(missing_ok=True)
        return IntegrityError(
            f"{self.target}: object {self.object_id} arrived with SHA-256 {digest} and "
            f"{size} bytes; expected {self.object_id} and "
            f"{max(self.size, self.expected_size)} bytes"
        )


def _sha256_file(path: Path) -> str:
    return hash_file(path, HASH_BLOCK)[0]
