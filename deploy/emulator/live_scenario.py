"""Print the path of a copy of a packaged scenario that starts now (for a live emulator).

The packaged scenarios start on a fixed date, so that offline runs are reproducible. A live
site (the compose stack's emulator at --speed 1) must stamp its telemetry with today's time,
or the twin would find every pack stale and Grafana would show nothing in its "last 6 hours".

Usage: python live_scenario.py [SCENARIO] [OUT]   (defaults: nevada, /tmp/live-SCENARIO.toml)
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path


def live_copy(name: str, out: Path, now: datetime | None = None) -> Path:
    """Write the packaged scenario ``name`` to ``out`` with its start set to ``now`` (UTC, whole seconds)."""
    text = resources.files("emulators").joinpath("scenarios", f"{name}.toml").read_text(encoding="utf-8")
    start = (now or datetime.now(tz=UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    text, count = re.subn(r"(?m)^start = .*$", f"start = {start}", text, count=1)
    if count != 1:
        msg = f"scenario {name} has no 'start = ...' line"
        raise SystemExit(msg)
    out.write_text(text, encoding="utf-8")
    return out


if __name__ == "__main__":
    scenario = sys.argv[1] if len(sys.argv) > 1 else "nevada"
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(f"/tmp/live-{scenario}.toml")
    sys.stdout.write(f"{live_copy(scenario, target)}\n")
