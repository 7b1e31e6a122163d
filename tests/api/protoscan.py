"""Comments of the .proto files by element, read from protoc's source info."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"

# Words that make a comment a promise a caller may rely on.
PROMISE = re.compile(
    r"rejected with|unset when|unset for|at most|INVALID_ARGUMENT|NOT_FOUND|"
    r"FAILED_PRECONDITION|UNAVAILABLE until|\bRequired\b|\bMust be\b|must name|"
    r"never (recommended|returned|appear)|[Ii]dempotent|are merged|[Ss]et when|"
    r"in pipeline order|[Nn]ever negative|names the fallback|named in `degraded`|"
    r"[Dd]egrade instead of failing",
)


def comments() -> dict[str, str]:
    """``file:Element.path`` -> leading comment, for every commented element."""
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.glob("mercato/v1/*.proto"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            "--include_source_info",
            "--descriptor_set_out=/dev/stdout",
            *files,
        ],
        check=True,
        capture_output=True,
    ).stdout
    fds = descriptor_pb2.FileDescriptorSet.FromString(out)
    found: dict[str, str] = {}
    for f in fds.file:
        short = Path(f.name).name
        for loc in f.source_code_info.location:
            text = (loc.leading_comments or "").strip()
            if text:
                name = _name(f, list(loc.path))
                if name is not None:
                    found[f"{short}:{name}"] = " ".join(text.split())
    return found


def _name(f: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str | None:
    if path == [2]:
        return "package"
    if len(path) >= 2 and path[0] == 4:
        return _message(f.message_type[path[1]], path[2:], f.message_type[path[1]].name)
    if len(path) >= 2 and path[0] == 5:
        e = f.enum_type[path[1]]
        if len(path) == 2:
            return e.name
        if path[2] == 2 and len(path) == 4:
            return f"{e.name}.{e.value[path[3]].name}"
        return None
    if len(path) >= 2 and path[0] == 6:
        s = f.service[path[1]]
        if len(path) == 2:
            return s.name
        if path[2] == 2 and len(path) == 4:
            return f"{s.name}.{s.method[path[3]].name}"
    return None


def _message(m: descriptor_pb2.DescriptorProto, rest: list[int], prefix: str) -> str | None:
    if not rest:
        return prefix
    if rest[0] == 2 and len(rest) == 2:
        return f"{prefix}.{m.field[rest[1]].name}"
    if rest[0] == 3 and len(rest) >= 2:
        nested = m.nested_type[rest[1]]
        return _message(nested, rest[2:], f"{prefix}.{nested.name}")
    return None


def promises() -> dict[str, str]:
    """The commented elements whose comment promises something."""
    return {k: v for k, v in comments().items() if PROMISE.search(v)}


if __name__ == "__main__":
    for key, text in promises().items():
        print(f"{key}\n    {text}")
