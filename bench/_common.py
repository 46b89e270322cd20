"""What the GPU-or-CPU benchmarks share: the model at the machine's sizes, where the jobs' data lives,
and where results go."""
import contextlib
import json
import os
from pathlib import Path

STORAGE = ("auto", "s3", "local")
"""--storage of the benches that run a job: a local S3 server (moto), a local directory, or `auto`:
S3 where boto3 and moto import. The GPU image has neither and no network (bench/gpu.sh's wheel bundles
do not carry them), so there the jobs read local files."""


def model_args(ap, gpu: bool) -> None:
    """--preset and --depth, the same in every bench."""
    ap.add_argument("--preset", default="vicuna7b" if gpu else "tiny")
    ap.add_argument("--depth", type=int, default=None, metavar="N",
                    help="cut the ViT, Q-Former and LLM to N layers each at their real widths (e.g. --preset "
                         "vicuna7b --depth 1 on CPU: a quick rehearsal of a GPU run's shapes)")


def model_spec(preset_name: str, depth: int | None = None) -> dict:
    """The bench's model as a job config's `model` section (the jobs of a bench build exactly the model its
    in-process rows build): the preset; the real presets in bf16 on a GPU and in fp32 on CPU; with `depth`,
    each part of the preset cut to that many layers."""
    import torch

    from minigpt4.model import PRESETS

    if preset_name not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    spec = {"preset": preset_name}
    if preset_name != "tiny":  # fp16 (the presets' storage dtype) would crawl on CPU, where there is no autocast
        dtype = "bf16" if torch.cuda.is_available() else "fp32"
        spec |= {"llm_dtype": dtype, "vision_dtype": dtype}
    if depth is not None:
        if depth < 1:
            raise SystemExit(f"error: --depth must be at least 1, got {depth}")
        spec |= {part: dict(PRESETS[preset_name][part], num_hidden_layers=depth)
                 for part in ("vision", "qformer", "llm") if PRESETS[preset_name].get(part)}
    return spec


def machine(preset_name: str, depth: int | None = None):
    """(ModelConfig, torch device, device name, model spec): the model of `model_spec`; on CPU up to 8
    threads, or OMP_NUM_THREADS when set (a shared box: more threads than free cores make a tiny model 30x
    slower)."""
    import torch

    from minigpt4.model import preset

    gpu = torch.cuda.is_available()
    spec = model_spec(preset_name, depth)
    if not gpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(os.cpu_count() or 1, 8)))
    name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    if depth is not None:
        name += f", {depth} layer(s) per part"
    rest = {k: v for k, v in spec.items() if k != "preset"}
    return preset(preset_name, **rest), torch.device("cuda" if gpu else "cpu"), name, spec


def tokenizer_dir(cfg) -> str:
    """A tokenizer directory for the bench's model (in-process rows: `load_tokenizer(dir)`; jobs:
    `weights.tokenizer`), living as long as the process: the tiny tokenizer widened to the LLM's vocabulary,
    so that every id the random model samples (up to 32,000 at real sizes) decodes to text, as a real
    tokenizer's would; the tiny tokenizer alone decodes ids past its 640 to nothing."""
    import atexit
    import shutil
    import tempfile

    from minigpt4.tokenizer import write_widened_tokenizer

    directory = tempfile.mkdtemp(prefix="bench-tokenizer-")
    atexit.register(shutil.rmtree, directory, True)
    return write_widened_tokenizer(directory, cfg.llm_config().vocab_size)


def s3_available() -> bool:
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def job_storage(kind: str, workdir: Path):
    """Yields (root, what, env): `root` the URI prefix for the job's data (`s3://bench` on a local S3
    server, or a directory under `workdir`), `what` its words for the table, `env` the variables Ray's
    workers need (the server's endpoint and test credentials; empty for local files)."""
    if kind == "auto":
        kind = "s3" if s3_available() else "local"
    if kind == "local":
        root = Path(workdir) / "data"
        root.mkdir(parents=True, exist_ok=True)
        yield str(root), "local files", {}
        return
    if kind != "s3":
        raise ValueError(f"--storage must be one of {STORAGE}, not {kind!r}")
    if not s3_available():
        raise SystemExit("error: --storage s3 needs boto3 and moto (a local S3 server); use --storage local")
    from minigpt4.s3server import LocalS3

    server = LocalS3().start()
    server.apply_env()
    try:
        server.create_bucket("bench")
        yield "s3://bench", "a local S3 server", server.env()
    finally:
        server.stop()


def write_results(out: str, stem: str, table: str, payload: dict, remaining: str | None = None) -> None:
    """Write `<out>/<stem>.md` (the table) and `<stem>.json` (payload), then print the table.

    The benches call it after every row with `remaining` naming what is still to run: the files then
    say they are partial, and are not printed. A bench that bench/gpu.sh stops at its timeout (or that
    fails half-way) so leaves the rows it finished in $OUT, which the device call brings back."""
    if remaining:
        table += f"\n\nPartial table: {remaining} had not run when it was written."
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    files = {f"{stem}.md": table + "\n",
             f"{stem}.json": json.dumps({**payload, "partial": remaining or None}, indent=1)}
    for name, text in files.items():
        tmp = path / f".{name}.tmp"  # whole files only, even when the timeout lands mid-write
        tmp.write_text(text)
        tmp.replace(path / name)
    if not remaining:
        print(table)
