"""What the command lines of the Ray jobs share (jobs/pretrain.py and finetune.py, caption, evaluate,
curate, features): a YAML config (`--config`) with the flags given on top and dotted `key=value`
overrides on top of both; the embedded default (the synthetic scenes on a loopback S3 server) when no
input is named; a bad config or input is one line on stderr and exit code 2, before Ray starts; Ray and
the embedded server are stopped however the job ends."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from .data import io as uio


class JobCLI:
    """One job's command line. `flag()` adds the job's own flags, `parse()` the shared tail (--address,
    overrides); `load()` builds the config dict, `start_embedded()` the default input, `config()` the
    dataclass; `error()` and `run()` end it (exit codes 2 and 0)."""

    def __init__(self, name: str, description: str, config: str, overrides: str):
        """name: the prefix of its lines (`[caption]`); config: the YAML of jobs/configs/ that --config's
        help points at; overrides: an example for the overrides' help."""
        self.name, self._overrides = name, overrides
        self.parser = argparse.ArgumentParser(description=description)
        self.parser.add_argument("--config", help=f"job YAML (see jobs/configs/{config}); none: the embedded default")
        self.embedded = None  # minigpt4.embedded.EmbeddedData, once started

    def flag(self, *names: str, **kw) -> None:
        self.parser.add_argument(*names, **kw)

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        self.parser.add_argument("--address", default=None, help="Ray address (default: running cluster, else local)")
        self.parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {self._overrides}")
        args = self.parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return args

    @staticmethod
    def load(args: argparse.Namespace, **flags) -> dict:
        """The --config YAML (or {}) with the flags that were given on top: `flags` (None: not given) and
        the shared ones the job has: --overwrite, --preset (model.preset), --weights (weights.minigpt4)."""
        import yaml

        data = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
        data.update({k: v for k, v in flags.items() if v is not None})
        if getattr(args, "overwrite", False):
            data["overwrite"] = True
        if getattr(args, "preset", None):
            data["model"] = {**data.get("model", {}), "preset": args.preset}
        if getattr(args, "weights", None):
            data["weights"] = {**data.get("weights", {}), "minigpt4": args.weights}
        return data

    def start_embedded(self, what: str, **kw):
        """Start the embedded default (minigpt4.embedded.start_embedded(**kw)), saying so; Ray's workers get
        its endpoint through `run()`."""
        from .embedded import start_embedded

        print(f"[{self.name}] {what}")
        self.embedded = start_embedded(progress=False, **kw)
        return self.embedded

    def start_heldout(self, data: dict, output: str, model: str = "") -> None:
        """The embedded default of the jobs that read images (caption, curate, evaluate): the synthetic
        held-out scenes (and nothing else) on a local S3 server as the input; `output` unless one is set."""
        embedded = self.start_embedded(f"no --input: the embedded default ({model}the synthetic held-out scenes on "
                                       "a local S3 server)", train_shards=0, align_samples=0)
        data["input"] = embedded.heldout_images
        data.setdefault("output", output)

    @staticmethod
    def config(cls, data: dict):
        """from_dict(cls, data), a local `output` made absolute (Ray's workers run elsewhere)."""
        from .config import from_dict

        cfg = from_dict(cls, data)
        if getattr(cfg, "output", None) and not uio.is_s3(cfg.output):
            cfg.output = os.path.abspath(cfg.output)
        return cfg

    def error(self, e: BaseException) -> int:
        print(f"error: {e}", file=sys.stderr)
        self._stop()
        return 2

    def run(self, job: Callable[[], str], address: str | None) -> int:
        """Connect to Ray (the embedded server's endpoint in the workers' environment), run `job()` and print
        the text it returns; a ValueError or ObjectError from it is a one-line error and exit code 2."""
        import ray

        runtime_env = {"env_vars": self.embedded.env} if self.embedded else None
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False)
        try:
            text = job()
        except (ValueError, uio.ObjectError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            ray.shutdown()
            self._stop()
        print(text)
        return 0

    def _stop(self) -> None:
        if self.embedded:
            self.embedded.stop()
