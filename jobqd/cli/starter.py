"""`jobqd --init DIR`: a starter, a commented config and an example tasks module that work
together at once (`jobqd -c DIR/jobqd.yaml` runs them on the embedded PostgreSQL).

Both come from what jobqd ships rather than from templates of their own, so they cannot
drift: the config is etc/jobqd.example.yaml (in the wheel as jobqd/etc/) and the module is
jobqd/examples.py, each with `jobqd.examples` replaced by the starter's module name. The
config's directory is on the import path, so `imports: [tasks]` finds DIR/tasks.py from any
working directory.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from jobqd.errors import EXIT_FAILURE, EXIT_OK

MODULE = "tasks"
"""The starter's tasks module, DIR/tasks.py."""
CONFIG = "jobqd.yaml"
EXAMPLE_CONFIG = "jobqd.example.yaml"
REFERENCE_CONFIG = "jobqd.yaml"
_EXAMPLES = "jobqd.examples"
_ONLY_IN_THE_ORIGINAL = (
    "This module is also the tasks.py that `jobqd --init DIR` writes, its name replaced by "
    "`tasks`\nthroughout (so name it in full everywhere), without this paragraph.\n\n"
)


def shipped(name: str) -> Path:
    """A file of etc/ as installed: in the wheel (jobqd/etc/), else in the source tree."""
    packaged = resources.files("jobqd") / "etc" / name
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "etc" / name


def starter_files(directory: Path) -> dict[Path, str]:
    """What `--init` writes into `directory`: file to text."""
    config = directory / CONFIG
    text = shipped(EXAMPLE_CONFIG).read_text(encoding="utf-8")
    text = text.replace("jobqd -c etc/jobqd.example.yaml", f"jobqd -c {config}")
    text = text.replace("etc/jobqd.yaml (the reference)", f"{shipped(REFERENCE_CONFIG)}")
    module = (resources.files("jobqd") / "examples.py").read_text(encoding="utf-8")
    if _EXAMPLES not in text or _ONLY_IN_THE_ORIGINAL not in module:
        raise RuntimeError("the shipped example config or jobqd/examples.py changed shape")
    module = module.replace(_ONLY_IN_THE_ORIGINAL, "")
    return {
        config: text.replace(_EXAMPLES, MODULE),
        directory / f"{MODULE}.py": module.replace(_EXAMPLES, MODULE),
    }


def init(target: str) -> int:
    """Write the starter into `target` (made if missing); refuse if any of its files exist."""
    directory = Path(target).expanduser().absolute()
    files = starter_files(directory)
    present = [str(path) for path in files if path.exists()]
    if present:
        print(
            f"jobqd: not writing the starter: {', '.join(present)} already exist"
            f"{'s' if len(present) == 1 else ''}; choose another directory or move "
            f"{'it' if len(present) == 1 else 'them'} away",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            with path.open("x", encoding="utf-8") as out:  # never over a file made meanwhile
                out.write(text)
    except OSError as exc:
        print(f"jobqd: cannot write the starter in {directory}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    config = directory / CONFIG
    print(
        f"wrote {config} (a commented config: queues, a cron entry, imports: [{MODULE}])\n"
        f"wrote {directory / MODULE}.py (example tasks: send_welcome, tick, sleep, fail)\n"
        f"next:  jobqd -c {config}                 (Ctrl-C stops it)\n"
        f"then:  jobqctl -c {config} status        (in another terminal)"
    )
    return EXIT_OK
