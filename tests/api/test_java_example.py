"""The Java example of docs/api.md compiles against stubs that protoc and grpc-java
generate from protos/ (Debian's protobuf-compiler, protobuf-compiler-grpc-java-plugin,
libgrpc-java, libprotobuf-java; .ci/run installs them). The JVM has no netty here, so
the program is compiled, not run: the Node.js client test is the one that calls the
gateway."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procs import REPO

EXAMPLE = REPO / "tests" / "java" / "GatewayExample.java"
JARS = Path("/usr/share/java")
# What the generated code and the example import: grpc-java's API and stubs, protobuf,
# guava (ListenableFuture stubs) and javax.annotation.Generated.
CLASSPATH = ["grpc-api", "grpc-stub", "grpc-protobuf", "protobuf", "guava"]
ANNOTATIONS = "geronimo-annotation-1.3-spec"


def test_docs_show_the_compiled_java_example() -> None:
    docs = (REPO / "docs" / "api.md").read_text()
    assert EXAMPLE.read_text().strip() in docs


@pytest.mark.slow
def test_java_example_compiles_against_generated_stubs(tmp_path: Path) -> None:
    tools = {t: shutil.which(t) for t in ("protoc", "grpc_java_plugin", "javac")}
    jars = [JARS / f"{j}.jar" for j in [*CLASSPATH, ANNOTATIONS]]
    missing = [t for t, p in tools.items() if p is None] + [str(j) for j in jars if not j.exists()]
    assert not missing, f"missing {missing}: run .ci/run or apt-get install the packages above"
    gen, classes = tmp_path / "gen", tmp_path / "classes"
    gen.mkdir()
    protos = sorted(str(p.relative_to(REPO / "protos")) for p in (REPO / "protos").rglob("*.proto"))
    subprocess.run(
        [
            str(tools["protoc"]),
            f"-I{REPO / 'protos'}",
            f"--java_out={gen}",
            f"--plugin=protoc-gen-grpc-java={tools['grpc_java_plugin']}",
            f"--grpc-java_out={gen}",
            *protos,
        ],
        check=True,
    )
    sources = sorted(str(p) for p in gen.rglob("*.java"))
    assert any(s.endswith("GatewayServiceGrpc.java") for s in sources)
    proc = subprocess.run(
        [
            str(tools["javac"]),
            "-d",
            str(classes),
            "-cp",
            ":".join(map(str, jars)),
            *sources,
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (classes / "GatewayExample.class").exists()
