"""What every `meshscale` parser shares: the parser class (every option's help shows its
default, no abbreviated flags), argument types, and the defaults `demo`, `search` and
`ray-demo` have in common, defined once (`DEFAULTS`).

The shared defaults are the demo's (`meshscale.app.demo.DemoConfig` holds the same
values; a test keeps them equal): `search` with no flags try-runs exactly the meshes the
demo's 8-device search does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from meshscale.models import registry


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The defaults shared by `demo`, `search` and `ray-demo`.

    - ``global_batch`` 24: divisible by 1, 2, 3, 4, 6, 8 and 12 replicas, so the demo's
      3- and 6-device meshes replicate as well as the 4- and 8-device ones (32 would rule
      out every data axis of 3 or 6);
    - ``p_min`` 2: two stages at least, so that a device count that is not a multiple of
      it (the demo's 7) exercises the vertical-only rule;
    - ``state_sharding`` zero1: a tiny model's state is small next to its activations, so
      ZeRO-1 needs no more memory than FSDP here and steps 2-3x faster on simulated CPU
      devices (benchmarks/memory.py); pass fsdp for a model whose state is large;
    - ``model`` gpt-tiny (`ray-demo`: ``ray_model``, the MLP: every Ray restart starts new
      processes that compile every try-run again).
    """

    model: str = "gpt-tiny"
    ray_model: str = "mlp"
    p_min: int = 2
    global_batch: int = 24
    state_sharding: str = "zero1"
    seed: int = 0
    devices: int = 8


DEFAULTS = Defaults()

MODEL_HELP = (f"a registered model ({', '.join(registry.NAMES)}) or your own as "
              "package.module:factory, imported from the current directory: factory() "
              "returns a model with an example_batch(n) method (one batch of n examples; a "
              "seed= keyword, if it takes one, gets the step) or a pair (model, batch) whose "
              "batch has --batch examples")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: ``(default: X)``, ``(default: off)`` for
    a flag, or the help's own words when it already says "default" (a None default
    needs words: "default: a free port")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS \
                or "default" in text:
            return text
        if action.nargs == 0:  # a flag
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with defaults in the help and no abbreviations (so that
    a flag one command lacks is refused, not taken for a longer one it has)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def model_name(text: str) -> str:
    """A registered model name or ``package.module:factory`` (loaded later)."""
    if text in registry.NAMES or text in registry.ABSTRACT or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"--model takes one of {', '.join(registry.NAMES)} or package.module:factory, "
        f"got {text!r}")


def add_model_options(p: argparse.ArgumentParser, *, model: str = DEFAULTS.model,
                      p_min_type=positive, p_min_help: str = "") -> None:
    """--model, --p-min, --batch, --state-sharding, --seed with the shared defaults."""
    from meshscale.layout.sharding import STATE_SHARDINGS

    p.add_argument("--model", type=model_name, default=model, help=MODEL_HELP)
    p.add_argument("--p-min", type=p_min_type, default=DEFAULTS.p_min,
                   help="fewest pipeline stages: the fewest at which one stage's state and "
                        f"activations fit a device{p_min_help}")
    p.add_argument("--batch", type=positive, default=DEFAULTS.global_batch,
                   help="global batch: examples per step, the same on every mesh; a data "
                        "axis that does not divide it is ruled out")
    p.add_argument("--state-sharding", choices=STATE_SHARDINGS,
                   default=DEFAULTS.state_sharding,
                   help="where parameters and optimizer state live besides their stage: "
                        "replicate (every replica), zero1 (optimizer state split over data), "
                        "fsdp (parameters too: the least memory)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seed of the model's parameters and of the data")


def add_run_options(p: argparse.ArgumentParser, d, *, schedule_help: str) -> None:
    """The options `demo` and `ray-demo` share, with defaults from their config `d`."""
    p.add_argument("--steps", type=positive, default=d.steps, help="steps to train")
    p.add_argument("--schedule", default=d.schedule, help=schedule_help)
    p.add_argument("--run-dir", default=d.run_dir,
                   help=f"where the run writes everything: checkpoints, report, compile cache "
                        f"(refused when it holds anything, unless "
                        f"{'--resume or ' if hasattr(d, 'resume') else ''}--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a RUN_DIR that holds a previous run or other files: "
                        "it is first moved aside to RUN_DIR.old-N, nothing is deleted")
    p.add_argument("--checkpoint-every", type=positive, default=d.checkpoint_every,
                   help="save a checkpoint every this many steps")


class Refuse(argparse.Action):
    """A flag the command does not have, refused with one line naming the fix (without it
    a mistyped flag would say only "unrecognized arguments")."""

    def __init__(self, option_strings, dest, *, fix: str, **kwargs):
        kwargs.setdefault("help", argparse.SUPPRESS)
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, nargs="?", **kwargs)
        self.fix = fix

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: error: {option_string}: {self.fix}", file=sys.stderr)
        raise SystemExit(2)
