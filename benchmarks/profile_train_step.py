"""Where a CPU train step's time goes, by kind of operation.

Run by hand (never by the tests):

    python benchmarks/profile_train_step.py  # the chapter's settings
    python benchmarks/profile_train_step.py --batch-size 32 --embedding-dim 32

It runs `train_step` at the chapter's configuration (batch 256, K=512, D=64,
50 classes, Adam 1e-3, the passes `train` uses; the flags and the setup are
`bench_train_step.py`'s), with XLA dumping the optimized HLO of every program
it compiles into a temporary folder, runs the warm-up steps, then records
`--steps` steps with `jax.profiler` and reads the trace: every XLA operation
that ran (a "thunk", named after its HLO instruction, in a program named by
the trace) is put in one kind by what its compiled HLO computes, and the
kinds' summed times are printed per step as JSON, largest first, with the
step's wall time. A step's programs but the first share a name (and the
first's instructions mostly match theirs); an instruction takes the kind it
has in the first of them dumped. Kinds:

- `conv weight grad`: a convolution whose window spans the image (the gradient
  of a small kernel: 3x3 output, 25x25 to 100x100 window);
- `conv`: the other convolutions (forward passes and input gradients), by the
  spatial size of their output;
- `dot`: matrix products (the head's dense layers, the quantizer's distances);
- `reduce`: reductions (GroupNorm statistics, losses, code counts);
- `rng`: the random bits of dropout (threefry);
- `other`: element-wise work, copies, transposes, gathers, the optimizer.

Summed thunk time exceeds the wall time when XLA runs operations on several
threads at once.
"""

import atexit
import collections
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

# Before JAX starts its backend, which reads the flags once.
_DUMP = Path(tempfile.mkdtemp(prefix="profile_train_step_hlo_"))
atexit.register(shutil.rmtree, _DUMP, ignore_errors=True)
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={_DUMP} --xla_dump_hlo_as_text"
)

import jax  # noqa: E402
from bench_train_step import build_parser, make_step_inputs  # noqa: E402

from dlfb_localization.train import train_step  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_WINDOW = re.compile(r"window=\{size=(\d+)x(\d+)")


def _computations(hlo: str) -> dict[str, list[str]]:
    """The HLO module's computations: name -> its instruction lines."""
    computations: dict[str, list[str]] = {}
    current: list[str] = []
    for line in hlo.splitlines():
        if line and not line.startswith((" ", "}")) and "{" in line:
            match = _COMPUTATION.match(line)
            current = computations.setdefault(match.group(1) if match else line, [])
        elif line.startswith("  "):
            current.append(line)
    return computations


def _kind(lines: list[str], computations: dict[str, list[str]]) -> str:
    """The kind of work in these instruction lines (a fusion's, recursively)."""
    kinds = set()
    for line in lines:
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        shape, opcode = match.group(2), match.group(3)
        if opcode == "convolution":
            window = _WINDOW.search(line)
            side = int(window.group(1)) if window else 1
            dims = re.findall(r"\d+", shape.split("[", 1)[-1].split("]")[0])
            out = int(dims[1]) if len(dims) > 2 else 0
            kinds.add(
                "conv weight grad" if side > 3 and out <= 3 else f"conv {out}x{out}"
            )
        elif opcode == "dot":
            kinds.add("dot")
        elif opcode in ("reduce", "reduce-window"):
            kinds.add("reduce")
        elif opcode in ("fusion", "call", "while"):
            for called in _CALLS.findall(line) + re.findall(r"body=%([\w.\-]+)", line):
                kinds.add(_kind(computations.get(called, []), computations))
        if "threefry" in line or "rng" in opcode:
            kinds.add("rng")
    for kind in ("conv weight grad", "dot", "rng"):
        if kind in kinds:
            return kind
    convs = sorted(k for k in kinds if k.startswith("conv "))
    if convs:
        return convs[-1]
    return "reduce" if "reduce" in kinds else "other"


def _instruction_kinds(hlo: str) -> dict[str, str]:
    """Every instruction name of the compiled module -> its kind."""
    computations = _computations(hlo)
    kinds = {}
    for lines in computations.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match is not None:
                kinds[match.group(1)] = _kind([line], computations)
    return kinds


def _dumped_kinds(folder: Path) -> dict[tuple[str, str], str]:
    """`(program, instruction)` -> kind, from the optimized HLO XLA dumped."""
    kinds: dict[tuple[str, str], str] = {}
    for path in sorted(folder.glob("*cpu_after_optimizations.txt")):
        hlo = path.read_text()
        module = re.match(r"HloModule ([^,\s]+)", hlo).group(1)
        for name, kind in _instruction_kinds(hlo).items():
            kinds.setdefault((module, name), kind)
    return kinds


def _thunk_seconds(trace_dir: Path) -> collections.Counter:
    """Summed seconds of each `(program, XLA operation)` in the recorded trace."""
    (path,) = trace_dir.rglob("perfetto_trace.json.gz")
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    seconds: collections.Counter = collections.Counter()
    for event in events:
        module = event.get("args", {}).get("hlo_module")
        if event.get("ph") == "X" and "dur" in event and module:
            seconds[module, event["name"]] += event["dur"] / 1e6
    return seconds


def main() -> None:
    parser = build_parser(__doc__.splitlines()[0])
    parser.set_defaults(steps=2)
    args = parser.parse_args()
    state, *step_args = make_step_inputs(args)
    passes = step_args[-1]
    for _ in range(args.warmup_steps):
        state, metrics = train_step(state, *step_args)
        jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, metrics = train_step(state, *step_args)
                jax.block_until_ready(metrics)
        wall = (time.perf_counter() - start) / args.steps
        seconds = _thunk_seconds(Path(folder))
    kinds = _dumped_kinds(_DUMP)
    by_kind: collections.Counter = collections.Counter()
    for name, value in seconds.items():
        if name in kinds:
            by_kind[kinds[name]] += value / args.steps
    total = sum(by_kind.values())
    print(
        json.dumps(
            {
                "batch_size": args.batch_size,
                "passes": passes,
                "wall_seconds_per_step_traced": round(wall, 3),
                "thunk_seconds_per_step": round(total, 3),
                "by_kind": {
                    kind: {"seconds": round(value, 3), "share": round(value / total, 3)}
                    for kind, value in by_kind.most_common()
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
