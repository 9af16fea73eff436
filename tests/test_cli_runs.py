"""fashion-exp-runs interrupted: the footnotes explain only what the listing shows."""

from __future__ import annotations

from fashion_exp.cli.runs import table


def row(state: str, epochs: int | None) -> dict:
    return {"run_id": "a" * 32, "name": "run", "status": "KILLED" if state == "stopped"
            else "RUNNING", "state": state, "host": "vm", "epochs_done": epochs}


def test_a_stopped_run_alone_gets_no_orphaned_footnote() -> None:
    text = table([row("stopped", 3)])
    assert "orphaned" not in text and "fashion-exp-runs resume <run_id>" in text


def test_an_orphaned_run_gets_its_footnote() -> None:
    text = table([row("orphaned", None)])
    assert "orphaned: its process is gone" in text and "resume <run_id>" not in text
