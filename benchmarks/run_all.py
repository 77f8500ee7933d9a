"""Run every benchmark script and write benchmarks/RESULTS.md (figures, machine, date).

`make bench` calls this. Each script prints its own markdown tables; this collects them
under one heading each, with the machine and versions they were measured on.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SCRIPTS = ["pipeline.py", "memory.py", "elastic_step.py", "search.py", "reshard.py", "switch.py",
           "data.py"]


def main(argv: list[str] | None = None) -> int:
    """Run every script, or only those named (``run_all memory.py``): then only their
    sections of RESULTS.md are replaced, each dated, and the others kept as they were."""
    only = list(sys.argv[1:] if argv is None else argv)
    unknown = [name for name in only if name not in SCRIPTS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}: choose from {SCRIPTS}", file=sys.stderr)
        return 2
    root = HERE.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    versions = subprocess.run(
        [sys.executable, "-c", "import jax, flax, optax, orbax.checkpoint as o; "
         "print(f'jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
         "orbax-checkpoint {o.__version__}')"], capture_output=True, text=True, env=env,
        check=True).stdout.strip()
    parts = [
        "# Benchmark results",
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.platform()}, "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, {versions}.",
        "Simulated devices share the machine's cores: ratios measured side by side in one "
        "run are the figures to read, not absolute speed. Regenerate with `make bench`; "
        "what each figure means: README.md, \"Performance figures\".",
    ]
    sections = _sections((HERE / "RESULTS.md").read_text()) if only else {}
    failed = 0
    for name in only or SCRIPTS:
        path = HERE / name
        if not path.exists():
            continue
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{path.stem}"], cwd=root,
                              env=env, capture_output=True, text=True)
        print(proc.stdout, proc.stderr[-2000:] if proc.returncode else "", flush=True)
        doc = (proc.stdout if proc.returncode == 0
               else f"FAILED (exit {proc.returncode}):\n\n```\n{proc.stderr[-3000:]}\n```")
        failed += proc.returncode != 0
        sections[name] = (f"Measured {datetime.date.today().isoformat()}.\n\n" if only
                          else "") + doc.strip()
    for name in SCRIPTS:
        if name in sections:
            parts += ["", f"## `benchmarks/{name}`", "", sections[name].strip()]
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 1 if failed else 0


def _sections(text: str) -> dict[str, str]:
    """RESULTS.md's sections by script name."""
    found = re.split(r"^## `benchmarks/(\S+)`\n", text, flags=re.M)
    return {name: body for name, body in zip(found[1::2], found[2::2], strict=True)}


if __name__ == "__main__":
    sys.exit(main())
