"""A bad variable stops the container, and `podman logs` says which one, in one line."""

from __future__ import annotations

import pytest

from .conftest import Built
from .podman import IMAGE, container_gone, doc_command, run, run_doc

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("var", "value", "message"), [
    ("CERT_MODE", "bogus", 'unsupport cert mode: "bogus" (-certmode from env CERT_MODE)'),
    ("TCP_WRITE_TIMEOUT", "soon",
     'invalid value "soon" for -tcp-write-timeout (from env TCP_WRITE_TIMEOUT): not a duration'),
])
def test_bad_variable_stops_the_container_naming_it(image: Built, var: str, value: str, message: str) -> None:
    name = "derp-bad" if var == "CERT_MODE" else f"derp-bad-{var.lower()}"
    container_gone(name)
    try:
        if var == "CERT_MODE":  # the documented pair of commands
            started = run_doc(doc_command("podman run --name derp-bad"), check=False, timeout=90)
            logs = run_doc(doc_command("podman logs derp-bad"))
        else:
            started = run(["podman", "run", "--name", name, "-e", f"{var}={value}", IMAGE], timeout=90)
            logs = run(["podman", "logs", name], check=True)
        assert started.returncode in (1, 2), (started.returncode, started.stderr)
        state = run(["podman", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name],
                    check=True).stdout.split()
        assert state == ["exited", str(started.returncode)], state
        text = logs.stdout + logs.stderr
        lines = [ln for ln in text.splitlines() if ln.startswith("derpkit:")]
        assert len(lines) == 1 and message in lines[0], text
        assert "Traceback" not in text
    finally:
        container_gone(name)
