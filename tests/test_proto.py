"""The generated code in guardrt/v1 is current with proto/guardrt/v1/moderation.proto, and the
names external checks rely on exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from guardrt.v1 import moderation_pb2 as pb

ROOT = Path(__file__).parent.parent
GENERATED = [
    "moderation_pb2.py",
    "moderation_pb2.pyi",
    "moderation_pb2_grpc.py",
    "moderation_pb2_grpc.pyi",
]


def test_generated_code_is_current(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env
    )
    for name in GENERATED:
        fresh = (tmp_path / "guardrt" / "v1" / name).read_text()
        committed = (ROOT / "guardrt" / "v1" / name).read_text()
        assert fresh == committed, f"guardrt/v1/{name} is stale: run scripts/gen_proto.sh"


def test_contract_names() -> None:
    service = pb.DESCRIPTOR.services_by_name["Moderation"]
    assert [m.name for m in service.methods] == [
        "Moderate",
        "ModerateMany",
        "ModerateStream",
        "GetInfo",
    ]
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert streaming == {
        "Moderate": (False, False),
        "ModerateMany": (True, True),
        "ModerateStream": (True, True),
        "GetInfo": (False, False),
    }
    assert pb.Role.Name(pb.ROLE_UNSPECIFIED) == "ROLE_UNSPECIFIED"
    assert (pb.USER, pb.ASSISTANT) == (1, 2)
    labels = [pb.LABEL_UNSPECIFIED, pb.SAFE, pb.UNSAFE, pb.ERROR]
    assert [pb.Label.Name(label) for label in labels] == [
        "LABEL_UNSPECIFIED",
        "SAFE",
        "UNSAFE",
        "ERROR",
    ]
    assert labels == [0, 1, 2, 3]
    fields = {
        "ModerateRequest": ["request_id", "messages", "policy"],
        "Message": ["role", "content"],
        "Content": ["text", "image"],
        "Policy": ["exclude", "categories"],
        "Category": ["code", "description"],
        "Verdict": [
            "label",
            "categories",
            "unsafe_probability",
            "category_probabilities",
            "raw_output",
            "error",
            "label_probability",
        ],
        "ModerateResponse": ["request_id", "verdict"],
    }
    for message, names in fields.items():
        present = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name
        assert all(name in present for name in names), message
    assert pb.Content.DESCRIPTOR.oneofs_by_name["part"].fields[0].name == "text"
