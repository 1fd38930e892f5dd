"""docs/docker.md promises that every command it prints is one these tests ran. Runs last
(file order); needs the whole of tests/docker in the session to judge."""

from __future__ import annotations

import pytest

from .conftest import Built
from .podman import doc_commands, ran

OTHERS = ("test_image.py", "test_verify_clients.py", "test_bad_env.py", "test_compose.py", "test_moved.py")


def test_every_documented_command_ran(request: pytest.FixtureRequest, image: Built) -> None:
    collected = {item.path.name for item in request.session.items}
    if not set(OTHERS) <= collected:
        pytest.skip("judged only when all of tests/docker runs in one session")
    commands = doc_commands()
    assert len(commands) >= 20, commands  # the parser found the page's sh blocks
    missing = [c for c in commands if c not in ran]
    assert not missing, f"docs/docker.md commands no test ran: {missing}"
